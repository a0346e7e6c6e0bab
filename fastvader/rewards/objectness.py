"""``objectness``: YOLOS detection confidence of a target COCO class, to remove or add an object.

Per frame, as VADER computes it with ``post_process_object_detection(threshold=0)``: each of
YOLOS's 100 detection tokens gets its best class (excluding "no object") and that class's
probability; the frame's confidence is the mean probability over the tokens whose best class is
the target (and whose probability exceeds ``threshold``). ``mode: remove`` rewards
1 - confidence (VADER's object-removal reward), ``mode: add`` rewards the confidence.

When no token detects the target, the confidence is the constant 0 and **the gradient is zero**:
the reward cannot pull an object into existence from nothing (use ``mode: add`` only where the
object is already faintly detected, or pair it with a text-alignment reward).

Preprocessing is YolosImageProcessor's (shortest side 800, longest at most 1333, both floored
to multiples of 16, bilinear, ImageNet mean/std), differentiably; ``shortest_edge`` and
``longest_edge`` trade accuracy for speed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from fastvader.rewards._hf import (PretrainedReward, from_pretrained, label_index, processor_config,
                                   transformers_module)
from fastvader.rewards.base import register_reward
from fastvader.rewards.preprocess import YOLOS_TRANSFORM, frames_to_images, write_processor_config


@register_reward
class ObjectnessReward(PretrainedReward):
    name = "objectness"
    kind = "detection"
    default_pretrained = "hustvl/yolos-tiny"
    expected_weights = ("YolosForObjectDetection: hustvl/yolos-tiny (default), hustvl/yolos-small or "
                        "hustvl/yolos-base (hub id or save_pretrained folder)")
    # transformers convert_yolos_to_pytorch.py get_yolos_config, with COCO's 91 detection labels
    packaged_architectures = {f"hustvl/yolos-{size}": f"reward_models/hustvl_yolos-{size}_config.json"
                              for size in ("tiny", "small", "base")}

    def __init__(self, pretrained: str = "hustvl/yolos-tiny", target: str = "dog", mode: str = "remove",
                 threshold: float = 0.0, shortest_edge: int | None = None, longest_edge: int | None = None,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(dtype)
        tf = transformers_module()
        if mode not in ("remove", "add"):
            raise ValueError(f"reward.options.objectness.mode={mode!r}: use remove or add")
        self.mode = mode
        self.threshold = float(threshold)
        processor_cfg = None
        if random_init:
            cfg = tf.YolosConfig(**self.architecture(config, pretrained))
            self.model = tf.YolosForObjectDetection(cfg).to(self.model_dtype)
        else:
            self.reject_config_with_weights(config)
            self.model = from_pretrained(tf.YolosForObjectDetection, pretrained, reward=self.name,
                                         dtype=self.model_dtype)
            processor_cfg = processor_config(pretrained)
        transform = YOLOS_TRANSFORM.updated_from_processor_config(processor_cfg)
        if shortest_edge is not None:
            transform = replace(transform, shortest_edge=int(shortest_edge))
        if longest_edge is not None:
            transform = replace(transform, longest_edge=int(longest_edge))
        self.transform = transform
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.target = label_index(id2label, target, reward=self.name)
        self.target_name = id2label[self.target]
        if checkpointing:
            self.enable_checkpointing()

    def checkpointed_layers(self):
        return list(self.model.vit.encoder.layer)

    def confidence(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> target confidence per image (N,); 0 where nothing is detected."""
        logits = self.model(pixel_values=self.to_model(self.transform(images.float()))).logits.float()
        return self.confidence_from_logits(logits)

    def confidence_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, tokens, classes + 1) detection logits -> (N,) target confidence."""
        probs = logits.softmax(-1)[..., :-1]  # drop "no object"
        best, labels = probs.max(-1)
        hit = (labels == self.target) & (best > self.threshold)
        count = hit.sum(-1)
        total = (best * hit).sum(-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

    def score_frames(self, frames, prompts):
        b, f = frames.shape[:2]
        conf = self.confidence(frames_to_images(frames)).view(b, f)
        return 1.0 - conf if self.mode == "remove" else conf

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(str(folder))
        write_processor_config(self.transform, folder)

    @classmethod
    def describe(cls) -> dict:
        info = super().describe()
        info["kind"] = "detection"
        return info

    @classmethod
    def real_architecture(cls) -> nn.Module:
        tf = transformers_module()
        return tf.YolosForObjectDetection(tf.YolosConfig(**cls.architecture()))
