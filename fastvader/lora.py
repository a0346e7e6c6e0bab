"""LoRA on the denoiser through peft, and LoRA files.

fastvader writes its LoRA files in the diffusers layout (``unet.<module>.lora_A.weight``) with
its metadata: ``fastvader.backbone`` (the family), ``base_model``, ``lora_rank``,
``lora_alpha``, ``target_modules``, ``reward``, ``steps``. It reads that layout and the
kohya and ComfyUI layouts of every family those tools load (:mod:`fastvader.io.lora_layouts`),
checks that a file fits the model before touching it (family, modules, sizes: one-line
:class:`~fastvader.errors.LoraFileError` otherwise), and shapes the adapters as the file says.

``load_lora(pipe_or_model, path)`` (exported as ``fastvader.load_lora``) loads a file into a
live diffusers model, including the UNet3DConditionModel families whose pipelines cannot
(``load_lora_weights`` needs ``PeftAdapterMixin``, which UNet3DConditionModel lacks); its
``remove()`` restores the model exactly (through :mod:`fastvader.patching`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from fastvader.config import ConfigError, LoraConfig
from fastvader.errors import LoraFileError

#: diffusers' LoRA loaders read UNet/transformer keys behind this prefix
DIFFUSERS_PREFIX = "unet."
#: the diffusers model classes whose family has tool-specific key names (lora_layouts)
MODEL_FAMILIES = {"UNetMotionModel": "animatediff", "WanTransformer3DModel": "wan"}


def add_lora(denoiser: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: list[str] | None = None, init_weights: bool = True) -> list[nn.Parameter]:
    """Inject LoRA adapters (peft ``inject_adapter_in_model``, which also works for
    UNet3DConditionModel that lacks ``add_adapter``). Freezes every base weight and returns the
    trainable LoRA parameters."""
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=list(target_modules), init_lora_weights=init_weights)
    try:
        inject_adapter_in_model(config, denoiser)
    except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found in the base model" not in str(err):
            raise
        raise _no_match(denoiser, target_modules) from None
    denoiser.requires_grad_(False)
    for name, module in denoiser.named_modules():
        if "lora_dropout" in name:
            module.train()  # the base model stays in eval mode; the adapters' dropout trains
    params = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise _no_match(denoiser, target_modules)
    return params


def _no_match(denoiser: nn.Module, target_modules) -> ConfigError:
    def short(name: str) -> str:  # what peft matches: the last name part (two for a Sequential index)
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

    names = sorted({short(n) for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)})
    return ConfigError(f"config: lora.target_modules={list(target_modules)} matches no module of "
                       f"{type(denoiser).__name__}: name Linear layers by the end of their name, e.g. {names[:10]}")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model: every peft adapter layer bypassed. Only the layers' flag
    changes (peft's public ``enable_adapters(False)`` would also flip requires_grad on the LoRA
    weights in the middle of a step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, previous):
            m._disable_adapters = was


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key layout (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def lora_metadata(rank: int, alpha: float, target_modules: list[str], **extra) -> dict[str, str]:
    meta = {"format": "pt", "fastvader.lora_rank": str(rank), "fastvader.lora_alpha": str(alpha),
            "fastvader.target_modules": json.dumps(list(target_modules))}
    # diffusers reads the adapter config from this key when loading with load_lora_weights; its
    # loader keeps only entries behind the component prefix ("unet.r"), so unprefixed entries are
    # dropped and alpha falls back to the rank (a wrong scale whenever alpha != rank)
    adapter = {"r": rank, "lora_alpha": alpha, "target_modules": list(target_modules)}
    meta["lora_adapter_metadata"] = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in adapter.items()})
    meta.update({f"fastvader.{k}": str(v) for k, v in extra.items()})
    return meta


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None) -> Path:
    """Write atomically, readable as any file the user creates (safetensors alone makes 0600)."""
    from safetensors.torch import save_file

    from fastvader.io.checkpoint import atomic_path, user_file_mode

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        user_file_mode(tmp)
    return path


def save_lora(denoiser: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``unet.``-prefixed peft keys as safetensors (diffusers ``load_lora_weights`` layout)."""
    state = {DIFFUSERS_PREFIX + k: v for k, v in lora_state_dict(denoiser).items()}
    return write_safetensors(state, path, metadata)


# ---------------------------------------------------------------------------------------------
# reading any layout
# ---------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    """A LoRA file read into peft keys (``<module>.lora_A.weight``), with what it says of itself."""

    path: Path
    state: dict[str, torch.Tensor]
    format: str
    rank: int
    alpha: float
    modules: list[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        """The backbone family it was trained on, when the file says (older files: base_model)."""
        from fastvader.backbones import available_backbones

        named = self.metadata.get("fastvader.backbone") or self.metadata.get("fastvader.base_model")
        return named if named in available_backbones() else None

    @property
    def base_model(self) -> str:
        return self.metadata.get("fastvader.base_model") or self.metadata.get("ss_sd_model_name") or "unknown"

    @property
    def steps(self) -> int | None:
        steps = self.metadata.get("fastvader.steps") or self.metadata.get("ss_steps")
        return int(steps) if steps and steps.isdigit() else None

    def info(self) -> dict[str, Any]:
        return {"format": self.format, "rank": self.rank, "alpha": self.alpha, "modules": self.modules,
                "metadata": self.metadata}


def read_lora_file(path: str | Path, module_names: list[str] | None = None,
                   family: str | None = None) -> LoraFile:
    """Any supported layout -> a :class:`LoraFile`. kohya and ComfyUI keys are resolved against
    ``module_names`` (the model's; else the dotted names fastvader's exports record)."""
    from fastvader.io import lora_layouts

    path = Path(path)
    raw, meta = _open_safetensors(path)
    if module_names is None and "fastvader.lora_modules" in meta:
        module_names = json.loads(meta["fastvader.lora_modules"])
    family = family or meta.get("fastvader.backbone")
    lookup = lora_layouts.module_lookup(module_names, family) if module_names is not None else None
    try:
        peft, alphas, folded, unknown = lora_layouts.from_format(raw, lookup)
    except ValueError as err:
        raise LoraFileError(f"{path} is not a LoRA file fastvader reads: {err}") from None
    if unknown:
        where = "this model" if lookup is not None else "any model without its module names"
        raise LoraFileError(f"{path} adapts {len(set(unknown))} module(s) {where} does not have (e.g. {unknown[0]!r}; "
                            f"base model {meta.get('fastvader.base_model', 'unknown')}): it was trained for another "
                            "model, or is a kohya/ComfyUI file to load into the model itself (fastvader.load_lora)")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in peft})
    incomplete = [m for m in modules if f"{m}.lora_A.weight" not in peft or f"{m}.lora_B.weight" not in peft]
    if not modules or incomplete:
        raise LoraFileError(f"{path} holds no complete LoRA pair (A/down and B/up) for "
                            f"{incomplete[:2] or 'any module'}; is it a LoRA file?")
    rank = _one_rank(path, peft, modules)
    alpha = _alpha(meta, alphas, rank, path)
    for module in folded:  # scale folded into B by tools that apply up @ down unscaled
        peft[f"{module}.lora_B.weight"] = peft[f"{module}.lora_B.weight"] * (rank / alpha)
    return LoraFile(path, peft, lora_layouts.detect_format(raw), rank, alpha, modules, meta)


def _open_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.is_dir():
        raise LoraFileError(f"{path} is a folder; give the LoRA file (e.g. {path / 'lora.safetensors'})")
    if not path.is_file():
        raise LoraFileError(f"LoRA file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise LoraFileError(f"{path} cannot be read as a safetensors file ({err}): it is truncated or not a LoRA "
                            "file; write or copy it again") from None


def _one_rank(path: Path, peft: dict[str, torch.Tensor], modules: list[str]) -> int:
    ranks = {peft[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise LoraFileError(f"{path}: its modules have different ranks {sorted(ranks)}; fastvader loads one rank a file")
    return ranks.pop()


def _alpha(meta: dict[str, str], alphas: dict[str, float], rank: int, path: Path) -> float:
    """fastvader's metadata, else the per-module alphas (kohya, ComfyUI), else kohya's or
    diffusers' metadata, else the rank (what loaders assume when a file records none)."""
    if "fastvader.lora_alpha" in meta:
        return float(meta["fastvader.lora_alpha"])
    if alphas:
        if len(set(alphas.values())) != 1:
            raise LoraFileError(f"{path}: its modules have different alphas; fastvader loads one alpha a file")
        return next(iter(alphas.values()))
    if meta.get("ss_network_alpha"):
        return float(meta["ss_network_alpha"])
    adapter = json.loads(meta.get("lora_adapter_metadata", "{}"))
    return float(next((v for k, v in adapter.items() if k.endswith("lora_alpha")), rank))


# ---------------------------------------------------------------------------------------------
# checking and loading
# ---------------------------------------------------------------------------------------------
def check_fits(lora: LoraFile, model: nn.Module, family: str | None) -> None:
    """Refuse, in one line, a file trained on another family or with modules of other sizes."""
    if family and lora.family and lora.family != family:
        raise LoraFileError(f"{lora.path} was trained on {lora.family} (base model {lora.base_model}); this config "
                            f"builds {family}: use the config of the run that trained it (backbone.name="
                            f"{lora.family}), or a LoRA trained on {family}")
    modules = dict(model.named_modules())
    missing = [m for m in lora.modules if m not in modules]
    if missing:
        raise LoraFileError(f"{lora.path} adapts {len(missing)} module(s) this {type(model).__name__} does not have "
                            f"(e.g. {missing[0]!r}; base model {lora.base_model}): it was trained for another model")
    wrong = [(m, _sizes(lora, m), _sizes_of(modules[m])) for m in lora.modules]
    wrong = [w for w in wrong if w[1] != w[2]]
    if wrong:
        name, file_sizes, model_sizes = wrong[0]
        raise LoraFileError(f"{lora.path}: {len(wrong)} of {len(lora.modules)} adapted modules have other sizes in "
                            f"this model (e.g. {name}: in/out {file_sizes} in the file, {model_sizes} in the model): "
                            f"it was trained for another model (base model {lora.base_model})")


def _sizes(lora: LoraFile, module: str) -> tuple[int, int]:
    return lora.state[f"{module}.lora_A.weight"].shape[1], lora.state[f"{module}.lora_B.weight"].shape[0]


def _sizes_of(module: nn.Module) -> tuple[int, int] | None:
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    return None if weight is None or weight.dim() < 2 else (weight.shape[1], weight.shape[0])


def inject(model: nn.Module, lora: LoraFile) -> list[nn.Parameter]:
    """Adapters shaped as the file says (its modules, rank, alpha), holding its weights."""
    from peft.utils import set_peft_model_state_dict

    params = add_lora(model, lora.rank, lora.alpha, target_modules=lora.modules)
    device = params[0].device
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in lora.state.items()})
    if getattr(result, "unexpected_keys", None):
        raise LoraFileError(f"{lora.path} holds keys the model does not take, e.g. {result.unexpected_keys[:2]}")
    return params


def load_lora_state(denoiser: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load peft-keyed LoRA weights (a checkpoint's) into adapters already in ``denoiser``,
    refusing in one line weights of another shape (another rank or other targets)."""
    from peft.utils import set_peft_model_state_dict

    have = {k: tuple(v.shape) for k, v in lora_state_dict(denoiser).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if have != got:
        rank = lambda shapes: sorted({s[0] for k, s in shapes.items() if ".lora_A." in k})  # noqa: E731
        raise LoraFileError(f"{source} holds a LoRA of rank {rank(got)} on {len(got) // 2} modules; this run's "
                            f"adapters are rank {rank(have)} on {len(have) // 2} modules: use the lora settings it "
                            "was trained with (lora.rank, lora.target_modules)")
    device = next(iter(dict(denoiser.named_parameters()).values())).device
    set_peft_model_state_dict(denoiser, {k: v.to(device) for k, v in state.items()})


def init_lora(denoiser: nn.Module, cfg: LoraConfig, family: str, default_targets: list[str]
              ) -> tuple[list[nn.Parameter], LoraConfig]:
    """The training adapters: as ``cfg`` says, or, with ``lora.init_from``, shaped and filled as
    that file says (its rank, alpha and modules replace the config's, which is returned so the
    run records what it trains)."""
    import warnings

    if not cfg.init_from:
        return add_lora(denoiser, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules or default_targets,
                        cfg.init_weights), cfg
    lora = read_lora_file(cfg.init_from, [n for n, _ in denoiser.named_modules()], family)
    check_fits(lora, denoiser, family)
    if (lora.rank, lora.alpha) != (cfg.rank, cfg.alpha):
        warnings.warn(f"fastvader: lora.init_from={cfg.init_from}: training its adapters (rank {lora.rank}, alpha "
                      f"{lora.alpha:g}, {len(lora.modules)} modules), not lora.rank={cfg.rank}/alpha={cfg.alpha:g}",
                      stacklevel=2)
    params = add_lora(denoiser, lora.rank, lora.alpha, cfg.dropout, lora.modules)
    load_lora_state(denoiser, lora.state, lora.path)
    return params, dataclasses.replace(cfg, rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.modules))


class LoadedLora:
    """A LoRA file loaded into a model by :func:`load_lora`; ``remove()`` puts back exactly what
    was there (the original layers, no ``peft_config``)."""

    def __init__(self, model: nn.Module, lora: LoraFile, patches):
        self.model, self.file, self._patches = model, lora, patches

    @property
    def info(self) -> dict[str, Any]:
        return self.file.info()

    def remove(self) -> None:
        self._patches.revert()

    def __repr__(self) -> str:
        return (f"LoadedLora({self.file.path}: {self.file.format} layout, rank {self.file.rank}, alpha "
                f"{self.file.alpha:g}, {len(self.file.modules)} modules in {type(self.model).__name__})")


def load_lora(pipe_or_model, path: str | Path, *, family: str | None = None,
              dtype: torch.dtype | None = None) -> LoadedLora:
    """Load a LoRA file of any supported layout into a diffusers pipeline (its ``unet`` or
    ``transformer``), a model, or a fastvader backbone, for inference: the adapters are frozen
    (in ``dtype``, default the base layers') and the model's own parameters keep their
    ``requires_grad``. ``family`` (a backbone name) is found from the model's class when not
    given."""
    from fastvader.patching import ChildModule, InstanceAttr, Patches

    model, family = _model_of(pipe_or_model, family)
    lora = read_lora_file(path, [n for n, _ in model.named_modules()], family)
    check_fits(lora, model, family)
    owners = {m: model.get_submodule(m.rpartition(".")[0]) for m in lora.modules}
    originals = {m: owners[m]._modules[m.rpartition(".")[2]] for m in lora.modules}
    config_before = model.__dict__.get("peft_config")
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for p in inject(model, lora):
        p.data = p.data.to(dtype or p.dtype)
    for p in model.parameters():
        p.requires_grad_(trainable.get(id(p), False))
    # move each replacement into a Patches handle, so that remove() restores exactly
    patches = Patches()
    for module, owner in owners.items():
        child = module.rpartition(".")[2]
        adapted, owner._modules[child] = owner._modules[child], originals[module]
        patches.replace(ChildModule(owner, child), adapted)
    injected_config = model.__dict__.pop("peft_config")
    if config_before is not None:
        model.__dict__["peft_config"] = config_before
    patches.replace(InstanceAttr(model, "peft_config"), injected_config)
    return LoadedLora(model, lora, patches)


def _model_of(pipe_or_model, family: str | None) -> tuple[nn.Module, str | None]:
    denoiser = getattr(pipe_or_model, "denoiser", None)  # a fastvader Backbone
    if isinstance(denoiser, nn.Module):
        return denoiser, family or getattr(pipe_or_model, "family", None)
    if isinstance(pipe_or_model, nn.Module):
        model = pipe_or_model
    else:  # a diffusers pipeline
        model = getattr(pipe_or_model, "unet", None) or getattr(pipe_or_model, "transformer", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_lora takes a diffusers pipeline (with a unet or transformer), a model or a "
                            f"fastvader backbone; got {type(pipe_or_model).__name__}")
    return model, family or MODEL_FAMILIES.get(type(model).__name__)
