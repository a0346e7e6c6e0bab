"""The differentiable preprocessing reproduces the reference processors (PIL-backed, no weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvader.rewards import preprocess as P
from fastvader.rewards._hf import transformers_module


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (pure noise exaggerates the uint8 rounding of PIL)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], axis=0)
    img = (base * 0.4 + 0.5 + rng.normal(0, 0.05, size=base.shape)).clip(0, 1)
    return (img * 255).round().astype(np.uint8)  # (3, H, W)


def _ours(transform: P.ImageTransform, img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).float().div(255).unsqueeze(0)
    return transform(x)[0]


@pytest.mark.parametrize("hw", [(96, 160), (300, 260), (120, 120)])
def test_clip_matches_clip_image_processor(hw):
    tf = transformers_module()
    img = _image(*hw)
    ref = tf.CLIPImageProcessorPil()(img, return_tensors="pt")["pixel_values"][0]
    ours = _ours(P.CLIP_TRANSFORM, img)
    assert ours.shape == ref.shape == (3, 224, 224)
    # PIL rounds the resized image to uint8: 0.5/255 / std ~ 0.008 in normalised units
    assert (ours - ref).abs().max() < 0.03
    assert (ours - ref).abs().mean() < 0.005


def test_videomae_matches_videomae_image_processor():
    tf = transformers_module()
    frames = [_image(120, 200, seed=s) for s in range(3)]
    ref = tf.VideoMAEImageProcessorPil()(frames, return_tensors="pt")["pixel_values"][0]  # (F, 3, 224, 224)
    ours = torch.stack([_ours(P.VIDEOMAE_TRANSFORM, f) for f in frames])
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    assert (ours - ref).abs().max() < 0.03


@pytest.mark.parametrize("hw", [(64, 96), (200, 120)])
def test_yolos_matches_yolos_image_processor(hw):
    tf = transformers_module()
    img = _image(*hw)
    ref = tf.YolosImageProcessorPil()(img, return_tensors="pt")["pixel_values"][0]
    ours = _ours(P.YOLOS_TRANSFORM, img)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 0.03


def test_processor_config_overrides_defaults():
    cfg = {"size": {"shortest_edge": 64}, "crop_size": {"height": 48, "width": 48}, "resample": 2,
           "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}
    t = P.CLIP_TRANSFORM.updated_from_processor_config(cfg)
    tf = transformers_module()
    img = _image(80, 100)
    ref = tf.CLIPImageProcessorPil(**cfg)(img, return_tensors="pt")["pixel_values"][0]
    ours = _ours(t, img)
    assert t.resample == "bilinear" and ours.shape == ref.shape == (3, 48, 48)
    assert (ours - ref).abs().max() < 0.03


def test_preprocess_is_differentiable_and_sizes_follow_processors():
    x = torch.rand(2, 3, 50, 70, requires_grad=True)
    y = P.CLIP_TRANSFORM(x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert P.CLIP_TRANSFORM.resized_size(50, 70) == (224, int(224 * 70 / 50))
    assert P.YOLOS_TRANSFORM.resized_size(320, 512) == (800, 1280)


def test_sample_frames_spreads_indices():
    v = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 3, 1, 1)
    assert P.sample_frames(v, 3)[0, :, 0, 0, 0].tolist() == [0.0, 2.0, 4.0]
    assert P.sample_frames(v, 8).shape[1] == 8
    assert P.pad_frames_to_multiple(v, 2).shape[1] == 6
