"""``vjepa``: V-JEPA self-supervised consistency (the reward VADER's paper describes, whose code
was never released), on V-JEPA 2 (transformers ``VJEPA2Model``: encoder + predictor).

reward = - mean |predictor(context tokens) - layer_norm(encoder(all tokens))| over the masked
target tokens: how well the video's visible parts predict its hidden parts in V-JEPA's feature
space. A temporally coherent, physically plausible video is easy to predict; flicker, morphing
and sudden changes are not.

How the masks follow V-JEPA pretraining (configs/pretrain/vitl16.yaml): spatial blocks that span
every frame, 8 small blocks (15% of the frame each) and 2 large ones (70% each), aspect ratio in
[0.75, 1.5]; the union of a group's blocks is the target, the rest the context. The context is
encoded on its own (the encoder sees only context tokens, with their RoPE positions), as the
context encoder does in training; the targets come from the encoder on the full video. Each call
draws ``num_masks`` mask pairs from a seeded generator, the same masks for every video of the
batch, and averages. Gradients reach the pixels through both paths (``detach_target: true``
stops them on the target side, as V-JEPA's EMA target encoder does).

V-JEPA 1 checkpoints (facebookresearch/jepa ViT-L/16, sin-cos positions instead of RoPE) are not
supported: transformers has no module for them.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.rewards._hf import PretrainedReward, from_pretrained, processor_config, transformers_module
from fastvader.rewards.base import register_reward
from fastvader.rewards.preprocess import (VJEPA2_TRANSFORM, frames_to_images, pad_frames_to_multiple, sample_frames,
                         write_processor_config)

# (number of blocks, share of the frame per block): V-JEPA's short- and long-range masks
DEFAULT_MASK_BLOCKS = ((8, 0.15), (2, 0.7))


def spatial_block_mask(grid: int, num_blocks: int, scale: float, aspect_ratio: tuple[float, float],
                       generator: torch.Generator) -> torch.Tensor:
    """(grid, grid) bool: the union of ``num_blocks`` rectangles of ``scale * grid^2`` cells."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    area = scale * grid * grid
    lo, hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    for _ in range(num_blocks):
        ar = math.exp(lo + (hi - lo) * torch.rand((), generator=generator).item())
        h = max(1, min(grid - 1, round(math.sqrt(area * ar))))
        w = max(1, min(grid - 1, round(math.sqrt(area / ar))))
        top = int(torch.randint(0, grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (), generator=generator))
        mask[top:top + h, left:left + w] = True
    return mask


@register_reward
class VJEPAReward(PretrainedReward):
    name = "vjepa"
    kind = "video"
    is_video_reward = True
    default_pretrained = "facebook/vjepa2-vitl-fpc64-256"
    expected_weights = ("VJEPA2Model with its predictor: facebook/vjepa2-vitl-fpc64-256 (default) or another "
                        "V-JEPA 2 checkpoint (hub id or save_pretrained folder)")
    packaged_architectures = {"facebook/vjepa2-vitl-fpc64-256": "reward_models/vjepa2-vitl-fpc64-256_config.json"}

    def __init__(self, pretrained: str = "facebook/vjepa2-vitl-fpc64-256", num_frames: int | None = None,
                 mask_blocks: Sequence[Sequence[float]] = DEFAULT_MASK_BLOCKS,
                 aspect_ratio: Sequence[float] = (0.75, 1.5), num_masks: int = 1, seed: int = 0,
                 detach_target: bool = False,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None, dtype: str = "auto"):
        super().__init__(dtype)
        tf = transformers_module()
        processor_cfg = None
        if random_init:
            self.model = tf.VJEPA2Model(self.vjepa2_config(config, pretrained)).to(self.model_dtype)
        else:
            self.reject_config_with_weights(config)
            self.model = from_pretrained(tf.VJEPA2Model, pretrained, reward=self.name, dtype=self.model_dtype)
            processor_cfg = processor_config(pretrained)
        mcfg = self.model.config
        crop = mcfg.crop_size
        transform = replace(VJEPA2_TRANSFORM, shortest_edge=int(crop * 256 / 224), crop=(crop, crop))
        self.transform = transform.updated_from_processor_config(processor_cfg)
        self.grid = crop // mcfg.patch_size
        self.tubelet = mcfg.tubelet_size
        self.num_frames = num_frames
        self.mask_blocks = [(int(n), float(s)) for n, s in mask_blocks]
        if not self.mask_blocks or any(n < 1 or not 0 < s < 1 for n, s in self.mask_blocks):
            raise ValueError("reward.options.vjepa.mask_blocks must be [[num_blocks, scale], ...] with "
                             "num_blocks >= 1 and 0 < scale < 1")
        self.aspect_ratio = (float(aspect_ratio[0]), float(aspect_ratio[1]))
        self.num_masks = int(num_masks)
        self.detach_target = detach_target
        self.generator = torch.Generator().manual_seed(seed)
        if checkpointing:
            self.enable_checkpointing()

    def checkpointed_layers(self):
        return list(self.model.encoder.layer) + list(self.model.predictor.layer)

    # -- masks ---------------------------------------------------------------------------------
    def sample_masks(self, time_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(context ids, target ids) over the T' x grid x grid tokens, one pair per block group."""
        pairs = []
        for num_blocks, scale in self.mask_blocks:
            spatial = spatial_block_mask(self.grid, num_blocks, scale, self.aspect_ratio, self.generator)
            if spatial.all():  # keep some context: unmask one cell
                spatial[0, 0] = False
            full = spatial.flatten().repeat(time_steps)  # token order is (t, h, w)
            pairs.append((torch.nonzero(~full)[:, 0], torch.nonzero(full)[:, 0]))
        return pairs

    # -- the objective -------------------------------------------------------------------------
    def pixels(self, videos: torch.Tensor) -> torch.Tensor:
        clip = videos.float() if self.num_frames is None else sample_frames(videos.float(), self.num_frames)
        clip = pad_frames_to_multiple(clip, self.tubelet)
        b, t = clip.shape[:2]
        x = self.transform(frames_to_images(clip))
        return self.to_model(x.view(b, t, *x.shape[1:]))

    def encode_context(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        enc = self.model.encoder
        tokens = enc.embeddings(pixels)
        ids = context.to(tokens.device)[None].expand(tokens.shape[0], -1)
        x = tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))
        for layer in enc.layer:
            x = layer(x, ids)[0]
        return enc.layernorm(x)

    def prediction_error(self, pixels: torch.Tensor, context: torch.Tensor, target: torch.Tensor,
                         full: torch.Tensor) -> torch.Tensor:
        b, n, d = full.shape
        ctx_ids = context.to(full.device)[None].expand(b, -1)
        tgt_ids = target.to(full.device)[None].expand(b, -1)
        ctx = self.encode_context(pixels, context)
        # the predictor gathers the context tokens from a full-length sequence: put them there
        scattered = torch.zeros_like(full).scatter(1, ctx_ids[..., None].expand(-1, -1, d), ctx)
        # The predictor sizes its target tokens from the masks' largest index (``.max() + 1``):
        # on the meta device (the memory planner) the masks must stay on the CPU to have one.
        mask_device = torch.device("cpu") if full.is_meta else full.device
        masks = {name: ids.to(mask_device)[None].expand(b, -1) for name, ids in
                 (("context_mask", context), ("target_mask", target))}
        pred = self.model.predictor(encoder_hidden_states=scattered, context_mask=[masks["context_mask"]],
                                    target_mask=[masks["target_mask"]]).last_hidden_state
        goal = F.layer_norm(full.gather(1, tgt_ids[..., None].expand(-1, -1, d)).float(), (d,))
        if self.detach_target:
            goal = goal.detach()
        return (pred.float() - goal).abs().mean(dim=(1, 2))

    def score_videos(self, videos, prompts):
        pixels = self.pixels(videos)
        full = self.model.encoder(pixel_values_videos=pixels).last_hidden_state
        time_steps = full.shape[1] // (self.grid * self.grid)
        errors = [self.prediction_error(pixels, c, t, full)
                  for _ in range(self.num_masks) for c, t in self.sample_masks(time_steps)]
        return -torch.stack(errors).mean(0)

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(str(folder))
        write_processor_config(self.transform, folder)

    @classmethod
    def vjepa2_config(cls, config: Any = None, pretrained: str | None = None):
        cfg = cls.architecture(config, pretrained)
        cfg.pop("architectures", None)  # a transformers config.json's model list, not a VJEPA2Config field
        return transformers_module().VJEPA2Config(**cfg)

    @classmethod
    def real_architecture(cls) -> nn.Module:
        return transformers_module().VJEPA2Model(cls.vjepa2_config())
