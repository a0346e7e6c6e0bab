"""``hpsv2`` and ``hpsv2.1``: Human Preference Score v2 (tgxs002/HPSv2).

HPS is OpenCLIP ViT-H-14 fine-tuned on human preferences; the score is the cosine of the
L2-normalised image and prompt embeddings (``hpsv2.img_score``: diag(image_features @
text_features.T)), about 0.2-0.35 for real images. It runs here on transformers' CLIPModel:
the checkpoint (``{"state_dict": ...}`` in OpenCLIP's layout, possibly with ``module.``
prefixes) is converted key by key at load time, so no open_clip install is needed.
Preprocessing is OpenCLIP's eval transform (resize shortest side to 224 bicubic, center
crop, OpenAI mean/std), the same as CLIPImageProcessor's.
"""
from __future__ import annotations

import os
from typing import Any

from fastvader.rewards._clip import ClipReward, clip_config, fast_init, open_clip_state_to_hf
from fastvader.rewards._hf import check_state_dict, find_weight_file, from_pretrained, load_state_dict_file
from fastvader.rewards.base import register_reward


@register_reward
class HPSv2Reward(ClipReward):
    name = "hpsv2"
    kind = "image"
    default_pretrained = "xswu/HPSv2"
    default_tokenizer = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    packaged_architectures = {"xswu/HPSv2": "reward_models/hpsv2_config.json"}
    checkpoint_files: tuple[str, ...] = ("HPS_v2_compressed.pt", "HPS_v2.pt")
    expected_weights = ("HPS_v2_compressed.pt from hub repo xswu/HPSv2 (pretrained: the repo id, the file, or "
                        "a folder holding it; or a save_pretrained folder); CLIP tokenizer from "
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer)")

    def __init__(self, pretrained: str = "xswu/HPSv2", tokenizer: str | None = None, scale: float = 1.0,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(pretrained, random_init=random_init, config=config, checkpointing=checkpointing,
                         tokenizer=tokenizer, dtype=dtype)
        self.scale = float(scale)

    def load_pretrained(self, model_cls, pretrained, config):
        """A folder written by save_pretrained, or the published OpenCLIP-layout checkpoint
        (architecture: ``config`` if given, else ViT-H-14)."""
        folder = os.path.expanduser(pretrained)
        if os.path.isfile(os.path.join(folder, "config.json")):  # converted and saved with save_pretrained
            self.reject_config_with_weights(config)
            return from_pretrained(model_cls, folder, reward=self.name, dtype=self.model_dtype)
        path = find_weight_file(pretrained, self.checkpoint_files, reward=self.name,
                                what=f"{self.name} checkpoint (OpenCLIP ViT-H-14 state dict)")
        state = open_clip_state_to_hf(load_state_dict_file(path, reward=self.name))
        with fast_init():
            model = model_cls(clip_config(self.architecture(config), reward=self.name))
        check_state_dict(model, state, reward=self.name, source=path)
        return model.to(self.model_dtype)

    def score_frames(self, frames, prompts):
        return self.scale * self.frame_cosines(frames, prompts)


@register_reward
class HPSv21Reward(HPSv2Reward):
    name = "hpsv2.1"
    checkpoint_files = ("HPS_v2.1_compressed.pt",)
    expected_weights = HPSv2Reward.expected_weights.replace("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")
