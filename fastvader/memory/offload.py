"""Moving memory off the GPU: saved activations of the grad steps to pinned CPU memory, and
frozen models (VAE, reward, text encoder) onto the GPU only while they are used.

``offload_activations()`` is a saved-tensor hook pair: each CUDA tensor autograd saves is copied
to a pinned host buffer on a side stream (so the copy overlaps the forward compute that follows)
and copied back when backward needs it. ``grad_step_wrapper(memory_cfg)`` composes it with
per-step checkpointing into the sampler's ``grad_step_wrapper``.

``on_demand(modules, device)`` is a context manager: the modules are moved to ``device`` on
entry and back to the CPU on exit. The loop wraps decode + reward + backward with it, so during
the 24 no-grad sampling steps (and validation's) the frozen models do not take GPU memory.
Backward must sit inside the block: checkpointed decode recomputes the VAE in backward.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

#: tensors smaller than this stay where they are: a copy costs more than it frees
MIN_OFFLOAD_BYTES = 1 << 16


class ActivationOffloader:
    """saved_tensors_hooks that park saved tensors of ``devices`` in (pinned) host memory.

    ``devices`` defaults to ("cuda",); tests pass ("cpu",) to run the same path on a CPU,
    where the "host buffer" is a plain copy. ``stats`` counts what moved ("tensors", "bytes");
    offloaders given one ``stats`` add up into it (the startup self-check reads its own)."""

    def __init__(self, devices: Iterable[str] = ("cuda",), min_bytes: int = MIN_OFFLOAD_BYTES,
                 stats: Counter | None = None):
        self.devices = tuple(devices)
        self.min_bytes = min_bytes
        self.stats = Counter() if stats is None else stats
        self._stream = None

    def _copy_stream(self):
        if self._stream is None and torch.cuda.is_available():
            self._stream = torch.cuda.Stream()
        return self._stream

    def pack(self, t: torch.Tensor):
        if t.device.type not in self.devices or t.numel() * t.element_size() < self.min_bytes:
            return t
        if isinstance(t, nn.Parameter) or (t._base is not None and isinstance(t._base, nn.Parameter)):
            return t  # weights stay resident anyway; a copy would only add traffic
        self.stats["tensors"] += 1
        self.stats["bytes"] += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return (t.device, t.detach().clone(), None)
        buf = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        stream = self._copy_stream()
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written before we copy
        with torch.cuda.stream(stream):
            buf.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)  # keep the GPU storage alive until the copy has read it
        return (t.device, buf, done)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, buf, done = packed
        if done is None:
            return buf
        done.synchronize()
        return buf.to(device, non_blocking=True)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def offload_activations(devices: Iterable[str] = ("cuda",)) -> ActivationOffloader:
    return ActivationOffloader(devices)


StepFn = Callable[..., torch.Tensor]


def grad_step_wrapper(checkpointing: str, offload: bool, offload_devices: Iterable[str] = ("cuda",),
                      stats: Counter | None = None) -> Callable[[StepFn], StepFn] | None:
    """The sampler's wrapper for gradient-carrying denoiser calls: per-step checkpointing when
    ``checkpointing == "step"``, activation offload when ``offload`` (counting what it moves into
    ``stats``); both nest (offload then parks only the step's input latent). None when neither
    applies."""
    from fastvader.memory.checkpointing import step_checkpoint

    if checkpointing != "step" and not offload:
        return None
    devices = tuple(offload_devices)

    def wrap(fn: StepFn) -> StepFn:
        inner = step_checkpoint(fn) if checkpointing == "step" else fn
        if not offload:
            return inner

        def offloaded(x, t):
            with ActivationOffloader(devices, stats=stats):
                return inner(x, t)
        return offloaded

    return wrap


# ---------------------------------------------------------------------------------------------
# frozen-model placement
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def on_demand(modules: Iterable[nn.Module | None], device: torch.device | str,
              enabled: bool = True, park: torch.device | str = "cpu") -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block and back to ``park`` afterwards (a no-op
    when not enabled or when ``device`` is the park device)."""
    mods = [m for m in modules if m is not None]
    device, park = torch.device(device), torch.device(park)
    if not enabled or device == park or not mods:
        yield
        return
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m in mods:
            m.to(park)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the weights' blocks back for the sampler's activations


def park(modules: Iterable[nn.Module | None], where: torch.device | str = "cpu") -> None:
    """Move frozen modules off the GPU (at set-up, for ``frozen_placement=on_demand``)."""
    for m in modules:
        if m is not None:
            m.to(where)


class FrozenPlacement:
    """Where the frozen models live between uses: ``resident`` (always on the device) or
    ``on_demand`` (parked on the CPU; ``load()`` before decode, ``park()`` after backward)."""

    def __init__(self, modules: Iterable[nn.Module | None], device: torch.device | str, policy: str = "resident"):
        self.modules = [m for m in modules if m is not None]
        self.device = torch.device(device)
        self.enabled = policy == "on_demand" and self.device.type != "cpu"
        self.loaded = not self.enabled
        if self.enabled:
            park(self.modules)

    def load(self) -> None:
        if self.enabled and not self.loaded:
            for m in self.modules:
                m.to(self.device)
            self.loaded = True

    def park(self) -> None:
        if self.enabled and self.loaded:
            park(self.modules)
            self.loaded = False
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        self.load()
        try:
            yield
        finally:
            self.park()
