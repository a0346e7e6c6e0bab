"""``apply(model)`` swaps the hot ops of a live model for fastvader's fused kernels;
``revert(model)`` restores it exactly.

Each op registers a :class:`Patch` here. A patch walks the model, replaces what it knows how to
replace, and returns one undo callable per replacement. The undo list is stored on the model
itself (no global state), so two models can be patched independently and reverted in any
order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.nn as nn

Undo = Callable[[], None]

_UNDO_ATTR = "_fastvader_undo"


@dataclass
class Patch:
    """A named replacement. ``apply_fn(model)`` returns the undo callables of what it changed;
    ``backend_fn()`` says which implementation the patched op runs ('triton', 'reference', ...)."""

    name: str
    apply_fn: Callable[[nn.Module], list[Undo]]
    backend_fn: Callable[[], str] = lambda: "reference"
    description: str = ""


PATCHES: dict[str, Patch] = {}


def register_patch(patch: Patch) -> Patch:
    if patch.name in PATCHES:
        raise ValueError(f"a patch named {patch.name!r} is already registered")
    PATCHES[patch.name] = patch
    return patch


@dataclass
class PatchReport:
    """What ``apply`` changed: replacements per op, and the implementation each op runs."""

    counts: dict[str, int] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "fastvader.apply: nothing patched"
        parts = [f"{name}: {n} module(s) via {self.backends.get(name, '?')}"
                 for name, n in self.counts.items()]
        return "fastvader.apply: " + "; ".join(parts)


def _load_builtin_patches() -> None:
    # Importing the op modules registers their patches; done lazily so that importing
    # fastvader does not import triton.
    import importlib

    for module in ("fastvader.patching.temporal_attention", "fastvader.patching.group_norm"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def available_patches() -> list[str]:
    _load_builtin_patches()
    return sorted(PATCHES)


def apply(model: nn.Module, ops: Iterable[str] | None = None) -> PatchReport:
    """Patch ``model`` in place with the named ops (default: every registered op).

    Applying twice is an error: revert first. Returns a :class:`PatchReport`.
    """
    _load_builtin_patches()
    names = list(PATCHES) if ops is None else list(ops)
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; available: {sorted(PATCHES)}")
    if getattr(model, _UNDO_ATTR, None):
        raise RuntimeError("model is already patched by fastvader.apply; call fastvader.revert(model) first")
    report = PatchReport()
    undo: list[Undo] = []
    for name in names:
        patch = PATCHES[name]
        undos = patch.apply_fn(model)
        undo.extend(undos)
        report.counts[name] = len(undos)
        report.backends[name] = patch.backend_fn()
    object.__setattr__(model, _UNDO_ATTR, undo)
    return report


def revert(model: nn.Module) -> int:
    """Undo everything ``apply`` did to ``model``, newest first. Returns the number undone."""
    undo: list[Undo] = getattr(model, _UNDO_ATTR, None) or []
    for fn in reversed(undo):
        fn()
    if hasattr(model, _UNDO_ATTR):
        object.__delattr__(model, _UNDO_ATTR)
    return len(undo)


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, _UNDO_ATTR, None))
