"""What the diffusers-based adapters (ModelScope/ZeroScope, AnimateDiff, Wan) share.

- Finding configs and weights: a hub id or a local folder in the diffusers pipeline layout
  (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``),
  or, for ``random_init``, a folder of config JSONs (default: the family's files packaged in
  ``fastvader.model_configs``).
- Loading with clear errors: which files were expected and where we looked when weights are
  missing; the first missing/unexpected/mis-shaped keys when a checkpoint does not fit.
- The text encoder lives outside the module tree on the CPU (``backbone.to(cuda)`` does not
  move it); ``encode_prompts`` borrows the compute device for one call and gives it back, and
  ``free_text_encoder()`` drops it once every prompt is cached.
- A byte-level CLIP tokenizer built in memory for random-init models (no tokenizer files exist
  offline).
- Parameter counts of the real configs on the meta device (``describe()``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

from fastvader.backbones._weights import resolve_dtype
from fastvader.backbones.base import Backbone, PromptEmbeddings
from fastvader.model_configs import packaged_config


#: the SD AutoencoderKL at a tiny size, shared by the per-frame-VAE families' tiny options
TINY_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                   sample_size=32, scaling_factor=0.18215)



class MissingWeightsError(FileNotFoundError):
    """Weights or configs a backbone needs are not where it looked."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the architecture it is loaded into."""


# ---------------------------------------------------------------------------------------------
# dtypes and config folders
# ---------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def find_config_file(component: str, config_dir: Path | None, packaged: str) -> Path:
    """The config JSON of ``component`` for random_init.

    With a user ``config_dir`` we try ``<component>_config.json``, the diffusers layout
    (``<component>/config.json``) and then the name of the family's own file; without one, the
    family's file ``packaged`` in ``fastvader.model_configs`` (e.g. ``sd15/vae_config.json``)."""
    if config_dir is None:
        try:
            return packaged_config(packaged)
        except FileNotFoundError as err:
            raise MissingWeightsError(f"no config for the {component}: {err}") from err
    names = [f"{component}_config.json", f"{component}/config.json", f"{component}/{component}_config.json",
             Path(packaged).name]
    tried = [config_dir / name for name in names]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise MissingWeightsError(f"no config for the {component}; looked for "
                                  f"{[str(t) for t in tried]} (set backbone.config_path to a folder holding it)")
    return found


# ---------------------------------------------------------------------------------------------
# pretrained weights: a local folder or a hub id
# ---------------------------------------------------------------------------------------------
WEIGHT_FILES = {
    "diffusers": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors.index.json",
                  "diffusion_pytorch_model.bin"],
    "transformers": ["model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors",
                     "model.fp16.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"],
}

# checkpoint keys that older exports carry and current classes rebuild themselves
_HARMLESS_UNEXPECTED = ("position_ids",)


def is_local(pretrained: str) -> bool:
    p = Path(os.path.expanduser(pretrained))
    return p.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1


def check_local_component(root: Path, subfolder: str | None, kind: str, what: str = "model") -> dict[str, Any]:
    """Raise MissingWeightsError naming the expected files when a local component is absent;
    return extra from_pretrained kwargs (``variant='fp16'`` when only fp16 files exist)."""
    folder = root / subfolder if subfolder else root
    if not root.is_dir():
        raise MissingWeightsError(f"the {what}: {str(root)!r} is not a folder (give a hub id such as "
                                  "'org/name' or a local folder in the diffusers layout)")
    if not (folder / "config.json").is_file():
        layout = f"'{subfolder}/config.json' under {root}" if subfolder else f"config.json in {root}"
        raise MissingWeightsError(f"the {what}: {folder / 'config.json'} is missing (expected {layout})")
    present = [n for n in WEIGHT_FILES[kind] if (folder / n).is_file()]
    if not present:
        raise MissingWeightsError(f"the {what}: no weights in {folder}: expected one of {WEIGHT_FILES[kind]}")
    if all(".fp16." in n for n in present):
        return {"variant": "fp16"}
    return {}


def load_pretrained(cls, pretrained: str, subfolder: str | None, *, kind: str, dtype: torch.dtype,
                    what: str, **kwargs):
    """``cls.from_pretrained`` with fastvader's errors: missing files name what was expected and
    where; a checkpoint that does not fit names its first bad keys. Strict: missing, unexpected
    and mis-shaped keys are all errors (diffusers would otherwise initialise missing weights at
    random with only a warning)."""
    extra: dict[str, Any] = {}
    if is_local(pretrained):
        extra = check_local_component(Path(os.path.expanduser(pretrained)), subfolder, kind, what)
        pretrained = str(Path(os.path.expanduser(pretrained)))
    if subfolder:
        extra["subfolder"] = subfolder
    where = f"{pretrained}" + (f" (subfolder {subfolder}/)" if subfolder else "")
    try:
        model, info = cls.from_pretrained(pretrained, torch_dtype=dtype, output_loading_info=True, **extra, **kwargs)
    except (OSError, EnvironmentError) as e:
        raise MissingWeightsError(
            f"could not load the {what} from {where}: {e}. Without network access, download it first "
            f"(`huggingface-cli download {pretrained}`) or pass a local folder as backbone.pretrained") from e
    except (ValueError, RuntimeError) as e:
        text = str(e)
        if "shape" in text or "mismatch" in text:
            folder = Path(pretrained) / subfolder if subfolder else Path(pretrained)
            details = compare_checkpoint(cls, folder, kind) if folder.is_dir() else None
            raise CheckpointMismatchError(f"the {what} checkpoint at {where} does not fit {cls.__name__}: "
                                          f"{details or text}") from e
        raise
    check_loading_info(info, cls.__name__, where)
    return model


def compare_checkpoint(cls, folder: Path, kind: str) -> str | None:
    """The first missing, unexpected and mis-shaped keys of the safetensors files in ``folder``
    against ``cls`` built from the folder's config on the meta device (reads headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    with torch.device("meta"):
        if kind == "diffusers":
            model = cls.from_config(cls.load_config(str(folder)))
        else:
            model = cls(cls.config_class.from_pretrained(str(folder)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(k for k in set(shapes) - set(expected) if not k.endswith(_HARMLESS_UNEXPECTED))
    bad = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    parts = [f"{k}: checkpoint {list(shapes[k])} vs model {list(expected[k])}" for k in bad[:5]]
    if missing:
        parts.append(f"missing {missing[:5]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}")
    return (f"{len(bad)} mis-shaped keys, first: " if bad else "") + "; ".join(parts) if parts else None


def check_loading_info(info: dict, cls_name: str, where: str) -> None:
    missing = list(info.get("missing_keys") or [])
    unexpected = [k for k in (info.get("unexpected_keys") or []) if not k.endswith(_HARMLESS_UNEXPECTED)]
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in (info.get("mismatched_keys") or [])]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {sorted(keys)[:5]})")
        raise CheckpointMismatchError(f"the checkpoint at {where} does not match {cls_name}: " + "; ".join(parts)
                                      + ". Is it the right model family / config?")


def load_image_encoder(pretrained: str, dtype: torch.dtype, what: str = "CLIP image encoder"):
    """The pipeline's ``image_encoder/`` as the class its config names (``CLIPVisionModel`` or
    ``CLIPVisionModelWithProjection``: conversions save either), loaded strictly."""
    import transformers

    try:
        config = transformers.CLIPVisionConfig.from_pretrained(
            str(Path(os.path.expanduser(pretrained))) if is_local(pretrained) else pretrained, subfolder="image_encoder")
        architectures = list(config.architectures or [])
    except (OSError, EnvironmentError):
        architectures = []  # load_pretrained below says what is missing
    name = "CLIPVisionModel" if architectures == ["CLIPVisionModel"] else "CLIPVisionModelWithProjection"
    return load_pretrained(getattr(transformers, name), pretrained, "image_encoder", kind="transformers", dtype=dtype,
                           what=what)


def packaged_json(relative: str) -> dict:
    """A packaged config without its annotation keys (``_source``, ``_class_name``, ...)."""
    return {k: v for k, v in read_json(packaged_config(relative)).items() if not k.startswith("_")}


def check_causal_frames(family: str, num_frames: int, factor: int) -> None:
    """Causal video VAEs (Wan, CogVideoX) keep the first frame and compress the others ``factor``
    times: a video has factor*k+1 frames."""
    if num_frames % factor != 1:
        k = max(0, round((num_frames - 1) / factor))
        raise ValueError(f"video.frames={num_frames} does not fit {family}: its VAE compresses time {factor}x "
                         f"causally, so frames must be {factor}k+1 (try {factor * k + 1})")


def check_patch_grid(family: str, height: int, width: int, spatial: int, patch: int) -> None:
    """The latent of a (height, width) video (``spatial`` times smaller) must divide into the
    transformer's ``patch`` x ``patch`` patches."""
    for name, v in (("video.height", height), ("video.width", width)):
        if v % (spatial * patch):
            raise ValueError(f"{name}={v} does not fit {family}: the latent ({v}/{spatial}) must divide into "
                             f"{patch}x{patch} patches, so it must be a multiple of {spatial * patch}")


def frame_indices(frames, total: int) -> list[int]:
    """``frames`` (None: all) of a video of ``total`` decoded frames, checked."""
    idx = list(range(total)) if frames is None else [int(i) for i in frames]
    bad = [i for i in idx if not 0 <= i < total]
    if bad:
        raise ValueError(f"frames {bad} are outside a video of {total} frames")
    return idx


def load_tokenizer(pretrained: str, subfolder: str = "tokenizer"):
    from transformers import AutoTokenizer

    if is_local(pretrained):
        folder = Path(os.path.expanduser(pretrained)) / subfolder
        expected = ["tokenizer.json", "vocab.json + merges.txt", "spiece.model", "tokenizer_config.json"]
        if not folder.is_dir() or not any(folder.iterdir()):
            raise MissingWeightsError(f"no tokenizer in {folder}: expected one of {expected}")
        pretrained = str(Path(os.path.expanduser(pretrained)))
    try:
        return AutoTokenizer.from_pretrained(pretrained, subfolder=subfolder)
    except (OSError, EnvironmentError) as e:
        raise MissingWeightsError(f"could not load the tokenizer from {pretrained} ({subfolder}/): {e}") from e


def load_scheduler_config(pretrained: str, fallback: dict) -> dict:
    """``scheduler/scheduler_config.json`` of a pipeline when there is one, else ``fallback``."""
    if is_local(pretrained):
        p = Path(os.path.expanduser(pretrained)) / "scheduler" / "scheduler_config.json"
        return read_json(p) if p.is_file() else dict(fallback)
    try:
        from huggingface_hub import hf_hub_download

        return read_json(Path(hf_hub_download(pretrained, "scheduler_config.json", subfolder="scheduler")))
    except Exception:  # no scheduler file published (or offline): the family's training schedule
        return dict(fallback)


# ---------------------------------------------------------------------------------------------
# random-init tokenizer
# ---------------------------------------------------------------------------------------------
BYTE_TOKENIZER_VOCAB = 514  # 256 byte symbols, 256 end-of-word variants, bos, eos


def byte_level_clip_tokenizer(max_length: int = 77):
    """A real ``CLIPTokenizer`` over a generated byte-level vocabulary with no merges: every
    character is one token (ids < 514), bos/eos/padding behave as in CLIP. Used for random-init
    models, where no tokenizer files exist offline; the text encoder's vocab must hold 514 ids."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tok.model_max_length = max_length
    return tok


# ---------------------------------------------------------------------------------------------
# parameter counts on the meta device
# ---------------------------------------------------------------------------------------------
def count_params_on_meta(builders: dict[str, Callable[[], nn.Module]]) -> dict[str, int]:
    counts = {}
    for name, build in builders.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


def quiet_diffusers_config_warnings():
    """Published configs carry keys newer classes ignore (e.g. ``mid_block_type``); diffusers logs
    a warning per build. The warning says nothing the user can act on, so lower it to errors."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# the shared adapter base
# ---------------------------------------------------------------------------------------------
class DiffusersBackbone(Backbone):
    """Common machinery; subclasses build/load the parts and say how text is encoded and how
    latents decode."""

    #: hub id used when backbone.pretrained is not given
    hub_id: ClassVar[str] = ""
    #: tokens per prompt
    max_text_length: ClassVar[int] = 77
    #: the family's noise schedule when the pipeline publishes none
    scheduler_defaults: ClassVar[dict[str, Any]] = {}
    #: samplers that fit the prediction type
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "dpm++")
    #: the denoiser's folder in the diffusers pipeline layout
    denoiser_subfolder: ClassVar[str] = "unet"

    def __init__(self, *, denoiser: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                 scheduler_config: dict, options: dict | None = None, image_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.options = dict(options or {})
        self.negative_prompt = str(self.options.get("negative_prompt", ""))
        # Tokens per prompt: the family's length, capped by what this tokenizer and text encoder
        # hold (tiny and random-init models are shorter).
        limits = [type(self).max_text_length, getattr(tokenizer, "model_max_length", None),
                  getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)]
        self.max_text_length = min(int(n) for n in limits if isinstance(n, int) and 0 < n < 10**6)
        # Plain lists keep the encoders (text; image, for image-to-video families) out of the module
        # tree: .to()/.cuda() on the backbone leave them on the CPU; encode_prompts borrows the
        # compute device per call.
        self._text_encoder_slot: list[nn.Module | None] = [None if text_encoder is None else text_encoder.cpu().eval()]
        self._image_encoder_slot: list[nn.Module | None] = [None if image_encoder is None else image_encoder.cpu().eval()]
        self.freeze()
        for encoder in (text_encoder, image_encoder):
            if encoder is not None:
                encoder.requires_grad_(False)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "DiffusersBackbone":
        quiet_diffusers_config_warnings()
        dtype = resolve_dtype(cfg.dtype)
        options = dict(cfg.options or {})
        if options.get("tiny"):
            return cls.build_tiny(options, dtype)
        if cfg.random_init:
            config_dir = Path(os.path.expanduser(cfg.config_path)) if cfg.config_path else None
            if config_dir is not None and not config_dir.is_dir():
                raise MissingWeightsError(f"backbone.config_path={cfg.config_path!r} is not a folder of config JSONs")
            return cls.build_random(config_dir, options, dtype)
        return cls.load_pretrained(cfg.pretrained or cls.default_pretrained(options), options, dtype)

    @classmethod
    def default_pretrained(cls, options: dict) -> str:
        """The hub id loaded when backbone.pretrained is not given."""
        return cls.hub_id

    @classmethod
    def build_tiny(cls, options: dict, dtype: torch.dtype) -> "DiffusersBackbone":
        raise NotImplementedError

    @classmethod
    def build_random(cls, config_dir: Path | None, options: dict, dtype: torch.dtype) -> "DiffusersBackbone":
        raise NotImplementedError

    @classmethod
    def load_pretrained(cls, pretrained: str, options: dict, dtype: torch.dtype) -> "DiffusersBackbone":
        raise NotImplementedError

    @classmethod
    def component_builders(cls, config_dir: Path | None = None) -> dict[str, Callable[[], nn.Module]]:
        """name -> zero-argument builder of the real architecture (used on the meta device)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, defaults and parameter counts per component of the real configuration, built on
        the meta device (nothing is allocated). ``params`` is None when the configs are absent."""
        quiet_diffusers_config_warnings()
        from fastvader.backbones import _REGISTRY

        name = next((k for k, v in _REGISTRY.items() if v.endswith(":" + cls.__name__)), cls.family)
        info: dict[str, Any] = dict(name=name, family=cls.family, hub_id=cls.hub_id,
                                    prediction_type=cls.prediction_type, defaults=dict(cls.defaults),
                                    spatial_multiple=cls.spatial_multiple,
                                    default_lora_targets=list(cls.default_lora_targets))
        try:
            info["params"] = count_params_on_meta(cls.component_builders())
        except MissingWeightsError as e:
            info["params"] = None
            info["params_note"] = str(e)
        return info

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the diffusers pipeline layout this class loads (denoiser, vae/, text_encoder/,
        tokenizer/, scheduler/), e.g. to freeze a random-init model for later runs."""
        path = Path(path)
        if self.text_encoder is None and self.tokenizer is not None:
            raise RuntimeError("the text encoder was freed; rebuild the backbone before saving it")
        self.denoiser.save_pretrained(path / self.denoiser_subfolder)
        self.vae.save_pretrained(path / "vae")
        if self.tokenizer is not None:
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(str(path / "tokenizer"))
        if self.image_encoder is not None:
            self.image_encoder.save_pretrained(path / "image_encoder")
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        with open(path / "scheduler" / "scheduler_config.json", "w") as f:
            json.dump(self.scheduler_config, f, indent=1)
        return path

    # -- text ------------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> nn.Module | None:
        return self._text_encoder_slot[0]

    @property
    def image_encoder(self) -> nn.Module | None:
        """The conditioning images' encoder of image-to-video families (CLIP vision), else None."""
        return self._image_encoder_slot[0]

    def offload_text_encoder(self) -> None:
        """Move the text (and image) encoder to the CPU (where they live between calls anyway)."""
        for encoder in (self.text_encoder, self.image_encoder):
            if encoder is not None:
                encoder.to("cpu")

    @contextlib.contextmanager
    def borrowed(self, encoder: nn.Module):
        """The encoder on the compute device (see ``text_device``) for one call, then back on the
        CPU, even when the call fails; yields the device."""
        device = self.text_device()
        encoder.to(device)
        try:
            yield device
        finally:
            encoder.to("cpu")  # never left on the GPU between calls

    def free_text_encoder(self) -> None:
        """Drop the text encoder for good (e.g. Wan's 5.7B UMT5 once every prompt is cached)."""
        self._text_encoder_slot[0] = None

    def placeholder_embeddings(self, batch: int, dtype: torch.dtype) -> PromptEmbeddings:
        """(batch, max_text_length, text width) from the text encoder's configuration."""
        if self.text_encoder is None:
            raise RuntimeError(f"the {self.family} text encoder was freed; its width is unknown")
        width = self.text_encoder.config.hidden_size  # T5 configs map it to d_model
        cond = torch.empty(batch, self.max_text_length, width, device=self.device, dtype=dtype)
        return PromptEmbeddings(cond, torch.empty_like(cond))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_text_length, truncation=True,
                             return_attention_mask=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def run_text_encoder(self, encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, D) conditioning; CLIP families use the last hidden state."""
        return encoder(ids).last_hidden_state

    def text_device(self) -> torch.device:
        """Where encode_prompts runs: the denoiser's device, or the CPU with options.text_encoder_device=cpu."""
        if str(self.options.get("text_encoder_device", "compute")) == "cpu":
            return torch.device("cpu")
        return self.device

    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None,
                       num_frames: int | None = None) -> PromptEmbeddings:
        """Text-to-video families: the prompts' text embeddings; a conditioning image is refused."""
        if images is not None:
            raise ValueError(f"backbone {self.family!r} is text-to-video: its prompts take no conditioning image")
        return self.encode_text(prompts)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """The prompts' and the negative prompt's text embeddings (cond, uncond)."""
        encoder = self.text_encoder
        if encoder is None:
            raise RuntimeError(f"the {self.family} text encoder was freed (free_text_encoder()); encode every "
                               "prompt before freeing it, or rebuild the backbone")
        prompts = list(prompts)
        ids, mask = self.tokenize(prompts + [self.negative_prompt])
        with self.borrowed(encoder) as device:
            emb = self.run_text_encoder(encoder, ids.to(device), mask.to(device))
        cond, uncond = emb[:-1], emb[-1:].expand(len(prompts), -1, -1)
        return PromptEmbeddings(cond.contiguous(), uncond.contiguous())

    # -- sampling --------------------------------------------------------------------------------
    def make_scheduler(self, name: str):
        if name not in self.samplers:
            raise ValueError(f"sampler.name={name!r} does not fit {self.family} ({self.prediction_type} "
                             f"prediction); use one of {list(self.samplers)}")
        from fastvader.training.sampling import make_scheduler

        return make_scheduler(name, self.scheduler_config)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def _batched_timestep(self, timestep, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or shaped ({batch},); got {tuple(t.shape)}")
        return t

    # -- decoding ---------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor, frames: Sequence[int] | None = None) -> torch.Tensor:
        """latents (B, C, f, h, w) -> pixels (B, len(frames), 3, H, W) in [0, 1]. ``frames``
        index decoded video frames (all when None); gradients flow when enabled."""
        raise NotImplementedError


class PerFrameVaeBackbone(DiffusersBackbone):
    """Families whose VAE is the image AutoencoderKL applied frame by frame (ModelScope,
    ZeroScope, AnimateDiff): latent frame i decodes to video frame i."""

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, num_frames: int, height: int, width: int):
        self.check_video_size(num_frames, height, width)
        s = self.vae_scale
        for name, v in (("video.height", height), ("video.width", width)):
            if v % s:
                raise ValueError(f"{name}={v} does not fit this {self.family} VAE: it must be a multiple of {s}")
        return (self.vae.config.latent_channels, num_frames, height // s, width // s)

    def decode_latents(self, latents, frames=None):
        B, C, F, h, w = latents.shape
        idx = list(range(F)) if frames is None else list(frames)
        bad = [i for i in idx if not 0 <= i < F]
        if bad:
            raise ValueError(f"frames {bad} are outside a video of {F} frames")
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents[:, :, idx].permute(0, 2, 1, 3, 4).reshape(B * len(idx), C, h, w)
        x = self.vae.decode(z.to(vae_dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return x.reshape(B, len(idx), *x.shape[1:])
