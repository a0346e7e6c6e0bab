"""``action``: probability that VideoMAE (fine-tuned on Kinetics-400) recognises a target action.

VADER's action reward: the target class is named in the config (``target: playing piano``) or,
when ``target`` is null, matched from each prompt (the longest Kinetics label the prompt
contains, else the label sharing the most words with it). Frames are resampled evenly to the
model's 16 and preprocessed as VideoMAEImageProcessor does (shortest side 224 bilinear, center
crop, the checkpoint's mean/std), differentiably.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn as nn

from fastvader.rewards._hf import (PretrainedReward, from_pretrained, label_index, processor_config,
                                   transformers_module)
from fastvader.rewards.base import register_reward
from fastvader.rewards.preprocess import VIDEOMAE_TRANSFORM, frames_to_images, sample_frames, write_processor_config

_STOPWORDS = {"a", "an", "the", "of", "in", "on", "at", "with", "and", "is", "are", "to", "his", "her", "their",
              "while", "someone", "person", "man", "woman", "people"}


def _words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    stems = set()
    for w in words:
        if w in _STOPWORDS:
            continue
        stems.add(w)
        for suffix in ("ing", "s", "es"):
            if w.endswith(suffix) and len(w) > len(suffix) + 2:
                stem = w[: -len(suffix)]
                stems.add(stem)
                if len(stem) > 2 and stem[-1] == stem[-2]:  # jogging -> jogg -> jog
                    stems.add(stem[:-1])
    return stems


def match_label(prompt: str, id2label: dict) -> int:
    """The Kinetics class a prompt describes: the longest label contained in it, else the label
    with the largest share of its words found in the prompt."""
    text = prompt.lower()
    contained = [(len(str(v)), int(k)) for k, v in id2label.items() if str(v).lower() in text]
    if contained:
        return max(contained)[1]
    prompt_words = _words(prompt)
    best, best_score = None, 0.0
    for k, v in id2label.items():
        label_words = _words(str(v))
        if not label_words:
            continue
        share = len(label_words & prompt_words) / len(label_words)
        if share > best_score:
            best, best_score = int(k), share
    if best is None:
        raise ValueError(f"reward 'action': no Kinetics-400 class matches the prompt {prompt!r}; "
                         f"set reward.options.action.target to a class name (e.g. 'playing piano')")
    return best


@register_reward
class ActionReward(PretrainedReward):
    name = "action"
    kind = "video"
    is_video_reward = True
    default_pretrained = "MCG-NJU/videomae-base-finetuned-kinetics"
    expected_weights = ("VideoMAEForVideoClassification MCG-NJU/videomae-base-finetuned-kinetics (hub id or "
                        "save_pretrained folder; its preprocessor_config.json is used when present)")
    packaged_architectures = {
        "MCG-NJU/videomae-base-finetuned-kinetics": "reward_models/videomae-base-finetuned-kinetics_config.json"}

    def __init__(self, pretrained: str = "MCG-NJU/videomae-base-finetuned-kinetics", target: str | None = None,
                 score: str = "prob", checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(dtype)
        tf = transformers_module()
        if score not in ("prob", "log_prob"):
            raise ValueError(f"reward.options.action.score={score!r}: use prob or log_prob")
        self.score_kind = score
        processor_cfg = None
        if random_init:
            cfg = tf.VideoMAEConfig(**self.architecture(config, pretrained))
            self.model = tf.VideoMAEForVideoClassification(cfg).to(self.model_dtype)
        else:
            self.reject_config_with_weights(config)
            self.model = from_pretrained(tf.VideoMAEForVideoClassification, pretrained, reward=self.name,
                                         dtype=self.model_dtype)
            processor_cfg = processor_config(pretrained)
        mcfg = self.model.config
        transform = VIDEOMAE_TRANSFORM
        if processor_cfg is None:
            transform = replace(transform, shortest_edge=mcfg.image_size, crop=(mcfg.image_size, mcfg.image_size))
        self.transform = transform.updated_from_processor_config(processor_cfg)
        self.num_frames = mcfg.num_frames
        self.id2label = {int(k): v for k, v in mcfg.id2label.items()}
        self.target = None if target is None else label_index(self.id2label, target, reward=self.name)
        if checkpointing:
            self.enable_checkpointing()

    def checkpointed_layers(self):
        return list(self.model.videomae.encoder.layer)

    def target_ids(self, prompts: Sequence[str]) -> list[int]:
        if self.target is not None:
            return [self.target] * len(prompts)
        return [match_label(p, self.id2label) for p in prompts]

    def class_log_probs(self, videos: torch.Tensor) -> torch.Tensor:
        clip = sample_frames(videos.float(), self.num_frames)
        b, t = clip.shape[:2]
        pixels = self.transform(frames_to_images(clip))
        pixels = pixels.view(b, t, *pixels.shape[1:])
        logits = self.model(pixel_values=self.to_model(pixels)).logits.float()
        return logits.log_softmax(-1)

    def score_videos(self, videos, prompts):
        log_probs = self.class_log_probs(videos)
        idx = torch.tensor(self.target_ids(prompts), device=log_probs.device)
        chosen = log_probs.gather(1, idx[:, None])[:, 0]
        return chosen if self.score_kind == "log_prob" else chosen.exp()

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(str(folder))
        write_processor_config(self.transform, folder)

    @classmethod
    def real_architecture(cls) -> nn.Module:
        tf = transformers_module()
        return tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(**cls.architecture()))
