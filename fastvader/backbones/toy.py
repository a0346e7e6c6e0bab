"""The embedded world as a Backbone: what `make demo` and most tests align."""
from __future__ import annotations

from typing import Sequence

import torch

from fastvader.backbones.base import Backbone, PromptEmbeddings


class ToyBackbone(Backbone):
    family = "toy"
    prediction_type = "epsilon"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    hub_weights = False
    spatial_multiple = 4
    defaults = dict(frames=8, height=32, width=32, sampler="ddim", steps=25, guidance_scale=7.5)

    def __init__(self, world):
        super().__init__()
        self.world = world.config
        self.tokenizer = world.tokenizer
        self.text_encoder = world.text_encoder
        self.denoiser = world.unet
        self.vae = world.vae
        self.freeze()

    @classmethod
    def from_config(cls, cfg) -> "ToyBackbone":
        from fastvader.toy.model import build_toy_world, load_toy_world

        if cfg.random_init:
            return cls(build_toy_world(seed=int(cfg.options.get("seed", 0))))
        return cls(load_toy_world(cfg.pretrained))

    @classmethod
    def describe(cls):
        from fastvader.toy.model import ToyWorldConfig, build_toy_world

        with torch.device("meta"):
            world = build_toy_world(ToyWorldConfig())
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {**super().describe(), "params": {"unet": count(world.unet), "vae": count(world.vae),
                                                 "text_encoder": count(world.text_encoder)}}

    @classmethod
    def check_video_size(cls, num_frames, height, width):
        """The world's frame positions (ToyWorldConfig.frames) bound the video length."""
        from fastvader.toy.model import ToyWorldConfig

        super().check_video_size(num_frames, height, width)
        most = ToyWorldConfig().frames
        if num_frames > most:
            raise ValueError(f"video.frames={num_frames} does not fit toy: the embedded world's frame positions "
                             f"cover {most} frames; set video.frames <= {most}")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(list(prompts) + [""]).to(device)
        emb = self.text_encoder(ids)
        cond, uncond = emb[:-1], emb[-1:].expand(len(prompts), -1, -1)
        return PromptEmbeddings(cond, uncond.contiguous())

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        return (self.vae.config.latent_channels, num_frames, height // 4, width // 4)

    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        return self.denoiser(latents, timestep, encoder_hidden_states=encoder_hidden_states,
                             return_dict=False)[0]

    def make_scheduler(self, name: str):
        from fastvader.training.sampling import make_scheduler

        return make_scheduler(name, self.world.scheduler)
