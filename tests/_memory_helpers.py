"""Small configs shared by the memory, planner and multi-process tests."""
from __future__ import annotations

from fastvader.config import TrainConfig


def toy_config(tmp_path, **sections) -> TrainConfig:
    """The toy backbone with random weights, tiny sizes, a few sampler steps, fp32 on CPU."""
    data = {
        "backbone": {"name": "toy", "random_init": True},
        "video": {"frames": 4, "height": 16, "width": 16},
        "sampler": {"steps": 4, "truncation": "last"},
        "frames": {"reward": "all", "grad": "same"},
        "lora": {"rank": 4, "alpha": 4.0, "init_weights": False},
        "prompts": {"items": ["a red ball", "a blue cube", "a green tree", "a dog runs"]},
        "validation": {"prompts": ["a red ball"], "save_videos": False},
        "train": {"steps": 1, "device": "cpu", "precision": "fp32", "output_dir": str(tmp_path),
                  "progress": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return TrainConfig.from_dict(data).validate()
