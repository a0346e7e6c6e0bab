"""Tiny random-initialised configurations of every real-model reward, shared by the reward tests."""
from __future__ import annotations

import torch

TINY_CLIP = {
    "projection_dim": 16,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "max_position_embeddings": 16, "vocab_size": 300, "bos_token_id": 298, "eos_token_id": 299,
                    "pad_token_id": 299},
}
# the same tiny CLIP in OpenCLIP's config layout (what HPS checkpoints are built from)
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 2, "layers": 2},
}
TINY_VICLIP = {
    "embed_dim": 16,
    "vision_encoder": {"input_resolution": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2,
                       "output_dim": 16, "num_frames": 4},
    "text_encoder": {"context_length": 16, "vocab_size": 300, "transformer_width": 32, "transformer_heads": 2,
                     "transformer_layers": 2, "embed_dim": 16},
}
TINY_VIDEOMAE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
    "patch_size": 16, "num_frames": 4, "tubelet_size": 2, "use_mean_pooling": True,
    "id2label": {0: "playing piano", 1: "riding scooter", 2: "jogging", 3: "eating doughnuts"},
}
TINY_YOLOS = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": [32, 48], "patch_size": 16, "num_detection_tokens": 5,
    "id2label": {0: "N/A", 1: "person", 2: "dog", 3: "cat"},
}
TINY_VJEPA2 = {
    "crop_size": 32, "frames_per_clip": 4, "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
    "patch_size": 8, "tubelet_size": 2, "pred_hidden_size": 16, "pred_num_attention_heads": 2,
    "pred_num_hidden_layers": 2, "pred_num_mask_tokens": 2,
}

PROMPTS = ["a man playing piano", "a dog riding a scooter", "someone jogging in the park"]


def videos(batch: int, frames: int = 3, height: int = 36, width: int = 44, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, height, width, generator=g).requires_grad_(True)


def assert_differentiable_and_frozen(reward, batch: int) -> torch.Tensor:
    """Scores have shape (B,), the gradient reaches the pixels, and no parameter gets one."""
    x = videos(batch)
    scores = reward(x, PROMPTS[:batch])
    assert scores.shape == (batch,)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reached the pixels"
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    return scores.detach()
