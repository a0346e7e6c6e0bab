"""Conditioning images of image-to-video prompts: finding them, checking them before any model is
built, and preparing them at the video's size as the diffusers pipelines do.

The image-to-video pipelines (``CogVideoXImageToVideoPipeline``, ``StableVideoDiffusionPipeline``,
``WanImageToVideoPipeline``) read an image with ``diffusers.utils.load_image`` (EXIF orientation
applied, RGB) and resize it to the video's height and width with ``VaeImageProcessor.resize``
(PIL, Lanczos). ``prepare_image`` does exactly that. Two resize modes:

- ``stretch``: the pipelines' own resize to (height, width). An image whose aspect ratio the
  stretch would change by more than ``MAX_STRETCH`` is refused: the video would come out
  distorted, and the pipelines do not warn;
- ``crop``: keep the aspect ratio, resize to cover (height, width) and cut the centre
  (``VaeImageProcessor``'s ``resize_mode="crop"``).
"""
from __future__ import annotations

from pathlib import Path

import torch

RESIZE_MODES = ("stretch", "crop")
#: the largest relative change of aspect ratio ``stretch`` accepts
MAX_STRETCH = 0.05
#: file endings taken as images when a folder of images is given
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """A conditioning image that cannot be used; the message names the file and what to do."""


def images_in_folder(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as the pipelines see it (EXIF orientation applied),
    after decoding it completely: a truncated or corrupt file raises ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None


def check_image(path: str | Path, height: int, width: int, resize: str) -> None:
    """Raise ImageError unless the image at ``path`` can condition a (height, width) video under
    ``resize`` (readable; for ``stretch``, an aspect ratio within MAX_STRETCH of the video's)."""
    if resize not in RESIZE_MODES:
        raise ImageError(f"resize mode {resize!r} is not one of {list(RESIZE_MODES)}")
    w, h = image_size(path)
    if resize == "stretch":
        change = abs((w / h) / (width / height) - 1)
        if change > MAX_STRETCH:
            raise ImageError(f"{path} is {w}x{h} (aspect {w / h:.2f}) and the video {width}x{height} (aspect "
                             f"{width / height:.2f}): stretching would distort it by {change:.0%}; crop the image "
                             "to the video's aspect ratio or set prompts.image_resize=crop")


def prepare_image(path: str | Path, height: int, width: int, resize: str) -> torch.Tensor:
    """The image as the pipelines feed it to the model: (3, height, width) float32 in [0, 1]."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    image = load_image(str(path))
    resized = VaeImageProcessor().resize(image, height, width, resize_mode="default" if resize == "stretch" else "crop")
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
