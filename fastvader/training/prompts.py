"""Training prompts from a list, a text file, or a template such as "<animal> <activity>", and the
cache that embeds each prompt once."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

from fastvader.backbones.base import Backbone, PromptEmbeddings
from fastvader.config import PromptConfig, TrainConfig, prompt_lines


class PromptSource:
    """A finite pool of prompts; batches are drawn with the run's generator so that resumed
    runs draw the same prompts as uninterrupted ones."""

    def __init__(self, prompts: list[str]):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts = list(prompts)

    @classmethod
    def from_config(cls, cfg: PromptConfig) -> "PromptSource":
        """``prompts.file`` is already resolved by the config (relative to the YAML file)."""
        if cfg.items:
            return cls([str(p) for p in cfg.items])
        if cfg.file:
            return cls(prompt_lines(Path(cfg.file).read_text()))
        return cls(expand_template(cfg.template or "", cfg.vocab))

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [self.prompts[i] for i in idx]


def validation_prompts(cfg: TrainConfig, train: PromptSource | None = None) -> list[str]:
    """``validation.prompts``, or else the first two training prompts."""
    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
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
    """Embeds each prompt once; with a finite pool everything is embedded up front and the text
    encoder leaves the GPU."""

    def __init__(self, backbone: Backbone, device: torch.device, dtype: torch.dtype):
        self.backbone, self.device, self.dtype = backbone, device, dtype
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor | None, dict]] = {}

    def warm(self, prompts: list[str], batch: int = 64) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            emb = self.backbone.encode_prompts(chunk)
            for j, p in enumerate(chunk):
                self._rows[p] = (emb.cond[j].cpu(), None if emb.uncond is None else emb.uncond[j].cpu(),
                                 {k: v[j].cpu() for k, v in emb.extra.items()})

    def __call__(self, prompts: list[str]) -> PromptEmbeddings:
        self.warm(prompts)
        rows = [self._rows[p] for p in prompts]
        cond = torch.stack([r[0] for r in rows])
        uncond = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        extra = {k: torch.stack([r[2][k] for r in rows]) for k in rows[0][2]}
        return PromptEmbeddings(cond, uncond, extra).to(self.device, self.dtype)
