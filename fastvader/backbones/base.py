"""The interface between the training loop and a text- or image-to-video model.

The loop never touches a model family's classes directly: it encodes prompts once, calls
``denoise`` inside the sampler, hands latents to ``decode_frames`` with ``backbone.vae``, and
injects LoRA into ``backbone.denoiser``. Each family (ModelScope, VideoCrafter2, AnimateDiff,
Wan, Open-Sora, the embedded toy world) is one adapter implementing this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn


@dataclass
class PromptEmbeddings:
    """The conditioning of a batch of prompts. ``uncond`` is the empty-prompt embedding used by
    classifier-free guidance (same shape as ``cond``); ``extra`` holds anything else a family
    needs (attention masks, pooled embeddings, a conditioning image's latents), batched along
    dim 0 like ``cond``. ``uncond_extra`` holds the unconditional branch's values of the
    ``extra`` keys whose values differ there (SVD guides against zero image latents); the other
    keys take ``extra``'s values in both branches."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    uncond_extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def _map(self, fn) -> "PromptEmbeddings":
        return PromptEmbeddings(fn(self.cond), None if self.uncond is None else fn(self.uncond),
                                {k: fn(v) for k, v in self.extra.items()},
                                {k: fn(v) for k, v in self.uncond_extra.items()})

    def to(self, device=None, dtype=None) -> "PromptEmbeddings":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, index: torch.Tensor | list[int]) -> "PromptEmbeddings":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.cond.device)
        return self._map(lambda t: t[idx.to(t.device)])

    @classmethod
    def cat(cls, rows: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        """The rows (each a batch of prompts) as one batch, in order."""
        first = rows[0]
        return cls(torch.cat([r.cond for r in rows]),
                   None if first.uncond is None else torch.cat([r.uncond for r in rows]),
                   {k: torch.cat([r.extra[k] for r in rows]) for k in first.extra},
                   {k: torch.cat([r.uncond_extra[k] for r in rows]) for k in first.uncond_extra})

    def guided_extra(self) -> dict[str, torch.Tensor]:
        """``extra`` for a classifier-free-guidance batch: the unconditional rows, then the
        conditional ones."""
        return {k: torch.cat([self.uncond_extra.get(k, v), v]) for k, v in self.extra.items()}


class Backbone(nn.Module):
    """A text- or image-to-video diffusion model as fastvader trains it.

    Subclasses set the class attributes and implement the four methods. ``denoiser`` is the
    module LoRA is injected into; ``vae`` and ``text_encoder`` stay frozen.
    """

    family: ClassVar[str] = "base"
    #: what ``denoise`` predicts: "epsilon", "v_prediction" or "flow" (velocity, rectified flow)
    prediction_type: ClassVar[str] = "epsilon"
    #: module-name patterns LoRA targets by default (peft ``target_modules``)
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    #: whether its weights may come from the Hugging Face Hub (the embedded world's never do)
    hub_weights: ClassVar[bool] = True
    #: the defaults a preset starts from (resolution, frames, sampler, guidance)
    defaults: ClassVar[dict[str, Any]] = {}
    #: height and width must be multiples of this (VAE downsampling x patch size)
    spatial_multiple: ClassVar[int] = 8
    #: ``from_config(cfg, storage=...)`` builds the denoiser straight into fp8 storage
    #: (fastvader.memory.fp8); other families are built, then converted
    streams_weights: ClassVar[bool] = False
    #: what a prompt conditions on: "text" (text-to-video), "text+image" (image-to-video with a
    #: text prompt: the first frame is given) or "image" (image-to-video without text: SVD)
    conditioning: ClassVar[str] = "text"

    @classmethod
    def from_config(cls, cfg) -> "Backbone":
        """Build from a BackboneConfig: pretrained weights (hub id or local path) or, with
        ``random_init``, the real architecture with random weights."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``fastvader models`` lists: defaults and parameters per component (subclasses
        count them from the real configuration on the meta device)."""
        return {"name": cls.family, "family": cls.family, "prediction_type": cls.prediction_type,
                "defaults": dict(cls.defaults), "params": None}

    @classmethod
    def check_video_size(cls, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError naming what to change when a video size does not fit the model."""
        m = cls.spatial_multiple
        for name, v in (("video.height", height), ("video.width", width)):
            if v % m:
                raise ValueError(f"{name}={v} does not fit {cls.family}: it must be a multiple of {m} "
                                 f"(try {max(m, round(v / m) * m)})")

    denoiser: nn.Module
    vae: nn.Module

    # -- the four things the loop calls --------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None,
                       num_frames: int | None = None) -> PromptEmbeddings:
        """Embed prompts (and the empty prompt for guidance). Called once per prompt set; the
        loop caches the result, so the text encoder may be offloaded afterwards. Image-to-video
        families also take ``images``: (N, 3, H, W) in [0, 1] at the video's size, one
        conditioning image per prompt, and the video's ``num_frames`` (text-to-video families
        take neither)."""
        raise NotImplementedError

    def placeholder_embeddings(self, batch: int, dtype: torch.dtype) -> PromptEmbeddings:
        """Conditioning shaped like ``encode_prompts`` of ``batch`` prompts, on the denoiser's
        device, without running the text encoder (values unspecified). The memory planner measures
        with it on the meta device, where hub tokenizers and multi-GB text encoders cannot run.
        The default encodes empty prompts; families with a large or downloaded text encoder
        give the shapes from their configuration."""
        return self.encode_prompts([""] * batch).to(self.device, dtype)

    def placeholder_conditioning(self, batch: int, dtype: torch.dtype,
                                 latent_shape: tuple[int, int, int, int]) -> PromptEmbeddings:
        """``placeholder_embeddings`` and, for image-to-video families, what a conditioning image
        adds for latents of ``latent_shape`` (values unspecified): what the planner conditions on."""
        return self.placeholder_embeddings(batch, dtype)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, latent_frames, latent_height, latent_width) for a video of this size.
        Raises ValueError naming what to change when the size does not fit the model."""
        raise NotImplementedError

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """One denoiser call on latents (B, C, f, h, w); returns a prediction of the same shape."""
        raise NotImplementedError

    def make_scheduler(self, name: str):
        """A diffusers scheduler of the given family ('ddim', 'dpm++', 'euler', 'euler_flow')
        configured for this model's training noise schedule."""
        raise NotImplementedError

    def guidance_scales(self, guidance_scale: float, latent_frames: int) -> float | torch.Tensor:
        """The classifier-free guidance weight the sampler applies: ``guidance_scale`` itself,
        or per latent frame, shaped (1, 1, latent_frames, 1, 1), for families whose pipeline
        ramps it over the frames (SVD)."""
        return guidance_scale

    def decode_frames(self, latents: torch.Tensor, frames: Sequence[int] | None = None,
                      grad_frames: Sequence[int] | None = None, chunk: int = 1) -> torch.Tensor:
        """The loop's decode: latents (B, C, f, h, w) -> pixels (B, len(frames), 3, H, W) in
        [0, 1], gradients only through ``grad_frames``, ``chunk`` decode units checkpointed at a
        time. The default serves every diffusers VAE (``fastvader.memory.decode``); families
        with their own VAE override it."""
        from fastvader.memory.decode import decode_frames

        return decode_frames(self.vae, latents, frames, grad_frames, chunk=chunk)

    # -- helpers shared by all families --------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Everything but the denoiser: never trained, never holding gradients."""
        return [m for name, m in self.named_children() if name != "denoiser"]

    def freeze(self) -> "Backbone":
        """No gradients for any base weight, and eval mode: dropout inside the pretrained
        model would make sampling random (LoRA's own dropout is switched back on by add_lora)."""
        self.requires_grad_(False)
        self.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def num_video_frames(self, latent_frames: int) -> int:
        """Decoded frames for a latent video of ``latent_frames`` (1:1 for per-frame VAEs)."""
        return latent_frames
