"""VideoCrafter2 (AILab-CVC, ``base_512_v2/model.ckpt``) as a fastvader backbone.

fastvader's own modules (no diffusers class exists for it): the LVDM 3D UNet (``unet.py``), the
SD KL-VAE as a diffusers AutoencoderKL speaking LDM key names (``vae.py``), the open_clip ViT-H
text tower (``text_encoder.py``) and LVDM's schedule (``schedule.py``). Together they hold
exactly the keys and shapes of the original ``LatentDiffusion`` state dict, so the released
checkpoint loads with strict key matching::

    backbone:
      name: videocrafter2
      pretrained: /models/VideoCrafter2/model.ckpt   # or a .safetensors, a folder, a hub id

Convert the pickled checkpoint once (safe to load, faster, optionally bf16)::

    from fastvader.backbones.videocrafter2 import convert_to_safetensors
    convert_to_safetensors("model.ckpt", "videocrafter2.safetensors")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from fastvader.backbones._weights import (CheckpointMismatchError, MissingWeightsError, check_state_dict,
                                          convert_file_to_safetensors, count_parameters, find_weights_file,
                                          materialize_meta_tensors, read_state_dict, resolve_dtype)
from fastvader.backbones.base import Backbone, PromptEmbeddings

from fastvader.backbones.videocrafter2.config import VideoCrafter2Config, load_yaml_config, tiny_config

__all__ = ["VideoCrafter2Backbone", "VideoCrafter2Config", "convert_to_safetensors", "expected_checkpoint_shapes",
           "MissingWeightsError", "CheckpointMismatchError"]

HUB_ID = "VideoCrafter/VideoCrafter2"
#: files looked for in a folder or hub repo, in this order
WEIGHT_CANDIDATES = ("model.safetensors", "model.ckpt", "base_512_v2/model.safetensors", "base_512_v2/model.ckpt")
_OPTIONS = {"tiny", "tokenizer", "fps", "local_files_only", "seed", "dropout_in_training"}


class LatentDiffusionLayout(nn.Module):
    """A view of the backbone's modules under the original ``LatentDiffusion`` names
    (``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``, root schedule
    buffers). It shares every tensor with the backbone: loading into it loads the backbone."""

    def __init__(self, backbone: "VideoCrafter2Backbone"):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = backbone.denoiser
        self.first_stage_model = backbone.vae
        self.cond_stage_model = backbone.text_encoder
        for name, buf in backbone.noise_schedule.named_buffers():
            self.register_buffer(name, buf)


class VideoCrafter2Backbone(Backbone):
    family = "videocrafter2"
    prediction_type = "epsilon"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    #: VADER's VideoCrafter2 settings (12 frames in training, 24 at inference)
    defaults = dict(frames=12, inference_frames=24, height=320, width=512, fps=24, sampler="ddim", steps=25,
                    eta=1.0, guidance_scale=12.0)
    spatial_multiple = 8

    def __init__(self, config: VideoCrafter2Config | None = None, *, tokenizer_source: str | None = None,
                 tiny: bool = False, fps: int = 24, local_files_only: bool = False,
                 dropout_in_training: bool = False):
        from fastvader.backbones.videocrafter2.schedule import LVDMNoiseSchedule
        from fastvader.backbones.videocrafter2.text_encoder import OpenCLIPTextEmbedder
        from fastvader.backbones.videocrafter2.unet import LVDMUNet3D
        from fastvader.backbones.videocrafter2.vae import build_vae

        super().__init__()
        self.config = config or VideoCrafter2Config()
        if self.config.diffusion.parameterization == "v":
            self.prediction_type = "v_prediction"  # type: ignore[misc]
        self.denoiser = LVDMUNet3D(self.config.unet)
        self.vae = build_vae(self.config.vae, self.config.diffusion.scale_factor)
        self.text_encoder = OpenCLIPTextEmbedder(self.config.text)
        self.noise_schedule = LVDMNoiseSchedule(self.config.diffusion)
        self.fps = int(fps)
        self._tiny = tiny
        self._tokenizer_source = tokenizer_source
        self._local_files_only = local_files_only
        # The UNet's own dropouts (0.1 in the temporal convs) stay off in train() unless asked:
        # VADER backpropagates through a sampling chain whose no-grad steps ran without them.
        self._base_dropouts = [] if dropout_in_training else [
            m for m in self.denoiser.modules() if isinstance(m, nn.Dropout)]
        self.freeze()
        self.eval()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "VideoCrafter2Backbone":
        """Build from a BackboneConfig. ``options``: ``tiny`` (the test-size architecture),
        ``tokenizer`` (folder or hub id of a CLIP BPE tokenizer), ``fps`` (conditioning, 24),
        ``local_files_only`` (never download), ``seed`` (random_init), ``dropout_in_training``."""
        options = dict(cfg.options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"backbone.options {unknown} are not videocrafter2 options; accepted: {sorted(_OPTIONS)}")
        tiny = bool(options.get("tiny", False))
        if tiny:
            arch = tiny_config()
        else:  # the released architecture: the packaged YAML unless config_path names another
            arch = load_yaml_config(os.path.expanduser(cfg.config_path) if cfg.config_path else None)
        kwargs = dict(tokenizer_source=options.get("tokenizer"), tiny=tiny, fps=int(options.get("fps", 24)),
                      local_files_only=bool(options.get("local_files_only", False)),
                      dropout_in_training=bool(options.get("dropout_in_training", False)))
        dtype = resolve_dtype(cfg.dtype)
        if cfg.random_init:
            with torch.random.fork_rng():
                torch.manual_seed(int(options.get("seed", 0)))
                model = cls(arch, **kwargs)
                # random weights everywhere, the original's zero-initialised output layers too:
                # otherwise the UNet outputs zeros and LoRA gradients vanish
                model.denoiser.randomize_zero_initialized_layers()
        else:
            path = find_weights_file(cfg.pretrained, family="videocrafter2", candidates=WEIGHT_CANDIDATES,
                                     default_hub_id=HUB_ID, local_files_only=kwargs["local_files_only"])
            model = cls.from_checkpoint(path, arch, **kwargs)
        return model.to(dtype)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, config: VideoCrafter2Config | None = None,
                        **kwargs) -> "VideoCrafter2Backbone":
        """Load a ``LatentDiffusion`` state dict (``.ckpt`` via ``torch.load(weights_only=True)``
        or ``.safetensors``) with strict key matching. The modules are built on the meta device
        and take the file's tensors directly, so the weights are never held twice."""
        state = read_state_dict(path)
        with torch.device("meta"):
            model = cls(config, **kwargs)
        model.load_checkpoint_state_dict(state, source=str(path), assign=True)
        return model

    def checkpoint_layout(self) -> LatentDiffusionLayout:
        return LatentDiffusionLayout(self)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the original checkpoint's layout (what ``model.ckpt`` holds)."""
        return self.checkpoint_layout().state_dict()

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "the state dict",
                                   assign: bool = False) -> None:
        """Strictly load an original-layout state dict; raises CheckpointMismatchError naming the
        first missing / unexpected / mis-shaped keys."""
        layout = self.checkpoint_layout()
        expected = {k: tuple(v.shape) for k, v in layout.state_dict().items()}
        check_state_dict(state, expected, family="videocrafter2", source=source)
        layout.load_state_dict(state, strict=True, assign=assign)
        for name in dict(self.noise_schedule.named_buffers()):
            self.noise_schedule._buffers[name] = layout._buffers[name]  # assign=True replaced them
        self.text_encoder.model.rebuild_buffers()
        left = materialize_meta_tensors(self)
        if left:
            raise CheckpointMismatchError(f"videocrafter2: {len(left)} tensors were not loaded: {left[:8]}")
        self.freeze()

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the original-layout state dict as safetensors (loads back with from_checkpoint)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.checkpoint_state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "family": "videocrafter2"})
        return Path(path)

    @classmethod
    def describe(cls, config: VideoCrafter2Config | None = None) -> dict[str, Any]:
        """Name, defaults and parameter counts per component, from the real architecture built
        on the meta device (no memory, no weights)."""
        with torch.device("meta"):
            model = cls(config)
        params = {"unet": count_parameters(model.denoiser), "vae": count_parameters(model.vae),
                  "text_encoder": count_parameters(model.text_encoder)}
        params["total"] = sum(params.values())
        return dict(name="videocrafter2", family=cls.family, prediction_type=model.prediction_type,
                    defaults=dict(cls.defaults), params=params,
                    weights=f"hub {HUB_ID} (model.ckpt) or a local model.ckpt / .safetensors",
                    notes="fastvader's own LVDM modules; the original checkpoint loads with strict key matching")

    # -- modes -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._base_dropouts:
            m.eval()
        return self

    # -- the interface the loop calls --------------------------------------------------------
    @property
    def tokenizer(self):
        if getattr(self.text_encoder, "tokenizer", None) is None:
            from fastvader.backbones.videocrafter2.text_encoder import make_tokenizer

            self.text_encoder.tokenizer = make_tokenizer(self.config.text, self._tokenizer_source, self._tiny,
                                                         self._local_files_only)
        return self.text_encoder.tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """(B, 77, 1024) penultimate-layer embeddings; ``uncond`` is the empty prompt (the
        original's ``uncond_type: empty_seq``)."""
        from fastvader.backbones.videocrafter2.text_encoder import tokenize

        prompts = list(prompts)
        tokens = tokenize(self.tokenizer, prompts + [""])
        emb = self.text_encoder.encode_tokens(tokens)
        cond, uncond = emb[:-1], emb[-1:].expand(len(prompts), -1, -1)
        return PromptEmbeddings(cond, uncond.contiguous())

    def placeholder_embeddings(self, batch: int, dtype: torch.dtype) -> PromptEmbeddings:
        """(batch, context_length, width) of the open_clip text tower, without its BPE tokenizer."""
        text = self.config.text
        cond = torch.empty(batch, text.context_length, text.width, device=self.device, dtype=dtype)
        return PromptEmbeddings(cond, torch.empty_like(cond))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        vae_factor = self.config.vae.downsample_factor
        unet_factor = self.denoiser.downsample_factor
        need = vae_factor * unet_factor
        for name, v in (("video.height", height), ("video.width", width)):
            if v % need:
                raise ValueError(f"{name}={v} does not fit videocrafter2: it must be a multiple of {need} "
                                 f"(the VAE downsamples by {vae_factor}, the UNet by {unet_factor} more); "
                                 f"try {max(need, round(v / need) * need)}")
        if num_frames < 1:
            raise ValueError(f"video.frames={num_frames} must be at least 1")
        return (self.config.vae.z_channels, num_frames, height // vae_factor, width // vae_factor)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                fps: torch.Tensor | int | None = None, **extra: torch.Tensor) -> torch.Tensor:
        """One UNet call with fps conditioning (``fps`` defaults to the backbone's, 24)."""
        dtype = self.denoiser.time_embed[0].weight.dtype
        return self.denoiser(latents.to(dtype), timestep, encoder_hidden_states.to(dtype),
                             fps=self.fps if fps is None else fps)

    def scheduler_config(self) -> dict:
        return self.noise_schedule.scheduler_config()

    def make_scheduler(self, name: str):
        """'ddim' is LVDM's DDIM with its ``use_scale`` step (exact); 'dpm++' and the others use
        the same noise schedule without the scale (close to, not exactly, the original)."""
        config = self.scheduler_config()
        scheduler = _make_scheduler(name, config)
        d = self.config.diffusion
        if name == "ddim" and d.use_scale:
            from fastvader.backbones.videocrafter2.ddim import LVDMScaledDDIMScheduler

            scheduler = LVDMScaledDDIMScheduler.from_ddim_config(scheduler.config, d.scale_b, d.fix_scale_bug)
        return scheduler

    def decode_latents(self, latents: torch.Tensor, frames: Sequence[int] | None = None) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> pixels (B, F', 3, H, W) in [0, 1] (frames: which to decode)."""
        if frames is not None:
            latents = latents[:, :, list(frames)]
        b, c, f, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * f, c, h, w) / self.vae.config.scaling_factor
        pixels = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).view(b, f, *pixels.shape[1:])


def _make_scheduler(name: str, config: dict):
    """The lead's ``fastvader.training.sampling.make_scheduler`` when present."""
    try:
        from fastvader.training.sampling import make_scheduler
    except ImportError:  # fastvader.training.sampling lands with the training loop; until then, diffusers directly
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        table = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
        if name not in table:
            raise ValueError(f"sampler.name={name!r}: videocrafter2 supports {sorted(table)}")
        return table[name].from_config(config)
    return make_scheduler(name, config)


def expected_checkpoint_shapes(config: VideoCrafter2Config | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape of the original checkpoint for this architecture (built on meta)."""
    with torch.device("meta"):
        model = VideoCrafter2Backbone(config)
    return {k: tuple(v.shape) for k, v in model.checkpoint_state_dict().items()}


def convert_to_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                           unsafe_pickle: bool = False, config: VideoCrafter2Config | None = None) -> Path:
    """One-time conversion of ``model.ckpt`` to safetensors, checked key by key against the
    architecture first. ``dtype=torch.bfloat16`` halves the file; ``unsafe_pickle`` only for a
    trusted file that ``weights_only`` loading refuses."""
    return convert_file_to_safetensors(ckpt, out, expected=expected_checkpoint_shapes(config), dtype=dtype,
                                       unsafe_pickle=unsafe_pickle, family="videocrafter2")
