"""Differentiable image preprocessing that reproduces the reference processors in torch.

The Hugging Face processors (``CLIPImageProcessor``, ``VideoMAEImageProcessor``,
``YolosImageProcessor``, V-JEPA 2's video processor) resize with PIL on uint8 images, crop, and
normalise. Going through PIL would cut the gradient, so this module does the same steps on float
tensors: the output sizes follow the processors' own arithmetic exactly, and
``F.interpolate(..., antialias=True)`` uses the same separable filters as PIL (bicubic a=-0.5,
triangle for bilinear, widened when downsampling), so results match the processors to within
their uint8 rounding (tests/test_rewards_preprocess.py checks it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PIL resampling codes as stored in preprocessor_config.json ("resample": 3)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImageTransform:
    """resize -> center crop -> normalise, on (N, 3, H, W) floats in [0, 1].

    Resize modes (the first that is set wins):
    - ``size=(h, w)``: to exactly that size (ViCLIP's cv2.resize);
    - ``shortest_edge`` with ``longest_edge``: YOLOS's rule (aspect kept, long side capped,
      both sides floored to multiples of ``size_divisor``);
    - ``shortest_edge`` alone: CLIP/VideoMAE's rule (short side = shortest_edge, long side
      = int(shortest_edge * long / short)).
    """

    shortest_edge: int | None = 224
    longest_edge: int | None = None
    size: tuple[int, int] | None = None
    size_divisor: int | None = None
    crop: tuple[int, int] | None = (224, 224)
    resample: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    # -- construction ------------------------------------------------------------------------
    def updated_from_processor_config(self, cfg: dict[str, Any] | None) -> "ImageTransform":
        """Take size/crop/resample/mean/std from a ``preprocessor_config.json`` dict, so a
        checkpoint with non-default preprocessing is reproduced as its processor would."""
        if not cfg:
            return self
        changes: dict[str, Any] = {}
        if cfg.get("do_resize", True) is False:
            changes.update(shortest_edge=None, longest_edge=None, size=None)
        size = cfg.get("size")
        if isinstance(size, int):
            changes.update(shortest_edge=size, size=None)
        elif isinstance(size, dict):
            if "shortest_edge" in size:
                changes.update(shortest_edge=size["shortest_edge"], size=None,
                               longest_edge=size.get("longest_edge", self.longest_edge))
            elif "height" in size and "width" in size:
                changes.update(size=(size["height"], size["width"]), shortest_edge=None)
        if cfg.get("do_center_crop") is False:
            changes["crop"] = None
        crop = cfg.get("crop_size")
        if cfg.get("do_center_crop", True) and crop is not None:
            changes["crop"] = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        if "resample" in cfg:
            changes["resample"] = _PIL_RESAMPLE.get(int(cfg["resample"]), "bilinear")
        if cfg.get("do_normalize", True) is False:
            changes.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        else:
            if cfg.get("image_mean") is not None:
                changes["mean"] = tuple(float(v) for v in cfg["image_mean"])
            if cfg.get("image_std") is not None:
                changes["std"] = tuple(float(v) for v in cfg["image_std"])
        return replace(self, **changes)

    # -- sizes, following the processors' arithmetic -------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return tuple(self.size)  # type: ignore[return-value]
        if self.shortest_edge is None:
            return height, width
        if self.longest_edge is not None:
            return _yolos_size(height, width, self.shortest_edge, self.longest_edge,
                               self.size_divisor)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    # -- the transform -------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ImageTransform takes (N, 3, H, W) images; got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = resize(images, self.resized_size(h, w), self.resample, self.antialias)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        return normalize(x, self.mean, self.std)


def _yolos_size(height: int, width: int, size: int, max_size: int | None,
                size_divisor: int | None) -> tuple[int, int]:
    """YolosImageProcessor's get_size_with_aspect_ratio (multiples of 16 by default)."""
    raw = None
    if max_size is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > max_size:
            raw = max_size * lo / hi
            size = int(round(raw))
    if width < height:
        ow = size
        oh = int(raw * height / width) if raw is not None else int(size * height / width)
    elif (height <= width and height == size) or (width <= height and width == size):
        oh, ow = height, width
    else:
        oh = size
        ow = int(raw * width / height) if raw is not None else int(size * width / height)
    divisor = 16 if size_divisor is None else size_divisor
    if divisor:
        oh, ow = oh - oh % divisor, ow - ow % divisor
    return oh, ow


def resize(images: torch.Tensor, size: Sequence[int], mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """F.interpolate in float32 (antialiased kernels have no half-precision CPU path), back to
    the input dtype. Bicubic runs as PIL does: width first, then height, clipping to [0, 1]
    after each pass (PIL stores each pass in uint8), which removes the ringing overshoot
    that a single unclamped pass keeps (up to 4/255 apart from PIL on upsampling otherwise)."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"resample={mode!r} is not supported; use bicubic, bilinear or nearest")
    x = images.float()
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest").to(images.dtype)
    kwargs = {"mode": mode, "align_corners": False, "antialias": antialias}
    if mode == "bicubic":
        if x.shape[-1] != size[1]:
            x = F.interpolate(x, size=(x.shape[-2], size[1]), **kwargs).clamp(0.0, 1.0)
        if x.shape[-2] != size[0]:
            x = F.interpolate(x, size=size, **kwargs).clamp(0.0, 1.0)
        return x.to(images.dtype)
    return F.interpolate(x, size=size, **kwargs).to(images.dtype)


def center_crop(images: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Crop (top, left) = ((H - h) // 2, (W - w) // 2), as the processors do; pads with zeros
    (split as they split it) when the crop is larger than the image."""
    ch, cw = int(crop[0]), int(crop[1])
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        top_pad, left_pad = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        images = F.pad(images, (left_pad, pad_w - left_pad, top_pad, pad_h - top_pad))
        h, w = images.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def sample_frames(videos: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, F, ...) -> (B, num_frames, ...) at evenly spaced indices (repeating frames when the
    video is shorter). Indexing keeps gradients for every frame that is picked."""
    total = videos.shape[1]
    if total == num_frames:
        return videos
    idx = torch.linspace(0, total - 1, num_frames).round().long().to(videos.device)
    return videos.index_select(1, idx)


def pad_frames_to_multiple(videos: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last frame until F is a multiple of ``multiple`` (tubelet size)."""
    extra = (-videos.shape[1]) % multiple
    if extra == 0:
        return videos
    return torch.cat([videos, videos[:, -1:].expand(-1, extra, *videos.shape[2:])], dim=1)


def frames_to_images(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B*F, 3, H, W)."""
    return videos.reshape(-1, *videos.shape[2:])


def read_processor_config(folder) -> dict | None:
    """The ``preprocessor_config.json`` (or ``video_preprocessor_config.json``) next to weights."""
    import json
    import os

    if folder is None or not os.path.isdir(os.path.expanduser(str(folder))):
        return None
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = os.path.join(os.path.expanduser(str(folder)), name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def write_processor_config(transform: ImageTransform, folder) -> None:
    """Save ``transform`` as a preprocessor_config.json that ``updated_from_processor_config``
    (and the transformers processors) read back to the same steps."""
    import json
    from pathlib import Path

    resample = {"bilinear": 2, "bicubic": 3, "nearest": 0}[transform.resample]
    cfg: dict[str, Any] = {"resample": resample, "image_mean": list(transform.mean), "image_std": list(transform.std),
                           "do_normalize": True, "do_resize": True}
    if transform.size is not None:
        cfg["size"] = {"height": transform.size[0], "width": transform.size[1]}
    elif transform.shortest_edge is not None:
        cfg["size"] = {"shortest_edge": transform.shortest_edge}
        if transform.longest_edge is not None:
            cfg["size"]["longest_edge"] = transform.longest_edge
    cfg["do_center_crop"] = transform.crop is not None
    if transform.crop is not None:
        cfg["crop_size"] = {"height": transform.crop[0], "width": transform.crop[1]}
    Path(folder, "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


# Presets of the reference processors' defaults
CLIP_TRANSFORM = ImageTransform()
VIDEOMAE_TRANSFORM = ImageTransform(shortest_edge=224, crop=(224, 224), resample="bilinear",
                                    mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD)
YOLOS_TRANSFORM = ImageTransform(shortest_edge=800, longest_edge=1333, crop=None,
                                 resample="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
VJEPA2_TRANSFORM = ImageTransform(shortest_edge=int(256 * 256 / 224), crop=(256, 256), resample="bilinear",
                                  mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
# ViCLIP's demo: cv2.resize straight to 224x224 (no crop, no antialias), ImageNet statistics
VICLIP_TRANSFORM = ImageTransform(shortest_edge=None, size=(224, 224), crop=None, resample="bilinear",
                                  antialias=False, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
