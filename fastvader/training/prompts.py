"""Training prompts from a list, a text file, or a template such as "<animal> <activity>"; their
conditioning images for image-to-video families; and the cache that embeds each prompt once.

A prompt entry is a text, or ``{text: ..., image: path}``: the image conditions the video (its
first frame, for CogVideoX-I2V and Wan I2V; the whole conditioning, for SVD). A folder as the
image gives one prompt per image in it. Such prompts are :class:`ImagePrompt` objects: strings
(the text, wherever text is read: tokenizers, rewards, file names) that carry their image, so
the image travels with the prompt through the loop to the backbone and the rewards.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fastvader.backbones.base import Backbone, PromptEmbeddings
from fastvader.config import ConfigError, PromptConfig, TrainConfig, prompt_lines
from fastvader.io.images import ImageError, check_image, images_in_folder, prepare_image


class ImagePrompt(str):
    """A prompt text with its conditioning image. It compares and hashes by text and image, so
    one text with two images is two prompts."""

    def __new__(cls, text: str, image: str | Path, resize: str = "stretch") -> "ImagePrompt":
        prompt = super().__new__(cls, text)
        prompt.image = str(image)
        prompt.resize = resize
        return prompt

    def __eq__(self, other) -> bool:
        return str.__eq__(self, other) and getattr(other, "image", None) == self.image

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((str(self), self.image))

    def __reduce__(self):
        return ImagePrompt, (str(self), self.image, self.resize)

    def __repr__(self) -> str:
        return f"ImagePrompt({str(self)!r}, image={self.image!r})"

    @property
    def label(self) -> str:
        """The text and the image's file name, to tell prompts with one text apart in reports."""
        return f"{self} [{Path(self.image).name}]"

    def pixels(self, height: int, width: int) -> torch.Tensor:
        """The image as the model's pipeline prepares it: (3, height, width) in [0, 1]."""
        return prepare_image(self.image, height, width, self.resize)


def prompt_label(prompt: str) -> str:
    """How reports name a prompt: its text, and its image's file name when it has one."""
    return getattr(prompt, "label", prompt)


# ---------------------------------------------------------------------------------------------
# entries of the config
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptEntry:
    """One configured prompt: where the config gives it (for errors), its text and its image
    (a file, a folder of images, or None)."""

    where: str
    text: str
    image: str | None


def configured_entries(items: list, where: str, default_image: str | None = None) -> list[PromptEntry]:
    """``items`` of ``prompts.items`` or ``validation.prompts``: texts or {text, image} mappings."""
    entries = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"text", "image"})
            if unknown or not item.get("image") and "text" not in item:
                raise ConfigError(f"config: {here}={item!r} is invalid: a prompt entry is a text or "
                                  "{text: ..., image: path}")
            entries.append(PromptEntry(here, str(item.get("text", "")), item.get("image") or default_image))
        elif isinstance(item, str):
            entries.append(PromptEntry(here, item, default_image))
        else:
            raise ConfigError(f"config: {here}={item!r} is invalid: a prompt entry is a text or "
                              "{text: ..., image: path}")
    return entries


def prompt_entries(cfg: PromptConfig) -> list[PromptEntry]:
    """The training prompts the section names, before folders of images are expanded."""
    if cfg.items:
        return configured_entries(cfg.items, "prompts.items", cfg.image)
    if cfg.file:
        texts = prompt_lines(Path(cfg.file).read_text())
        return [PromptEntry(f"prompts.file prompt {i + 1}", t, cfg.image) for i, t in enumerate(texts)]
    texts = expand_template(cfg.template or "", cfg.vocab)
    return [PromptEntry(f"prompts.template ({t!r})", t, cfg.image) for t in texts]


def entry_images(entry: PromptEntry) -> list[Path]:
    """The image files of an entry: its image, or every image in its folder."""
    if entry.image is None:
        return []
    path = Path(entry.image)
    return images_in_folder(path) if path.is_dir() else [path]


def expand_entries(entries: list[PromptEntry], resize: str) -> list[str]:
    """Texts for entries without an image; an ImagePrompt per image for the others."""
    prompts: list[str] = []
    for entry in entries:
        if entry.image is None:
            prompts.append(entry.text)
        else:
            prompts += [ImagePrompt(entry.text, image, resize) for image in entry_images(entry)]
    return prompts


def check_conditioning(cfg: TrainConfig) -> None:
    """Refuse, naming the entry, a prompt whose image is missing, unreadable or of a size the
    video cannot take; an image given to a text-to-video backbone; and a prompt without one for
    an image-to-video backbone. Runs in config validation, before any model is built."""
    from fastvader.backbones import available_backbones, backbone_class

    name = cfg.backbone.name
    takes_images = backbone_class(name).conditioning != "text"
    entries = prompt_entries(cfg.prompts)
    if cfg.validation.prompts:
        entries += configured_entries(cfg.validation.prompts, "validation.prompts", cfg.prompts.image)
    checked: set[Path] = set()
    for entry in entries:
        if entry.image is None and takes_images:
            raise ConfigError(f"config: {entry.where} ({entry.text!r}) has no image: backbone {name!r} is "
                              "image-to-video and conditions every video on one; give {text: ..., image: path} "
                              "or prompts.image")
        if entry.image is None:
            continue
        if not takes_images:
            image_backbones = [b for b in available_backbones() if backbone_class(b).conditioning != "text"]
            raise ConfigError(f"config: {entry.where} has an image ({entry.image}), but backbone {name!r} is "
                              f"text-to-video; use an image-to-video backbone ({image_backbones}) or drop the image")
        _check_entry_images(entry, cfg, checked)


def _check_entry_images(entry: PromptEntry, cfg: TrainConfig, checked: set[Path]) -> None:
    path = Path(entry.image)
    if not path.exists():
        raise ConfigError(f"config: {entry.where}: the image {path} does not exist")
    files = entry_images(entry)
    if not files:
        raise ConfigError(f"config: {entry.where}: the folder {path} holds no images (png, jpg, webp, ...)")
    for file in files:
        if file in checked:
            continue
        try:
            check_image(file, cfg.video.height, cfg.video.width, cfg.prompts.image_resize)
        except ImageError as err:
            raise ConfigError(f"config: {entry.where}: {err}") from None
        checked.add(file)


# ---------------------------------------------------------------------------------------------
# the pool the loop draws from
# ---------------------------------------------------------------------------------------------
class PromptSource:
    """A finite pool of prompts; batches are drawn with the run's generator so that resumed
    runs draw the same prompts as uninterrupted ones."""

    def __init__(self, prompts: list[str]):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts = list(prompts)

    @classmethod
    def from_config(cls, cfg: PromptConfig) -> "PromptSource":
        """``prompts.file`` and image paths are already resolved by the config (relative to the
        YAML file)."""
        return cls(expand_entries(prompt_entries(cfg), cfg.image_resize))

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [self.prompts[i] for i in idx]


def validation_prompts(cfg: TrainConfig, train: PromptSource | None = None) -> list[str]:
    """``validation.prompts``, or else the first two training prompts."""
    if cfg.validation.prompts:
        entries = configured_entries(cfg.validation.prompts, "validation.prompts", cfg.prompts.image)
        return expand_entries(entries, cfg.prompts.image_resize)
    train = train or PromptSource.from_config(cfg.prompts)
    return train.prompts[:2]


def expand_template(template: str, vocab: dict[str, list[str]]) -> list[str]:
    """Every filling of the template's <slot> markers from ``vocab``."""
    slots = re.findall(r"<(\w+)>", template)
    prompts = []
    for combo in itertools.product(*(vocab[s] for s in slots)):
        text = template
        for slot, word in zip(slots, combo):
            text = text.replace(f"<{slot}>", str(word), 1)
        prompts.append(text)
    return prompts


class PromptCache:
    """Embeds each prompt once (with its conditioning image, for image-to-video families, for a
    video of ``video`` = (frames, height, width)); with a finite pool everything is embedded up
    front and the text encoder leaves the GPU."""

    def __init__(self, backbone: Backbone, device: torch.device, dtype: torch.dtype,
                 video: tuple[int, int, int] | None = None):
        self.backbone, self.device, self.dtype = backbone, device, dtype
        self.video = video
        self._rows: dict[str, PromptEmbeddings] = {}

    def warm(self, prompts: list[str], batch: int = 64) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            emb = self._encode(chunk)
            for j, p in enumerate(chunk):
                self._rows[p] = emb.select([j]).to("cpu")

    def _encode(self, prompts: list[str]) -> PromptEmbeddings:
        texts = [str(p) for p in prompts]
        if not any(isinstance(p, ImagePrompt) for p in prompts):
            return self.backbone.encode_prompts(texts)
        if self.video is None or not all(isinstance(p, ImagePrompt) for p in prompts):
            raise ValueError("conditioning images need the video size, and every prompt of a batch needs one")
        frames, height, width = self.video
        images = torch.stack([p.pixels(height, width) for p in prompts])
        return self.backbone.encode_prompts(texts, images=images, num_frames=frames)

    def __call__(self, prompts: list[str]) -> PromptEmbeddings:
        self.warm(prompts)
        return PromptEmbeddings.cat([self._rows[p] for p in prompts]).to(self.device, self.dtype)
