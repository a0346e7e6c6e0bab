"""A tiny training config on the toy backbone (random weights, a few sampler steps, fp32 on the
CPU): what the memory tests, the multi-process test and the GPU suite's ``--dry-run`` train."""
from __future__ import annotations

from pathlib import Path

from fastvader.config import TrainConfig


def tiny_toy_config(output_dir: str | Path, **sections: dict) -> TrainConfig:
    """Sections given as keyword arguments update the defaults below field by field."""
    data: dict = {
        "backbone": {"name": "toy", "random_init": True},
        "video": {"frames": 4, "height": 16, "width": 16},
        "sampler": {"steps": 4, "truncation": "last"},
        "frames": {"reward": "all", "grad": "same"},
        "lora": {"rank": 4, "alpha": 4.0, "init_weights": False},
        "prompts": {"items": ["a red ball", "a blue cube", "a green tree", "a dog runs"]},
        "validation": {"prompts": ["a red ball"], "save_videos": False},
        "train": {"steps": 1, "device": "cpu", "precision": "fp32", "output_dir": str(output_dir),
                  "progress": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return TrainConfig.from_dict(data).validate()
