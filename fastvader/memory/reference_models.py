"""Real architectures from the packaged config files, random weights: what the planner's tests and
the GPU suite measure when the full backbone/reward adapters are not registered.

- ``modelscope_arch`` backbone: ModelScope T2V 1.7B's UNet3DConditionModel and SD AutoencoderKL
  from ``modelscope_t2v_1.7b/*_config.json``. Text conditioning is a fixed random embedding of
  the real shape (77 x 1024): the text encoder runs once per prompt and leaves the GPU, so it
  does not enter the step's memory or time.
- ``aesthetic_arch`` reward: CLIP ViT-L/14's vision tower + projection (openai config) and the
  LAION aesthetic MLP (768-1024-128-64-16-1), random weights, with CLIP's resize/normalise done
  differentiably. Stand-in for ``aesthetic`` when that reward is not registered.

Importing this module registers both names. Config files are read from ``backbone.config_path``
(a folder in the layout of ``fastvader.model_configs``), else from the packaged copies.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.backbones import register_backbone
from fastvader.backbones.base import Backbone, PromptEmbeddings
from fastvader.backbones.modelscope import MODELSCOPE_SCHEDULER
from fastvader.model_configs import ROOT as PACKAGED_CONFIGS
from fastvader.rewards.base import REWARDS, Reward, register_reward


def model_configs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` when it is a folder, else the packaged model configs."""
    if explicit and Path(explicit).is_dir():
        return Path(explicit)
    return PACKAGED_CONFIGS


def _read(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


class ModelScopeArch(Backbone):
    family = "modelscope_arch"
    prediction_type = "epsilon"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 8
    defaults = dict(frames=16, height=384, width=384, sampler="ddim", steps=25, guidance_scale=9.0)

    def __init__(self, unet: nn.Module, vae: nn.Module, context_dim: int, seed: int = 0):
        super().__init__()
        self.denoiser, self.vae = unet, vae
        self.context_dim = context_dim
        self.seed = seed
        self.freeze()

    @classmethod
    def from_config(cls, cfg) -> "ModelScopeArch":
        from diffusers import AutoencoderKL, UNet3DConditionModel

        folder = model_configs_dir(cfg.config_path if cfg.config_path and Path(cfg.config_path).is_dir() else None)
        ms = folder / "modelscope_t2v_1.7b"
        seed = int(cfg.options.get("seed", 0))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            unet = UNet3DConditionModel.from_config(_read(ms / "unet_config.json"))
            vae = AutoencoderKL.from_config(_read(ms / "vae_config.json"))
        return cls(unet, vae, unet.config.cross_attention_dim, seed)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        device = next(self.denoiser.parameters()).device
        rows = []
        for p in prompts:  # a fixed random embedding per prompt text (stable across runs)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, p)))
            rows.append(torch.randn(77, self.context_dim, generator=g))
        uncond = torch.randn(77, self.context_dim, generator=torch.Generator().manual_seed(self.seed))
        cond = torch.stack(rows).to(device)
        return PromptEmbeddings(cond, uncond.to(device).expand(len(prompts), -1, -1).contiguous())

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        return (self.vae.config.latent_channels, num_frames, height // 8, width // 8)

    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        dtype = next(self.denoiser.parameters()).dtype
        t = timestep.expand(latents.shape[0]) if timestep.dim() else timestep.repeat(latents.shape[0])
        out = self.denoiser(latents.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype),
                            return_dict=False)[0]
        return out.to(latents.dtype)

    def make_scheduler(self, name: str):
        from fastvader.training.sampling import make_scheduler

        return make_scheduler(name, MODELSCOPE_SCHEDULER)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticArch(Reward):
    """LAION aesthetic score on CLIP ViT-L/14 image embeddings (architecture only, random
    weights unless a state dict is loaded): resize the short side to 224, centre-crop,
    normalise, embed, L2-normalise, MLP."""

    name = "aesthetic_arch"

    def __init__(self, config_path: str | None = None, seed: int = 0):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        folder = model_configs_dir(config_path)
        clip = json.loads((folder / "clip_hf" / "openai_clip-vit-large-patch14_config.json").read_text())
        vision = {k: v for k, v in clip["vision_config"].items() if not k.startswith("_")}
        vision["projection_dim"] = clip.get("projection_dim", 768)
        head = json.loads((folder / "reward_models" / "laion_aesthetic_predictor_mlp.json").read_text())
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
            layers = [nn.Linear(l["in_features"], l["out_features"]) if l["type"] == "Linear" else nn.Dropout(l["p"])
                      for l in head["layers"]]
            self.layers = nn.Sequential(*layers)
        self.size = vision.get("image_size", 224)
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def score_frames(self, frames, prompts):
        b, f = frames.shape[:2]
        x = frames.flatten(0, 1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        x = (x - self.mean.to(x)) / self.std.to(x)
        dtype = next(self.clip.parameters()).dtype
        emb = self.clip(pixel_values=x.to(dtype)).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.layers(emb).float().view(b, f)


register_backbone("modelscope_arch", "fastvader.memory.reference_models:ModelScopeArch")
if "aesthetic_arch" not in REWARDS:
    register_reward(AestheticArch)
