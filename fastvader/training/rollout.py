"""VADER's forward pass: prompts and noise -> sample (gradients through the last K denoising
steps) -> decode the chosen frames -> reward. :meth:`Rollout.__call__` does it for one training
micro-batch; :meth:`Rollout.sample_videos` and :meth:`Rollout.score` sample whole videos without
gradients, for validation, ``fastvader sample`` and ``fastvader eval``."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from fastvader.backbones import Backbone
from fastvader.config import TrainConfig
from fastvader.lora import adapters_disabled
from fastvader.memory.offload import FrozenPlacement
from fastvader.rewards import Reward
from fastvader.training.draws import BatchDraws
from fastvader.training.frames import FrameSelector
from fastvader.training.prompts import PromptCache, prompt_label
from fastvader.training.sampling import Sampler, StepWrapper, TruncationPolicy


def autocast_for(device: torch.device, amp_dtype: torch.dtype) -> Callable[[], ContextManager]:
    """torch's autocast at ``amp_dtype`` (none for fp32)."""
    return lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def embed_prompts_up_front(cache: PromptCache, backbone: Backbone, prompts: list[str], device: torch.device) -> None:
    """Embed a finite prompt pool once; on a GPU the text encoder then leaves it."""
    if len(prompts) > 4096:
        return
    cache.warm(prompts)
    if device.type == "cuda":
        offload = getattr(backbone, "offload_text_encoder", None)
        text_encoder = getattr(backbone, "text_encoder", None)
        if offload is not None:
            offload()
        elif isinstance(text_encoder, torch.nn.Module):
            text_encoder.to("cpu")


@dataclass
class Rollout:
    backbone: Backbone
    sampler: Sampler
    prompt_cache: PromptCache
    frozen: FrozenPlacement
    autocast: Callable[[], ContextManager]
    latent_shape: tuple[int, ...]
    truncation: TruncationPolicy
    frames: FrameSelector
    #: None for a rollout that only samples (``fastvader sample``)
    reward: Reward | None = None
    decode_chunk: int = 1
    #: progress bars on whole-video sampling (validation, sample, eval); only on a terminal
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: TrainConfig, backbone: Backbone, reward: Reward | None, device: torch.device,
                    weight_dtype: torch.dtype, autocast: Callable[[], ContextManager],
                    grad_step_wrapper: StepWrapper | None = None) -> "Rollout":
        """The pieces a config names around models already on ``device``."""
        s, v = cfg.sampler, cfg.video
        return cls(backbone=backbone,
                   sampler=Sampler(backbone, s.name, s.steps, s.guidance_scale, s.eta, grad_step_wrapper),
                   prompt_cache=PromptCache(backbone, device, weight_dtype, (v.frames, v.height, v.width)),
                   frozen=FrozenPlacement([backbone.vae, reward], device, cfg.memory.frozen_placement),
                   autocast=autocast,
                   latent_shape=backbone.latent_shape(v.frames, v.height, v.width),
                   truncation=TruncationPolicy.parse(s.truncation, s.steps),
                   frames=FrameSelector(cfg.frames.reward, cfg.frames.grad, v.frames),
                   reward=reward, decode_chunk=cfg.memory.decode_chunk,
                   progress=cfg.train.progress)

    @property
    def device(self) -> torch.device:
        return self.prompt_cache.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_cache.dtype

    def clock(self) -> float:
        """The time once the device has finished its queued work (phase timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, prompts: list[str], draws: BatchDraws,
                 timings: dict[str, float]) -> tuple[torch.Tensor, int]:
        """Sample, decode and score one micro-batch: (rewards (B,), grad steps K). Each video's
        noise comes from its own stream in ``draws``; K and the frames from the shared one.
        Seconds per phase are added to ``timings``."""
        embeds = self.prompt_cache(prompts)
        noise = torch.cat([self.sampler.initial_noise(1, self.latent_shape, g, self.device, self.dtype)
                           for g in draws.videos])
        k = self.truncation.draw(draws.shared)
        frames, grad_frames = self.frames.draw(draws.shared)
        reference = None
        if self.reward.needs_reference:
            t0 = self.clock()
            # the same noise, and the same draws of a stochastic sampler: a copy of the shared stream
            shared = torch.Generator().set_state(draws.shared.get_state())
            with torch.no_grad(), self.autocast(), self.base_model():
                # the base model's chain, ending where the trained one ends (x0: the same prediction step)
                base_latents = self.sampler.sample(embeds, noise, grad_steps=k if self.truncation.predicts_x0 else 0,
                                                   generator=shared, predict_x0=self.truncation.predicts_x0)
                self.frozen.load()
                reference = self.backbone.decode_frames(base_latents, frames, [], chunk=self.decode_chunk).float()
            timings["reference"] = timings.get("reference", 0.0) + self.clock() - t0
        t0 = self.clock()
        with self.autocast():
            latents = self.sampler.sample(embeds, noise, grad_steps=k, generator=draws.shared,
                                          predict_x0=self.truncation.predicts_x0)
            t1 = self.clock()
            self.frozen.load()
            video = self.backbone.decode_frames(latents, frames, grad_frames, chunk=self.decode_chunk)
            t2 = self.clock()
        rewards = self.reward(video.float(), prompts, reference)
        t3 = self.clock()
        for key, dt in (("sample", t1 - t0), ("decode", t2 - t1), ("reward", t3 - t2)):
            timings[key] = timings.get(key, 0.0) + dt
        return rewards, k

    @contextlib.contextmanager
    def base_model(self):
        """Sample as the base model: the adapters off, and the speed path's compiled or
        graph-replayed call bypassed (it may have captured them on)."""
        fast, self.sampler.nograd_denoise = self.sampler.nograd_denoise, None
        try:
            with adapters_disabled(self.backbone.denoiser):
                yield
        finally:
            self.sampler.nograd_denoise = fast

    @torch.no_grad()
    def sample_videos(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Full no-grad sampling and decoding of every frame: (B, F, 3, H, W) in [0, 1]."""
        generator = torch.Generator().manual_seed(seed)
        embeds = self.prompt_cache(prompts)
        noise = self.sampler.initial_noise(len(prompts), self.latent_shape, generator, self.device, self.dtype)
        with self.autocast():
            latents = self.sampler.sample(embeds, noise, grad_steps=0, generator=generator)
            self.frozen.load()
            return self.backbone.decode_frames(latents).float()

    @torch.no_grad()
    def score_videos(self, videos: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        """The reward of ``videos`` sampled by ``sample_videos(prompts, seed)``; a reward that
        scores a change gets the base model's videos from the same seed."""
        reference = None
        if self.reward.needs_reference:
            with self.base_model():
                reference = self.sample_videos(prompts, seed)
        return self.reward(videos, prompts, reference)

    def score(self, prompts: list[str], seeds: list[int], desc: str = "validation"
              ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The reward of no-grad samples averaged over ``seeds``: ``{"reward", "per_prompt"}``, and
        the videos (one (B, F, 3, H, W) batch a seed, on the CPU)."""
        from fastvader.console import progress

        scores, videos = [], []
        for seed in progress(seeds, f"{desc}: {len(prompts)} prompt(s) a seed", enabled=self.progress, unit="seed"):
            video = self.sample_videos(prompts, seed)
            scores.append(self.score_videos(video, prompts, seed).float().cpu())
            videos.append(video.cpu())
        self.frozen.park()
        per_prompt = torch.stack(scores).mean(0)
        labelled = {prompt_label(p): float(s) for p, s in zip(prompts, per_prompt)}
        return ({"reward": float(per_prompt.mean()), "per_prompt": labelled},
                videos)
