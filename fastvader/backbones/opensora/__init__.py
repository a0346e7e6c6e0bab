"""Open-Sora 1.2 as a fastvader backbone: STDiT3-XL/2 + OpenSoraVAE_V1_2 + T5-XXL, rectified flow.

fastvader's own modules (no diffusers class exists): ``stdit3.py`` and ``vae.py`` hold exactly
the parameter names and shapes of the released checkpoints, which load with strict key
matching::

    backbone:
      name: opensora
      pretrained: hpcai-tech/OpenSora-STDiT-v3      # or a file / folder
      options:
        vae: hpcai-tech/OpenSora-VAE-v1.2           # or a file / folder
        text_encoder: DeepFloyd/t5-v1_1-xxl         # loaded per prompt set, then freed

A folder holding ``stdit/model.safetensors`` and ``vae/model.safetensors`` (what
:meth:`OpenSoraBackbone.save_checkpoint` writes) works as ``pretrained`` alone.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from fastvader.backbones._weights import (CheckpointMismatchError, MissingWeightsError, check_state_dict,
                                          convert_file_to_safetensors, count_parameters, find_weights_file,
                                          materialize_meta_tensors, read_state_dict, resolve_dtype)
from fastvader.backbones.base import Backbone, PromptEmbeddings

from fastvader.backbones.opensora.config import OpenSoraConfig, load_json_configs, tiny_config

__all__ = ["OpenSoraBackbone", "OpenSoraConfig", "convert_to_safetensors", "MissingWeightsError",
           "CheckpointMismatchError"]

STDIT_HUB_ID = "hpcai-tech/OpenSora-STDiT-v3"
VAE_HUB_ID = "hpcai-tech/OpenSora-VAE-v1.2"
STDIT_CANDIDATES = ("model.safetensors", "stdit/model.safetensors", "pytorch_model.bin", "stdit/pytorch_model.bin")
VAE_CANDIDATES = ("model.safetensors", "vae/model.safetensors", "pytorch_model.bin", "vae/pytorch_model.bin")
VAE_CANDIDATES_IN_FOLDER = ("vae/model.safetensors", "vae/pytorch_model.bin")
_OPTIONS = {"tiny", "vae", "text_encoder", "text_encoder_device", "keep_text_encoder", "fps",
            "local_files_only", "seed"}


class OpenSoraBackbone(Backbone):
    family = "opensora"
    #: diffusers' flow convention (velocity = noise - x0); Open-Sora's own sign is flipped in denoise
    prediction_type = "flow"
    default_lora_targets = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"]
    #: Open-Sora 1.2's sampling (rflow, 30 steps, CFG 7) at 240p 9:16 and 2 s (51 frames) at 24 fps
    defaults = dict(frames=51, height=240, width=424, fps=24, sampler="euler_flow", steps=30, guidance_scale=7.0)
    spatial_multiple = 8

    def __init__(self, config: OpenSoraConfig | None = None, *, fps: int = 24, local_files_only: bool = False,
                 text_encoder_device: str | None = None, keep_text_encoder: bool = False, seed: int = 0):
        from fastvader.backbones.opensora.stdit3 import STDiT3
        from fastvader.backbones.opensora.text_encoder import T5TextEncoder
        from fastvader.backbones.opensora.vae import OpenSoraVAE

        super().__init__()
        self.config = config or OpenSoraConfig()
        self.denoiser = STDiT3(self.config.stdit)
        self.vae = OpenSoraVAE(self.config.vae)
        # plain attribute, not a submodule: see T5TextEncoder
        self.__dict__["text_encoder"] = T5TextEncoder(self.config.text, local_files_only=local_files_only,
                                                      free_after_encode=not keep_text_encoder,
                                                      device=text_encoder_device, seed=seed)
        self.fps = int(fps)
        d = self.defaults
        self.video_size = (d["frames"], d["height"], d["width"])
        self._schedulers: weakref.WeakSet = weakref.WeakSet()
        self.freeze()
        self.eval()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "OpenSoraBackbone":
        """``options``: ``tiny``, ``vae`` (VAE weights: file, folder or hub id), ``text_encoder``
        (T5 folder or hub id), ``text_encoder_device`` (e.g. cpu), ``keep_text_encoder``,
        ``fps`` (24), ``local_files_only``, ``seed``. ``config_path`` (random_init): a folder with
        the four Open-Sora JSON files (the packaged ones: fastvader/model_configs/opensora_v1.2)."""
        options = dict(cfg.options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"backbone.options {unknown} are not opensora options; accepted: {sorted(_OPTIONS)}")
        tiny = bool(options.get("tiny", False))
        if tiny:
            arch = tiny_config()
        else:  # the released architecture: the packaged JSON files unless config_path names others
            arch = load_json_configs(os.path.expanduser(cfg.config_path) if cfg.config_path else None)
        if options.get("text_encoder"):
            arch.text.source = str(options["text_encoder"])
            arch.text.t5_config = None
        local = bool(options.get("local_files_only", False))
        kwargs = dict(fps=int(options.get("fps", 24)), local_files_only=local,
                      text_encoder_device=options.get("text_encoder_device"),
                      keep_text_encoder=bool(options.get("keep_text_encoder", False)),
                      seed=int(options.get("seed", 0)))
        dtype = resolve_dtype(cfg.dtype)
        if cfg.random_init:
            with torch.random.fork_rng():
                torch.manual_seed(kwargs["seed"])
                model = cls(arch, **kwargs)
        else:
            stdit = find_weights_file(cfg.pretrained, family="opensora (STDiT3)", candidates=STDIT_CANDIDATES,
                                      default_hub_id=STDIT_HUB_ID, local_files_only=local)
            vae_source, vae_candidates = options.get("vae"), VAE_CANDIDATES
            folder = Path(os.path.expanduser(cfg.pretrained)) if cfg.pretrained else None
            if vae_source is None and folder is not None and (folder / "vae").is_dir():
                # a folder with stdit/ and vae/ (save_checkpoint's layout): only its vae/ counts,
                # never the STDiT's own model.safetensors next to it
                vae_source, vae_candidates = str(folder), VAE_CANDIDATES_IN_FOLDER
            vae = find_weights_file(vae_source, family="opensora (VAE)", candidates=vae_candidates,
                                    default_hub_id=VAE_HUB_ID, local_files_only=local)
            model = cls.from_checkpoints(stdit, vae, arch, **kwargs)
        return model.to(dtype)

    @classmethod
    def from_checkpoints(cls, stdit_path, vae_path, config: OpenSoraConfig | None = None,
                         **kwargs) -> "OpenSoraBackbone":
        """Strictly load both released state dicts into modules built on the meta device."""
        with torch.device("meta"):
            model = cls(config, **kwargs)
        model.load_state_dicts(read_state_dict(stdit_path), read_state_dict(vae_path),
                               sources=(str(stdit_path), str(vae_path)), assign=True)
        return model

    def load_state_dicts(self, stdit: dict, vae: dict, *, sources=("the STDiT3 state dict", "the VAE state dict"),
                         assign: bool = False) -> None:
        if "rope.freqs" not in stdit:
            # a frozen, deterministic parameter that a transformers-format export may leave out
            # (from_pretrained would only warn): recompute it rather than refuse the file
            from fastvader.backbones.opensora.stdit3 import RotaryEmbedding

            stdit = {**stdit, "rope.freqs": RotaryEmbedding(self.config.stdit.head_dim).freqs.detach()}
        for module, state, source, family in ((self.denoiser, stdit, sources[0], "opensora (STDiT3)"),
                                              (self.vae, vae, sources[1], "opensora (VAE)")):
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            check_state_dict(state, expected, family=family, source=source)
            module.load_state_dict(state, strict=True, assign=assign)
        left = materialize_meta_tensors(self)
        if left:
            raise CheckpointMismatchError(f"opensora: {len(left)} tensors were not loaded: {left[:8]}")
        self.freeze()

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """``folder/stdit/model.safetensors`` and ``folder/vae/model.safetensors`` in the released layouts."""
        from safetensors.torch import save_file

        folder = Path(folder)
        for name, module in (("stdit", self.denoiser), ("vae", self.vae)):
            (folder / name).mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                      str(folder / name / "model.safetensors"), metadata={"format": "pt"})
        return folder

    @classmethod
    def describe(cls, config: OpenSoraConfig | None = None) -> dict[str, Any]:
        with torch.device("meta"):
            model = cls(config)
        from transformers import T5Config, T5EncoderModel

        with torch.device("meta"):
            t5 = T5EncoderModel(T5Config(**(config or OpenSoraConfig()).text.architecture()))
        params = {"stdit3": count_parameters(model.denoiser), "vae": count_parameters(model.vae),
                  "text_encoder": count_parameters(t5)}
        params["total"] = sum(params.values())
        return dict(name="opensora", family=cls.family, prediction_type=cls.prediction_type,
                    defaults=dict(cls.defaults), params=params,
                    weights=f"hub {STDIT_HUB_ID} + {VAE_HUB_ID} (+ DeepFloyd/t5-v1_1-xxl, loaded per prompt set)",
                    notes="text_encoder: T5 v1.1 XXL encoder, loaded only to encode prompts, then freed")

    # -- the interface the loop calls --------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """T5 features (B, 300, 4096) and mask; ``uncond`` is the model's learned null caption
        (``y_embedder.y_embedding``), masked like the prompt as in Open-Sora's sampler."""
        device = self.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cond, mask = self.text_encoder.encode(list(prompts), device, dtype)
        null = self.denoiser.y_embedder.y_embedding
        uncond = null[None].expand(len(prompts), -1, -1).to(device=cond.device, dtype=cond.dtype)
        return PromptEmbeddings(cond, uncond.contiguous(), {"mask": mask.to(cond.device)})

    def placeholder_embeddings(self, batch: int, dtype: torch.dtype) -> PromptEmbeddings:
        """T5 features (batch, max_length, caption_channels) and a mask that keeps every token (the
        most the caption cross-attention can see), without loading T5."""
        length, width = self.config.text.max_length, self.config.stdit.caption_channels
        cond = torch.empty(batch, length, width, device=self.device, dtype=dtype)
        mask = torch.ones(batch, length, dtype=torch.long, device=self.device)
        return PromptEmbeddings(cond, torch.empty_like(cond), {"mask": mask})

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_video_size(num_frames, height, width)
        if num_frames < 1:
            raise ValueError(f"video.frames={num_frames} must be at least 1")
        self.video_size = (num_frames, height, width)
        for scheduler in list(self._schedulers):  # the flow shift follows the video size
            scheduler.set_shift(self._shift())
        f = self.vae.config.spatial_factor
        return (self.config.vae.temporal.in_out_channels, self.vae.latent_frames(num_frames), height // f, width // f)

    def num_video_frames(self, latent_frames: int) -> int:
        frames = self.video_size[0]
        if self.vae.latent_frames(frames) != latent_frames:
            raise ValueError(f"{latent_frames} latent frames do not match the video size last given to latent_shape "
                             f"({frames} frames)")
        return frames

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                mask: torch.Tensor | None = None, fps: torch.Tensor | int | None = None,
                **extra: torch.Tensor) -> torch.Tensor:
        """Velocity in diffusers' convention (noise - x0), i.e. minus STDiT3's first 4 channels."""
        _, height, width = self.video_size
        out = self.denoiser(latents, timestep, encoder_hidden_states, mask=mask, fps=self.fps if fps is None else fps,
                            height=height, width=width)
        return -out[:, : self.config.stdit.in_channels].to(latents.dtype)

    def _shift(self) -> float:
        from fastvader.backbones.opensora.scheduler import opensora_shift

        return opensora_shift(*self.video_size)

    def make_scheduler(self, name: str):
        if name != "euler_flow":
            raise ValueError(f"sampler.name={name!r}: opensora is a rectified-flow model; use euler_flow")
        from fastvader.backbones.opensora.scheduler import OpenSoraFlowScheduler

        scheduler = OpenSoraFlowScheduler(num_train_timesteps=1000, shift=self._shift())
        self._schedulers.add(scheduler)
        return scheduler

    def decode_frames(self, latents: torch.Tensor, frames: Sequence[int] | None = None,
                      grad_frames: Sequence[int] | None = None, chunk: int = 1) -> torch.Tensor:
        """The loop's decode for a temporally compressed VAE: latents (B, 4, T_lat, h, w) ->
        pixels (B, len(frames), 3, H, W) in [0, 1]. The cheap temporal decode runs on the chunks
        that hold the wanted frames; the expensive spatial decode only on those frames, with
        gradients (checkpointed) only for ``grad_frames``."""
        from torch.utils.checkpoint import checkpoint

        num_frames = self.num_video_frames(latents.shape[2])
        frames = list(range(num_frames)) if frames is None else list(frames)
        grad_set = set(frames if grad_frames is None else grad_frames)
        need_grad = torch.is_grad_enabled() and bool(grad_set)
        with torch.set_grad_enabled(need_grad):
            z2d = self.vae.decode_temporal(latents, num_frames, frames)  # dict frame -> (B, 4, h, w)
        spatial = self.vae.spatial_vae
        out = []
        for f in frames:
            z = z2d[f][:, :, None]
            if f in grad_set and need_grad:
                x = checkpoint(spatial.decode, z, use_reentrant=False)
            else:
                with torch.no_grad():
                    x = spatial.decode(z.detach())
            out.append(((x[:, :, 0].float() + 1) / 2).clamp(0, 1))
        return torch.stack(out, dim=1)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, part: str,
                           dtype: torch.dtype | None = None, unsafe_pickle: bool = False) -> Path:
    """Convert an Open-Sora ``.bin``/``.pt`` state dict (``part``: 'stdit' or 'vae') to safetensors,
    checked key by key against the real architecture first."""
    from fastvader.backbones.opensora.stdit3 import STDiT3
    from fastvader.backbones.opensora.vae import OpenSoraVAE

    if part not in ("stdit", "vae"):
        raise ValueError("part must be 'stdit' or 'vae'")
    with torch.device("meta"):
        module = STDiT3() if part == "stdit" else OpenSoraVAE()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return convert_file_to_safetensors(src, dst, expected=expected, dtype=dtype, unsafe_pickle=unsafe_pickle,
                                       nested_key=None, family=f"opensora ({part})")
