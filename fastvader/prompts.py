"""Training prompts from a list, a text file, or a template such as "<animal> <activity>"."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

from .config import PromptConfig


class PromptSource:
    """A finite pool of prompts; batches are drawn with the run's generator so that resumed
    runs draw the same prompts as uninterrupted ones."""

    def __init__(self, prompts: list[str]):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts = list(prompts)

    @classmethod
    def from_config(cls, cfg: PromptConfig, base_dir: str | Path | None = None) -> "PromptSource":
        if cfg.items:
            return cls([str(p) for p in cfg.items])
        if cfg.file:
            path = Path(cfg.file)
            if not path.is_file() and base_dir is not None:
                path = Path(base_dir) / cfg.file
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            return cls([ln for ln in lines if ln and not ln.startswith("#")])
        return cls(expand_template(cfg.template or "", cfg.vocab))

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [self.prompts[i] for i in idx]


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
