"""``image_consistency``: how well an image-to-video sample keeps its conditioning image.
scale x cosine(frame, image) in the feature space of DINOv2 (the default, ``facebook/dinov2-base``:
its layer-normed CLS token, the self-supervised image similarity VBench's subject consistency
uses) or of a CLIP vision tower (``openai/clip-vit-large-patch14`` or any CLIP: its projected
image embedding), averaged over the frames the reward receives.

The conditioning image comes with the prompt (``ImagePrompt``), prepared as the backbone saw it
(``prompt.pixels(H, W)`` at the frames' size); each image's embedding is computed once per size
and kept. Frames and image go through the model's own preprocessing (DINOv2's BitImageProcessor:
shortest edge 256, centre crop 224, ImageNet statistics; CLIP's processor), done in torch so that
gradients reach the frames. A prompt without an image is an error: the reward needs an
image-to-video backbone. In a weighted sum it holds the video to its first frame while another
reward pulls it elsewhere: ``terms: {aesthetic: 1.0, image_consistency: 2.0}``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fastvader.rewards._clip import build_clip
from fastvader.rewards._hf import PretrainedReward, from_pretrained, processor_config, transformers_module
from fastvader.rewards.base import register_reward
from fastvader.rewards.preprocess import (CLIP_TRANSFORM, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageTransform,
                                          frames_to_images, write_processor_config)

#: DINOv2's BitImageProcessor
DINOV2_TRANSFORM = ImageTransform(shortest_edge=256, crop=(224, 224), resample="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                                  std=IMAGENET_DEFAULT_STD)


@register_reward
class ImageConsistencyReward(PretrainedReward):
    name = "image_consistency"
    kind = "image"
    default_pretrained = "facebook/dinov2-base"
    expected_weights = ("DINOv2 (Dinov2Model; default facebook/dinov2-base) or a CLIP (its vision tower with the "
                        "projection, e.g. openai/clip-vit-large-patch14): hub id or save_pretrained folder")
    packaged_architectures = {"facebook/dinov2-base": "reward_models/facebook_dinov2-base_config.json",
                              "openai/clip-vit-large-patch14": "clip_hf/openai_clip-vit-large-patch14_config.json"}

    def __init__(self, pretrained: str = "facebook/dinov2-base", scale: float = 1.0, checkpointing: bool = False,
                 random_init: bool = False, config: Any = None, dtype: str = "auto"):
        super().__init__(dtype)
        processor_cfg = None
        if random_init:
            self.model = self.build(self.architecture(config, pretrained)).to(self.model_dtype)
        else:
            self.reject_config_with_weights(config)
            self.model = self.load(pretrained)
            processor_cfg = processor_config(pretrained)
        size = self.model.config.image_size
        if self.is_clip:
            transform = replace(CLIP_TRANSFORM, shortest_edge=size, crop=(size, size))
        else:
            transform = DINOV2_TRANSFORM
        self.transform = transform.updated_from_processor_config(processor_cfg)
        self.scale = float(scale)
        self._references: dict[tuple, torch.Tensor] = {}
        if checkpointing:
            self.enable_checkpointing()

    # -- the model -------------------------------------------------------------------------------
    @staticmethod
    def build(architecture: dict):
        """Dinov2Model or CLIPVisionModelWithProjection from a config dict, random weights."""
        tf = transformers_module()
        if architecture.get("model_type") == "dinov2":
            return tf.Dinov2Model(tf.Dinov2Config(**architecture))
        return build_clip(architecture, reward=ImageConsistencyReward.name, vision_only=True)

    def load(self, pretrained: str):
        tf = transformers_module()
        try:
            model_type = tf.AutoConfig.from_pretrained(pretrained).model_type
        except (OSError, ValueError):
            model_type = "dinov2"  # from_pretrained below names what is missing
        cls = tf.Dinov2Model if model_type == "dinov2" else tf.CLIPVisionModelWithProjection
        return from_pretrained(cls, pretrained, reward=self.name, dtype=self.model_dtype)

    @property
    def is_clip(self) -> bool:
        return self.model.config.model_type != "dinov2"

    @classmethod
    def real_architecture(cls):
        return cls.build(cls.architecture())

    def checkpointed_layers(self):
        encoder = self.model.vision_model.encoder.layers if self.is_clip else self.model.encoder.layer
        return list(encoder)

    # -- embeddings ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> L2-normalised float32 features (N, D), with gradients."""
        pixels = self.to_model(self.transform(images.float()))
        out = self.model(pixel_values=pixels)
        features = out.image_embeds if self.is_clip else out.pooler_output
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def reference_embeddings(self, prompts: Sequence[str], height: int, width: int) -> torch.Tensor:
        """The conditioning images' features (B, D), each prepared at (height, width)."""
        device = next(self.model.parameters()).device
        rows = []
        for prompt in prompts:
            image = getattr(prompt, "image", None)
            if image is None:
                raise ValueError(f"reward image_consistency compares frames with the prompt's conditioning image, "
                                 f"and prompt {str(prompt)!r} has none: use it with an image-to-video backbone "
                                 "(cogvideox_i2v, svd, wan_i2v) and prompts with images")
            key = (image, prompt.resize, height, width)
            if key not in self._references:
                self._references[key] = self.embed(prompt.pixels(height, width)[None].to(device))[0]
            rows.append(self._references[key])
        return torch.stack(rows)

    def _apply(self, fn, *args, **kwargs):  # moving the model invalidates the kept embeddings
        self._references = {}
        return super()._apply(fn, *args, **kwargs)

    def score_frames(self, frames, prompts):
        b, f, _, h, w = frames.shape
        reference = self.reference_embeddings(prompts, h, w)
        features = self.embed(frames_to_images(frames)).view(b, f, -1)
        return self.scale * (features * reference[:, None].to(features.device)).sum(-1)

    def save_pretrained(self, folder) -> None:
        """The model in transformers' format and the preprocessing; ``pretrained: <folder>`` loads it."""
        self.model.save_pretrained(str(folder))
        write_processor_config(self.transform, folder)
