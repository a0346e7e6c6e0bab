"""Shared set-up for the tests/test_trust_*.py files: a tiny run of the embedded world (random
weights, 16x16 pixels, 3 frames, 2 sampler steps) that trains in about a second a step on CPU."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as
# fastvader.kernels) looks like Hugging Face's `kernels` package to transformers' availability
# probe, and importing peft / diffusers' LoRA loaders then fails. Nothing here imports from the root.
REPO = Path(__file__).resolve().parents[2]
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != REPO]

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.config import TrainConfig  # noqa: E402
from fastvader.rewards.base import Reward  # noqa: E402


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread while these tests run: on two cores shared with other jobs, two
    OpenMP threads spin against each other and a tiny training step takes 20x longer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(tmp_path: Path, name: str = "run", **sections) -> TrainConfig:
    data = {
        "backbone": {"random_init": True},
        "video": {"frames": 3, "height": 16, "width": 16, "fps": 4},
        "sampler": {"steps": 2, "guidance_scale": 1.0},
        "frames": {"reward": "all"},
        "lora": {"rank": 4, "alpha": 4.0},
        "optim": {"lr": 1e-3},
        "prompts": {"items": ["a red ball", "a blue cube"]},
        "validation": {"prompts": ["a green tree"], "seeds": [0], "save_videos": False},
        "train": {"steps": 2, "device": "cpu", "output_dir": str(tmp_path), "run_name": name, "progress": False},
        "logging": {"tensorboard": False},
    }
    return TrainConfig.from_dict(_merge(data, sections)).validate()


def lora_snapshot(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.lora_params]


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ScriptedReward(Reward):
    """Mean pixel value, except on the calls listed in ``nan_calls`` (0-based), where it is NaN.
    Keeps the gradient path intact so only the value is poisoned."""

    name = "scripted_test_reward"
    weightless = True

    def __init__(self, nan_calls=(), always_nan: bool = False):
        super().__init__()
        self.nan_calls, self.always_nan, self.calls = set(nan_calls), always_nan, 0

    def score_videos(self, videos, prompts):
        score = videos.mean(dim=(1, 2, 3, 4))
        poisoned = self.always_nan or self.calls in self.nan_calls
        self.calls += 1
        return score * float("nan") if poisoned else score
