"""``aesthetic``: the LAION improved-aesthetic predictor on CLIP ViT-L/14 image embeddings.

score(frame) = MLP(normalize(CLIP_L14_image_embedding(frame))), the 768-1024-128-64-16-1 head of
christophschuhmann/improved-aesthetic-predictor (no nonlinearities between its Linear layers;
its dropouts are inactive). Scores sit around 4-7 for real images; VADER maximises it directly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastvader.rewards._clip import ClipReward, build_clip
from fastvader.rewards._hf import RewardWeightsError, check_state_dict, find_weight_file, load_state_dict_file
from fastvader.rewards.base import register_reward

MLP_FILES = ("aesthetic_mlp.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    """Layer indices match the published state dict (layers.0/2/4/6/7)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_reward
class AestheticReward(ClipReward):
    name = "aesthetic"
    kind = "image"
    default_pretrained = "openai/clip-vit-large-patch14"
    packaged_architectures = {"openai/clip-vit-large-patch14": "clip_hf/openai_clip-vit-large-patch14_config.json"}
    expected_weights = ("CLIP ViT-L/14 vision tower: hub id openai/clip-vit-large-patch14 or a local "
                        "save_pretrained folder (pretrained); the LAION MLP sac+logos+ava1-l14-linearMSE.pth "
                        "(mlp_path; from github.com/christophschuhmann/improved-aesthetic-predictor or "
                        "VADER's assets/)")

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", mlp_path: str | None = None,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(pretrained, random_init=random_init, config=config, checkpointing=checkpointing,
                         tokenizer=None, dtype=dtype, vision_only=True)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        if mlp_path is None and not random_init:
            mlp_path = self._saved_mlp(pretrained)
        if mlp_path is not None:
            path = find_weight_file(mlp_path, MLP_FILES, reward=self.name, what="aesthetic MLP weights",
                                    option="mlp_path")
            check_state_dict(self.mlp, load_state_dict_file(path, reward=self.name), reward=self.name, source=path)
        self.mlp.to(self.model_dtype)

    def _saved_mlp(self, pretrained: str) -> str:
        folder = Path(os.path.expanduser(pretrained))
        if (folder / MLP_FILES[0]).is_file():
            return str(folder / MLP_FILES[0])
        raise RewardWeightsError(
            f"reward 'aesthetic' needs the LAION aesthetic MLP: set reward.options.aesthetic.mlp_path to "
            f"sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/improved-aesthetic-predictor, "
            f"also in VADER's assets/), or to a folder holding one of {list(MLP_FILES)}; "
            f"{pretrained!r} holds none")

    def score_frames(self, frames, prompts):
        b, f = frames.shape[:2]
        emb = self.image_embeddings(frames.reshape(b * f, *frames.shape[2:]))
        return self.mlp(self.to_model(emb)).float().view(b, f)

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        super().save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.mlp.state_dict().items()}, str(Path(folder, MLP_FILES[0])))

    @classmethod
    def real_architecture(cls) -> nn.Module:
        clip = build_clip(cls.architecture(), reward=cls.name, vision_only=True)
        return nn.ModuleDict({"clip": clip, "mlp": AestheticMLP(clip.config.projection_dim)})
