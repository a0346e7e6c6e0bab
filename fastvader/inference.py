"""Sampling and scoring without a Trainer: build a config's backbone, load a trained LoRA into it,
sample whole videos, decode them and score them with the config's reward. ``fastvader sample``
and ``fastvader eval`` run on it; so can a notebook::

    pipe = VideoPipeline(load_config("configs/demo.yaml"), lora="runs/demo/lora.safetensors")
    videos = pipe.sample(["a red square moving left"], seed=0)  # (B, F, 3, H, W) in [0, 1]
    pipe.evaluate(["a red square moving left"], seeds=[0, 1])   # {"reward": ..., "per_prompt": ...}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastvader.backbones import Backbone, build_backbone
from fastvader.config import TrainConfig
from fastvader.lora import load_lora
from fastvader.memory.fp8 import Fp8Storage
from fastvader.memory.frozen_weights import FrozenWeights
from fastvader.precision import resolve_device, resolve_dtype
from fastvader.rewards import build_reward
from fastvader.speed import SpeedPath
from fastvader.training.rollout import Rollout, autocast_for


class VideoPipeline:
    """A config's backbone (with a trained LoRA when ``lora`` names one), sampler and, with
    ``with_reward``, reward: no optimizer, no guards, no checkpointing, no run folder; the kernels
    and ``speed`` settings as in training. It builds its own models, so nothing of the caller's
    is changed."""

    def __init__(self, cfg: TrainConfig, *, lora: str | Path | None = None, with_reward: bool = True):
        cfg = cfg.validate()
        if cfg.memory.block_swap == "auto":  # as training resolves it: the fewest blocks that fit
            from fastvader.memory.planner import apply_best_plan

            cfg = apply_best_plan(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        weight_dtype = resolve_dtype(cfg.backbone.dtype, "backbone.dtype", self.device)
        amp_dtype = resolve_dtype(cfg.train.precision, "train.precision", self.device)
        torch.manual_seed(cfg.train.seed)  # random_init models draw the weights the Trainer's drew
        self.backbone = build_backbone(cfg.backbone, Fp8Storage.from_config(cfg.memory),
                                       progress=cfg.train.progress).freeze()
        # fp8 storage and block swap as in training, before the move: swapped blocks never have to fit on the GPU
        self.frozen_weights = FrozenWeights(self.backbone.denoiser, cfg.memory, self.device, passed_in=False)
        self.backbone.to(self.device, weight_dtype)
        #: the LoRA file loaded (its rank, alpha, modules, metadata), or None; fp32 adapters as trained
        self.lora = load_lora(self.backbone, lora, dtype=torch.float32).file if lora else None
        reward = build_reward(cfg.reward, progress=cfg.train.progress).freeze().to(self.device) if with_reward else None
        self.kernel_report = _apply_kernels(cfg, self.device, self.backbone)
        self.rollout = Rollout.from_config(cfg, self.backbone, reward, self.device, weight_dtype,
                                           autocast_for(self.device, amp_dtype))
        self.speed = SpeedPath.for_rollout(cfg.speed, self.backbone, self.rollout.sampler, self.device)
        self.speed.activate()  # no self-check here: compiled blocks and CUDA graphs run from the first call

    def sample(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """One video per prompt, all frames decoded: (B, F, 3, H, W) in [0, 1]."""
        return self.rollout.sample_videos(prompts, seed)

    def evaluate(self, prompts: list[str], seeds: list[int], tag: str = "eval") -> dict[str, Any]:
        """The reward of one video per prompt and seed, as the Trainer's validation reports it."""
        return self.score(prompts, seeds, tag)[0]

    def score(self, prompts: list[str], seeds: list[int], tag: str = "eval") -> tuple[dict[str, Any], list[torch.Tensor]]:
        """:meth:`evaluate`'s result (with the LoRA file and the steps it was trained for) and the
        videos it scored, one (B, F, 3, H, W) batch a seed."""
        if self.rollout.reward is None:
            raise ValueError("this VideoPipeline was built with with_reward=False: it samples but cannot score")
        scores, videos = self.rollout.score(prompts, seeds, desc=tag)
        lora = {"lora": str(self.lora.path), "step": self.lora.steps} if self.lora else {"lora": None, "step": 0}
        return {"tag": tag, **lora, **scores}, videos

    @property
    def lora_metadata(self) -> dict[str, str]:
        """The LoRA file's metadata (rank, alpha, targets, training steps); empty without one."""
        return self.lora.metadata if self.lora else {}


def _apply_kernels(cfg: TrainConfig, device: torch.device, backbone: Backbone) -> dict[str, Any] | None:
    """The fused kernels on the denoiser and VAE when ``kernels.enabled`` asks for them (``auto``:
    on CUDA), as in training."""
    from fastvader.patching.core import apply

    enabled = str(cfg.kernels.enabled).lower()
    if enabled in ("off", "false") or (enabled == "auto" and device.type != "cuda"):
        return None
    reports = {where: apply(model, cfg.kernels.ops or None)
               for where, model in (("denoiser", backbone.denoiser), ("vae", backbone.vae))}
    for where, report in reports.items():
        print(f"[{where}] {report}")
    return reports


def write_samples(videos: list[torch.Tensor], prompts: list[str], seeds: list[int], out: str | Path, fps: int,
                  prefix: str = "") -> list[Path]:
    """Each seed's batch of videos as files named ``<prefix>seed<S>_<i>_<prompt>`` (mp4 and gif)
    and one frame grid of them all, labelled, ``<prefix>grid.png``; returns the video files."""
    from fastvader.io.media import sample_grid, write_video

    out = Path(out)
    files = []
    for batch, seed in zip(videos, seeds):
        for i, prompt in enumerate(prompts):
            files += write_video(batch[i], out / f"{prefix}seed{seed}_{i:02d}_{'_'.join(prompt.split())[:40]}", fps)
    sample_grid(videos, prompts, seeds, out / f"{prefix}grid.png")
    return files
