"""Reward forward + backward to the pixels, per reward.

CPU: the tiny test configurations (a smoke benchmark). GPU (``-m gpu``, skipped without CUDA):
the real architectures from the packaged model configs with random weights in bf16, at VADER's
settings: image rewards on one 320x512 frame per video, video rewards on 16 frames. Peak memory
goes into ``extra_info``. There are no assertions on speed here.

Run: .venv/bin/python -m pytest benchmarks/bench_rewards.py -o python_files='bench_*.py' [-m gpu]
"""
from __future__ import annotations

import pytest
import torch

from fastvader.model_configs import ROOT as PACKAGED_CONFIGS
from fastvader.rewards import reward_class
from tests.helpers.tiny_rewards import TINY_CLIP, TINY_VICLIP, TINY_VIDEOMAE, TINY_VJEPA2, TINY_YOLOS

TINY = {
    "aesthetic": {"config": TINY_CLIP}, "hpsv2": {"config": TINY_CLIP}, "pickscore": {"config": TINY_CLIP},
    "clip_score": {"config": TINY_CLIP}, "viclip": {"config": TINY_VICLIP}, "action": {"config": TINY_VIDEOMAE},
    "objectness": {"config": TINY_YOLOS, "shortest_edge": 32, "longest_edge": 64}, "vjepa": {"config": TINY_VJEPA2},
}
REAL = {
    "aesthetic": "clip_hf/openai_clip-vit-large-patch14_config.json",
    "hpsv2": "reward_models/hpsv2_config.json",
    "pickscore": "clip_hf/yuvalkirstain_PickScore_v1_config.json",
    "clip_score": "clip_hf/openai_clip-vit-large-patch14_config.json",
    "viclip": "reward_models/viclip_l14_config.json",
    "action": "reward_models/videomae-base-finetuned-kinetics_config.json",
    "objectness": "reward_models/hustvl_yolos-base_config.json",
    "vjepa": "reward_models/vjepa2-vitl-fpc64-256_config.json",
}
PROMPT = "a man playing piano"


def _step(reward, videos):
    videos = videos.detach().requires_grad_(True)
    reward(videos, [PROMPT] * videos.shape[0]).sum().backward()
    return videos.grad


@pytest.mark.parametrize("name", list(TINY))
def test_bench_reward_tiny_cpu(benchmark, name):
    reward = reward_class(name)(random_init=True, **TINY[name]).freeze()
    frames = 4 if reward.is_video_reward else 1
    videos = torch.rand(2, frames, 3, 40, 64)
    benchmark(_step, reward, videos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", list(REAL))
def test_bench_reward_real_gpu(benchmark, name, checkpointing):
    options = {"random_init": True, "config": str(PACKAGED_CONFIGS / REAL[name]), "dtype": "bf16", "checkpointing": checkpointing}
    if name == "action":
        options["target"] = "playing piano"
    reward = reward_class(name)(**options).freeze().cuda()
    frames = 16 if reward.is_video_reward else 1
    videos = torch.rand(1, frames, 3, 320, 512, device="cuda")
    _step(reward, videos)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    benchmark.pedantic(lambda: (_step(reward, videos), torch.cuda.synchronize()), rounds=5, iterations=1)
    benchmark.extra_info["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    benchmark.extra_info["weights_gib"] = sum(p.numel() * p.element_size() for p in reward.parameters()) / 2**30
