"""``pickscore``: PickScore_v1 (yuvalkirstain/PickScore), a CLIP-H fine-tuned on Pick-a-Pic.

score = logit_scale.exp() * cosine(image, prompt) (about 18-23 for real images), as in the
PickScore reference code; preprocessing is the laion CLIP-H processor's (CLIPImageProcessor
defaults), done differentiably, for any batch size.
"""
from __future__ import annotations

from typing import Any

from fastvader.rewards._clip import ClipReward
from fastvader.rewards.base import register_reward


@register_reward
class PickScoreReward(ClipReward):
    name = "pickscore"
    kind = "image"
    default_pretrained = "yuvalkirstain/PickScore_v1"
    default_tokenizer = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    packaged_architectures = {"yuvalkirstain/PickScore_v1": "clip_hf/yuvalkirstain_PickScore_v1_config.json"}
    expected_weights = ("CLIPModel yuvalkirstain/PickScore_v1 (hub id or save_pretrained folder); CLIP tokenizer "
                        "from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer) when not next to the weights")

    def __init__(self, pretrained: str = "yuvalkirstain/PickScore_v1", tokenizer: str | None = None,
                 scale: float | None = None,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None, dtype: str = "auto"):
        super().__init__(pretrained, random_init=random_init, config=config, checkpointing=checkpointing,
                         tokenizer=tokenizer, dtype=dtype)
        #: None: the model's own logit scale (PickScore's definition)
        self.scale = scale

    def score_frames(self, frames, prompts):
        scale = self.clip.logit_scale.exp().float() if self.scale is None else self.scale
        return scale * self.frame_cosines(frames, prompts)
