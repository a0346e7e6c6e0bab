"""``clip_score``: text-video alignment with any CLIP: scale * cosine(frame, prompt), averaged
over the frames the reward receives. Unlike the CLIPScore metric it is not clipped at 0, so
negative alignments still get a gradient."""
from __future__ import annotations

from typing import Any

from fastvader.rewards._clip import ClipReward
from fastvader.rewards.base import register_reward


@register_reward
class ClipScoreReward(ClipReward):
    name = "clip_score"
    kind = "image"
    default_pretrained = "openai/clip-vit-large-patch14"
    packaged_architectures = {"openai/clip-vit-large-patch14": "clip_hf/openai_clip-vit-large-patch14_config.json"}
    expected_weights = ("any transformers CLIPModel: hub id (default openai/clip-vit-large-patch14) or "
                        "save_pretrained folder")

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", tokenizer: str | None = None,
                 scale: float = 1.0, checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(pretrained, random_init=random_init, config=config, checkpointing=checkpointing,
                         tokenizer=tokenizer, dtype=dtype)
        self.scale = float(scale)

    def score_frames(self, frames, prompts):
        return self.scale * self.frame_cosines(frames, prompts)
