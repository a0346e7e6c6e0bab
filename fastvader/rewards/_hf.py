"""Shared plumbing for rewards built on pretrained networks: where weights come from (a Hugging
Face hub id or a local folder/file, never a hard-coded cache path), how configs for random
initialisation are read, which dtype frozen models use, and parameter counts on the meta device.

Nothing here imports transformers at module import time, so ``available_rewards()`` stays cheap.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch

from fastvader import precision
from fastvader.model_configs import packaged_config
from fastvader.rewards.base import Reward


class RewardWeightsError(FileNotFoundError):
    """Weights or configs for a reward are missing or in the wrong format. The message names the
    files that were expected and where the reward looked."""


# ---------------------------------------------------------------------------------------------
# importing transformers safely
# ---------------------------------------------------------------------------------------------
def transformers_module():
    import transformers

    return transformers


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype, reward: str) -> torch.dtype:
    """``auto``: bf16 when a GPU is present (frozen reward models run in half precision there),
    fp32 on CPU (CPU half-precision matmuls are slow and inexact)."""
    return precision.resolve_dtype(dtype, f"reward.options.{reward}.dtype")


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def read_config(config: Any, reward: str) -> dict:
    """A config given as a dict, a transformers config object, or a JSON/YAML file path."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(os.fspath(config)).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RewardWeightsError(f"reward.options.{reward}.config: no config file at {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return dict(yaml.safe_load(text))
    return json.loads(text)


def strip_private(d: dict) -> dict:
    """Drop keys such as ``_source``/``_description`` that annotate the shared config files."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# where weights come from
# ---------------------------------------------------------------------------------------------
def is_local(source: str | os.PathLike) -> bool:
    """A path rather than a hub id: it exists, starts like a path, names a file, or does not have
    the one slash of ``owner/name``."""
    s = os.fspath(source)
    return (os.path.exists(os.path.expanduser(s)) or s.startswith((".", "/", "~")) or s.count("/") != 1
            or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))


def find_weight_file(source: str | os.PathLike, candidates: Sequence[str], *, reward: str, what: str,
                     option: str = "pretrained") -> Path:
    """Resolve ``source`` (a file, a local folder, or a hub id) to one of ``candidates``.

    A hub id is fetched with ``huggingface_hub.hf_hub_download`` (its cache, not ours); a local
    folder must hold one of the candidate file names."""
    s = os.path.expanduser(os.fspath(source))
    if os.path.isfile(s):
        return Path(s)
    if os.path.isdir(s):
        for name in candidates:
            if os.path.isfile(os.path.join(s, name)):
                return Path(s) / name
        present = sorted(os.listdir(s))[:20]
        raise RewardWeightsError(
            f"reward {reward!r}: the folder {s} (reward.options.{reward}.{option}) holds no {what}; "
            f"expected one of {list(candidates)}, found {present}")
    if is_local(s):
        raise RewardWeightsError(
            f"reward {reward!r}: reward.options.{reward}.{option}={s!r} does not exist; expected a "
            f"file or a folder holding one of {list(candidates)} ({what})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise RewardWeightsError(f"reward {reward!r}: huggingface_hub is needed to fetch {s!r}") from e
    errors = []
    for name in candidates:
        try:
            return Path(hf_hub_download(s, name))
        except Exception as e:  # noqa: BLE001 - report every attempt below
            errors.append(f"{name}: {type(e).__name__}")
    raise RewardWeightsError(
        f"reward {reward!r}: could not fetch {what} from the hub repo {s!r} (tried {errors}). "
        f"Without network access, download the file and set reward.options.{reward}.{option} to "
        f"its local path or folder")


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def from_pretrained(cls, source: str | os.PathLike, *, reward: str, dtype: torch.dtype,
                    option: str = "pretrained", **kwargs):
    """``cls.from_pretrained`` with errors that say what a local folder must hold."""
    s = os.path.expanduser(os.fspath(source))
    if os.path.isdir(s):
        missing = []
        if not os.path.isfile(os.path.join(s, "config.json")):
            missing.append("config.json")
        if not any(os.path.isfile(os.path.join(s, f)) for f in HF_WEIGHT_FILES):
            missing.append(" or ".join(HF_WEIGHT_FILES[:1] + HF_WEIGHT_FILES[2:3]))
        if missing:
            raise RewardWeightsError(
                f"reward {reward!r}: the folder {s} (reward.options.{reward}.{option}) is not a "
                f"{cls.__name__} saved with save_pretrained: missing {missing}; found "
                f"{sorted(os.listdir(s))[:20]}")
    elif is_local(s):
        raise RewardWeightsError(
            f"reward {reward!r}: reward.options.{reward}.{option}={s!r} does not exist; expected a "
            f"hub id such as the default, or a folder saved with save_pretrained "
            f"(config.json + model.safetensors)")
    # transformers < 4.56 names the argument torch_dtype
    dtype_arg = "dtype" if int(transformers_module().__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        return cls.from_pretrained(s, **{dtype_arg: dtype}, **kwargs)
    except OSError as e:
        raise RewardWeightsError(
            f"reward {reward!r}: could not load {cls.__name__} from {s!r}: {e}. Without network "
            f"access, download it (huggingface-cli download {s}) and set "
            f"reward.options.{reward}.{option} to the local folder") from e


def load_state_dict_file(path: Path, *, reward: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch pickle loaded with ``weights_only=True``
    (no arbitrary code runs); nested ``{"state_dict": ...}``/``{"model": ...}`` are unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardWeightsError(
            f"reward {reward!r}: {path} is not a readable torch state dict ({type(e).__name__}: "
            f"{str(e)[:200]}). Expected a .safetensors file or a .pt/.pth holding tensors") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardWeightsError(f"reward {reward!r}: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, reward: str,
                     source: Any, ignore: Iterable[str] = ()) -> None:
    """Load strictly, with an error that lists what is missing or unexpected (a wrong file)."""
    ignore = tuple(ignore)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise RewardWeightsError(
            f"reward {reward!r}: {source} does not match the architecture: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(wrong)} shape mismatches {wrong[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


# ---------------------------------------------------------------------------------------------
# parameter counts without allocating
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _meta_count_cached(key: str, build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def meta_param_count(key: str, build: Callable[[], torch.nn.Module]) -> int | None:
    """Parameters of ``build()`` constructed on the meta device (no memory, no weights)."""
    try:
        return _meta_count_cached(key, build)
    except Exception:  # noqa: BLE001 - describe() must never fail; None says "not computable"
        return None


# ---------------------------------------------------------------------------------------------
# activation checkpointing for frozen reward networks
# ---------------------------------------------------------------------------------------------
def checkpoint_layers(layers: Iterable[torch.nn.Module]) -> int:
    """Recompute each layer's activations during backward instead of keeping them.

    transformers only checkpoints in training mode, and frozen rewards run in eval mode, so the
    layer's ``forward`` is wrapped on the instance (the state dict is unchanged) with
    non-reentrant ``torch.utils.checkpoint``, which needs no input to require grad. Without
    grad mode the plain forward runs. Returns the number of layers wrapped."""
    import torch.utils.checkpoint as tuc

    count = 0
    for layer in layers:
        if getattr(layer, "_fastvader_checkpointed", False):
            continue
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return tuc.checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._fastvader_checkpointed = True
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# the common base of rewards backed by frozen pretrained networks
# ---------------------------------------------------------------------------------------------
class PretrainedReward(Reward):
    """Holds the options every pretrained reward shares and casts inputs to the model dtype.

    Subclasses set ``kind``, ``default_pretrained``, ``expected_weights`` (for ``describe``) and
    ``packaged_architectures``, and implement ``real_architecture()`` (a meta-device build of the
    published model)."""

    kind = "image"
    default_pretrained: str | None = None
    expected_weights: str = ""
    #: hub id -> the config of its published architecture packaged in fastvader.model_configs;
    #: ``default_pretrained`` must be listed
    packaged_architectures: ClassVar[dict[str, str]] = {}
    #: options naming weight or tokenizer files, which a random-weight build has no use for
    weight_file_options: ClassVar[tuple[str, ...]] = ("tokenizer", "mlp_path")

    def __init__(self, dtype: str | torch.dtype = "auto"):
        super().__init__()
        self.model_dtype = resolve_dtype(dtype, self.name)

    def checkpointed_layers(self) -> list[torch.nn.Module]:
        """The transformer blocks that ``checkpointing: true`` recomputes in backward."""
        return []

    def enable_checkpointing(self) -> "PretrainedReward":
        """``checkpointing: true``: less activation memory for one more reward forward."""
        checkpoint_layers(self.checkpointed_layers())
        return self

    def reject_config_with_weights(self, config: Any) -> None:
        """``config`` describes an architecture to build with random weights; a checkpoint in
        transformers' format brings its own config.json."""
        if config is not None:
            raise ValueError(f"reward.options.{self.name}.config applies only with random_init: true; "
                             f"the checkpoint folder carries its own config.json")

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.model_dtype)

    @classmethod
    def architecture(cls, config: Any = None, pretrained: str | None = None) -> dict:
        """The architecture random_init builds: ``config`` (a dict or a JSON/YAML file) when given,
        else the packaged config of ``pretrained`` (a hub id in ``packaged_architectures``) or of
        ``default_pretrained``. Annotation keys (``_source``, ...) are dropped."""
        if config is None:
            relative = cls.packaged_architectures.get(str(pretrained), cls.packaged_architectures[cls.default_pretrained])
            config = packaged_config(relative)
        return strip_private(read_config(config, cls.name))

    @classmethod
    def architecture_options(cls, options: dict) -> dict:
        """``options`` rewritten to build the published architecture with random weights and
        nothing read but the packaged configs (what the memory planner measures): random_init
        on, weight and tokenizer files dropped; ``pretrained`` stays, it picks the architecture."""
        kept = {k: v for k, v in options.items() if k not in cls.weight_file_options}
        return {**kept, "random_init": True}

    @classmethod
    def real_architecture(cls) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def param_count(cls) -> int | None:
        return meta_param_count(cls.__qualname__, cls.real_architecture)

    @classmethod
    def describe(cls) -> dict:
        info = super().describe()
        info.update(kind=cls.kind, weights=cls.expected_weights, params=cls.param_count())
        return info

    def freeze(self) -> "PretrainedReward":
        super().freeze()
        return self


def processor_config(source: str | os.PathLike | None) -> dict | None:
    """The checkpoint's ``preprocessor_config.json`` (local folder, or fetched for a hub id);
    None when there is none, so the reference processor's defaults apply."""
    from fastvader.rewards.preprocess import read_processor_config

    if source is None:
        return None
    s = os.path.expanduser(os.fspath(source))
    if os.path.isdir(s) or is_local(s):
        return read_processor_config(s)
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(s, "preprocessor_config.json")) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - offline or absent: fall back to the processor defaults
        return None


def label_index(id2label: dict, name: str, *, reward: str, option: str = "target") -> int:
    """The class id of ``name`` (case-insensitive), with close matches named when it is absent."""
    import difflib

    by_name = {str(v).lower(): int(k) for k, v in id2label.items()}
    key = name.strip().lower()
    if key in by_name:
        return by_name[key]
    close = difflib.get_close_matches(key, list(by_name), n=5, cutoff=0.5)
    raise ValueError(f"reward.options.{reward}.{option}={name!r} is not a class of this model; "
                     f"closest: {close or 'none'} (of {len(by_name)} classes)")
