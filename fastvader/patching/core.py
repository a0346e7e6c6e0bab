"""One mechanism for every change fastvader makes to a live model.

``apply(model)`` swaps the hot ops of a model for fastvader's fused kernels and ``revert(model)``
restores it exactly; the activation-checkpoint wrapper (:mod:`fastvader.patching.checkpoint`)
goes through the same mechanism.

A :class:`Patches` handle makes replacements in *slots*: an instance attribute such as a
module's ``forward`` (:class:`InstanceAttr`), a child in ``parent._modules``
(:class:`ChildModule`), a parameter or buffer entry (:class:`ModuleTensor`), an object's class
(:class:`ModuleClass`) or a diffusers attention processor (:class:`AttentionProcessor`). The
first replacement of a slot records what it held, including "no instance attribute"; reverting
restores exactly that, newest first.

Replacements of one slot stack as layers, so that patches compose: the checkpoint wrapper may
wrap a forward that the GroupNorm patch already replaced. A *wrapper* layer calls what lies
beneath it at call time (``below()``) and stays outermost: a plain replacement made later goes
under the wrappers. Removing any layer re-installs what the remaining layers make of the slot,
so handles can be reverted in any order and each takes away only its own layers.

The layer stacks live on the objects they patch and ``apply`` records its handles on the model:
there is no registry of models, and two models are independent.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch.nn as nn

_LAYERS_ATTR = "_fastvader_layers"  # on a patched object: the layer stacks of its slots
_APPLIED_ATTR = "_fastvader_applied"  # on a model: what apply() did, for revert()


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: what a slot holds when its object has no such instance attribute or child
MISSING: Any = _Missing()


@dataclass
class _Stack:
    original: Any  # what the slot held before fastvader, MISSING included
    layers: list["Layer"] = field(default_factory=list)

    def top(self) -> Any:
        return self.layers[-1].value if self.layers else self.original


class Slot:
    """One place in a model that a patch replaces; subclasses say how it is read and written."""

    kind = "slot"

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name

    def read(self) -> Any:
        raise NotImplementedError

    def write(self, value: Any) -> None:
        raise NotImplementedError

    def resolve(self, value: Any) -> Any:
        """What code reading the slot gets while it holds ``value``."""
        return value

    def changed_module(self, value: Any) -> Any:
        """The module that runs fastvader code once the slot holds ``value``."""
        return self.owner

    def describe(self) -> str:
        return f"{type(self.owner).__name__}.{self.name}"

    def stack(self) -> _Stack | None:
        return self.owner.__dict__.get(_LAYERS_ATTR, {}).get((self.kind, self.name))

    def base(self) -> Any:
        """What the slot holds beneath fastvader's wrappers: the innermost replacement, or what
        was there before fastvader (MISSING if nothing)."""
        stack = self.stack()
        if stack is None:
            return self.read()
        replacements = [layer for layer in stack.layers if not layer.wraps]
        return replacements[-1].value if replacements else stack.original

    def _add_stack(self) -> _Stack:
        stacks = self.owner.__dict__.setdefault(_LAYERS_ATTR, {})
        return stacks.setdefault((self.kind, self.name), _Stack(self.read()))

    def _drop_stack(self) -> None:
        stacks = self.owner.__dict__[_LAYERS_ATTR]
        del stacks[(self.kind, self.name)]
        if not stacks:
            del self.owner.__dict__[_LAYERS_ATTR]


class _KeySlot(Slot):
    """A key in one of the owner's dicts; MISSING when the key is absent."""

    def mapping(self) -> dict:
        raise NotImplementedError

    def read(self) -> Any:
        return self.mapping().get(self.name, MISSING)

    def write(self, value: Any) -> None:
        if value is MISSING:
            self.mapping().pop(self.name, None)
        else:
            self.mapping()[self.name] = value


class InstanceAttr(_KeySlot):
    """An attribute in the object's own ``__dict__`` (e.g. ``forward``); MISSING when the class
    attribute shows through."""

    kind = "attr"

    def mapping(self) -> dict:
        return self.owner.__dict__

    def resolve(self, value: Any) -> Any:
        if value is MISSING:  # the class attribute, bound as attribute lookup would bind it
            return getattr(type(self.owner), self.name).__get__(self.owner, type(self.owner))
        return value


class ChildModule(_KeySlot):
    """A child in ``parent._modules`` (a named submodule or a Sequential index)."""

    kind = "child"

    def mapping(self) -> dict:
        return self.owner._modules

    def changed_module(self, value: Any) -> Any:
        return value


class ModuleTensor(_KeySlot):
    """A parameter or buffer entry of a module (``_parameters`` / ``_buffers``): block swap puts
    an empty placeholder there while the weights live on the host."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__(module, name)
        self.kind = "buffer" if name in module._buffers else "param"

    def mapping(self) -> dict:
        return self.owner._buffers if self.kind == "buffer" else self.owner._parameters


class ModuleClass(Slot):
    """The class of an object: fp8 storage turns an ``nn.Linear`` into an ``Fp8Linear`` in place,
    so that whatever holds the layer (peft's LoRA wrapper, made later) keeps holding it."""

    kind = "class"

    def __init__(self, owner: Any):
        super().__init__(owner, "__class__")

    def read(self) -> Any:
        return type(self.owner)

    def write(self, value: Any) -> None:
        self.owner.__class__ = value


class AttentionProcessor(Slot):
    """The processor of a diffusers ``Attention``, set through its own ``set_processor``."""

    kind = "processor"

    def __init__(self, attention: nn.Module):
        super().__init__(attention, "processor")

    def read(self) -> Any:
        return self.owner.processor

    def write(self, value: Any) -> None:
        self.owner.set_processor(value)


class Layer:
    """One replacement in one slot, made by one :class:`Patches` handle."""

    def __init__(self, slot: Slot, wraps: bool):
        self.slot, self.wraps = slot, wraps
        self.value: Any = MISSING

    def below(self) -> Any:
        """What the slot would give without this layer (wrappers call it at call time, so that
        they always run what lies beneath them now)."""
        stack = self.slot.stack()
        if stack is None or self not in stack.layers:  # taken off (a caller kept the old forward):
            return self.slot.resolve(self.slot.read())  # what lay beneath is what the slot holds now
        index = stack.layers.index(self)
        return self.slot.resolve(stack.layers[index - 1].value if index else stack.original)

    def install(self, value: Any) -> None:
        stack = self.slot.stack()
        if stack is not None and self.slot.read() is not stack.top():
            raise RuntimeError(f"{self.slot.describe()} was replaced by other code after fastvader patched it; "
                               "revert fastvader's patches of this model before patching it again")
        stack = self.slot._add_stack()
        index = len(stack.layers)
        while not self.wraps and index and stack.layers[index - 1].wraps:
            index -= 1  # wrappers stay outermost: they call whatever lies beneath them
        self.value = value
        stack.layers.insert(index, self)
        self.slot.write(stack.top())

    def remove(self) -> None:
        stack = self.slot.stack()
        untouched = self.slot.read() is stack.top()
        stack.layers.remove(self)
        if untouched:
            self.slot.write(stack.top())
        else:
            warnings.warn(f"{self.slot.describe()} was replaced by other code after fastvader patched it; "
                          "that replacement is left in place", stacklevel=3)
        if not stack.layers:
            self.slot._drop_stack()


class Patches:
    """Replacements made together and undone together (``revert``, newest first)."""

    def __init__(self):
        self.layers: list[Layer] = []

    def replace(self, slot: Slot, value: Any) -> Layer:
        """Put ``value`` in ``slot`` (beneath any wrappers already there)."""
        layer = Layer(slot, wraps=False)
        layer.install(value)
        self.layers.append(layer)
        return layer

    def wrap(self, slot: Slot, make: Callable[[Callable[[], Any]], Any]) -> Layer:
        """Put ``make(below)`` in ``slot`` on top of what is there; the wrapper calls ``below()``
        to get what lies beneath it."""
        layer = Layer(slot, wraps=True)
        layer.install(make(layer.below))
        self.layers.append(layer)
        return layer

    def revert(self) -> int:
        """Undo every replacement of this handle, newest first; returns how many there were."""
        count = len(self.layers)
        while self.layers:
            self.layers.pop().remove()
        return count

    @property
    def sites(self) -> int:
        """How many objects had something replaced (a norm+activation pair of one parent counts once)."""
        return len({id(layer.slot.owner) for layer in self.layers})

    @property
    def modules(self) -> list[nn.Module]:
        """The modules that now run fastvader code: each swapped-in child, and each module whose
        forward or processor was replaced."""
        found = {}
        for layer in self.layers:
            module = layer.slot.changed_module(layer.value)
            found.setdefault(id(module), module)
        return list(found.values())


# ---------------------------------------------------------------------------------------------
# the ops apply() knows
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """An op ``apply`` can patch. ``apply_fn(model, patches)`` makes its replacements through
    ``patches``; ``backend_fn()`` says which implementation the patched op runs."""

    name: str
    apply_fn: Callable[[nn.Module, Patches], Any]
    backend_fn: Callable[[], str] = lambda: "reference"
    description: str = ""


def _imported(module: str, function: str) -> Callable[..., Any]:
    """``module.function``, imported at the first call: importing fastvader must not import
    triton or diffusers."""

    def call(*args):
        return getattr(importlib.import_module(module), function)(*args)

    return call


_TEMPORAL = "fastvader.patching.temporal_attention"
_GROUP_NORM = "fastvader.patching.group_norm"

#: every op ``apply`` knows, by name; each lives in its own module beside its kernel
PATCHES: Mapping[str, Patch] = MappingProxyType({patch.name: patch for patch in (
    Patch("temporal_attention", _imported(_TEMPORAL, "apply_temporal_attention"), _imported(_TEMPORAL, "backend"),
          "temporal self-attention of TransformerTemporalModel / AnimateDiffTransformer3D / SVD's "
          "TemporalBasicTransformerBlock through fastvader.kernels.temporal_attention"),
    Patch("group_norm", _imported(_GROUP_NORM, "apply_group_norm"), _imported(_GROUP_NORM, "backend"),
          "GroupNorm+SiLU fused (ResnetBlock2D, TemporalResnetBlock, TemporalConvLayer, conv_norm_out/conv_act, "
          "Attention.group_norm, CogVideoX's spatial norms); backward recomputes from the input and fp32 mean/rstd"),
    Patch("group_norm_conv", _imported(_GROUP_NORM, "apply_group_norm_conv"), _imported(_GROUP_NORM, "backend"),
          "group_norm, and each ResnetBlock2D norm-SiLU-conv run keeps only its input (backward "
          "recomputes norm+SiLU, not the conv). Use instead of group_norm: after group_norm has "
          "patched a model this op finds nothing left to patch"),
)})


@dataclass
class PatchReport:
    """What ``apply`` changed: sites per op, the implementation each op runs, and the modules
    that now run fastvader code (the startup self-check watches them)."""

    counts: dict[str, int] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    modules: list[nn.Module] = field(default_factory=list, repr=False, compare=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "fastvader.apply: nothing patched"
        parts = [f"{name}: {n} module(s) via {self.backends.get(name, '?')}"
                 for name, n in self.counts.items()]
        return "fastvader.apply: " + "; ".join(parts)


class _Applied(NamedTuple):
    report: PatchReport
    patches: list[Patches]


def available_patches() -> list[str]:
    return sorted(PATCHES)


def apply(model: nn.Module, ops: Iterable[str] | None = None) -> PatchReport:
    """Patch ``model`` in place with the named ops (default: every op in :data:`PATCHES`).

    Applying twice is an error: revert first. If an op fails, what the others did is undone.
    """
    names = list(PATCHES) if ops is None else list(ops)
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; available: {sorted(PATCHES)}")
    if is_patched(model):
        raise RuntimeError("model is already patched by fastvader.apply; call fastvader.revert(model) first")
    report, applied = PatchReport(), []
    try:
        for name in names:
            patches = Patches()
            applied.append(patches)
            PATCHES[name].apply_fn(model, patches)
            report.counts[name] = patches.sites
            report.backends[name] = PATCHES[name].backend_fn()
            report.modules.extend(patches.modules)
    except BaseException:
        for patches in reversed(applied):
            patches.revert()
        raise
    model.__dict__[_APPLIED_ATTR] = _Applied(report, applied)
    return report


def revert(model: nn.Module) -> int:
    """Undo everything ``apply`` did to ``model``, newest first; returns how many sites it restored
    (0 when the model is not patched)."""
    applied: _Applied | None = model.__dict__.pop(_APPLIED_ATTR, None)
    if applied is None:
        return 0
    for patches in reversed(applied.patches):
        patches.revert()
    return applied.report.total


def is_patched(model: nn.Module) -> bool:
    return _APPLIED_ATTR in model.__dict__
