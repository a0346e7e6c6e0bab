"""torch.compile of a denoiser, regional (its repeated blocks) or full, with an exact undo.

Each compiled module gets a :class:`CompiledForward` as a *replacement* of its ``forward``
(through :class:`fastvader.patching.core.Patches`), so that it sits beneath fastvader's wrappers:
the activation-checkpoint wrapper stays outermost and eager and checkpoints the compiled call,
and its Python call counter is never traced. What the compiled forward runs is the forward the
module had when it was installed: a kernel patch's fused forward, or the class's own.

Compiled blocks run only once the handle is :meth:`CompiledRegions.activate`-d (the trainer
activates it when the startup self-check has taken its probes off the model: their Python
counters inside a compiled block would be baked into the graph) and, unless ``grad`` is set,
only for calls without gradients; the others run the same forward eagerly. Every block shape
compiles once (``dynamic=False``: static shapes, the fastest kernels); the first failure to
compile says so once and leaves the blocks eager.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from fastvader.patching.core import InstanceAttr, Patches
from fastvader.speed.errors import one_line
from fastvader.speed.regions import repeated_blocks

#: compiled graphs one block class may hold (a UNet's block classes come in many shapes, and
#: every compiled module shares the dynamo cache of its class's forward; torch's default is 8)
RECOMPILE_LIMIT = 64


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileState:
    """What every compiled block of one handle shares: whether compiled code runs, for which
    calls, the time spent compiling and the first failure."""

    def __init__(self, grad: bool):
        self.active = False
        self.grad = grad
        self.compile_seconds = 0.0
        self.calls = 0
        self.error: str | None = None

    def wants_compiled(self) -> bool:
        return self.active and self.error is None and (self.grad or not torch.is_grad_enabled())

    def run(self, compiled: Callable, eager: Callable, args: tuple, kwargs: dict) -> Any:
        before, start = _graphs_compiled(), time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # tracing or the backend failed: not the model
            self.error = one_line(err)
            warnings.warn(f"fastvader: speed.compile failed ({self.error}); the denoiser runs eagerly", stacklevel=3)
            return eager(*args, **kwargs)  # a model error raises again here, as it would uncompiled
        if _graphs_compiled() != before:
            self.compile_seconds += time.perf_counter() - start
        self.calls += 1
        return out


class CompiledForward:
    """A module's forward that runs compiled when its :class:`CompileState` says so."""

    def __init__(self, eager: Callable, state: CompileState, backend: str):
        self.eager, self.state = eager, state
        self.compiled = torch.compile(eager, backend=backend, dynamic=False)

    def __call__(self, *args, **kwargs):
        if not self.state.wants_compiled():
            return self.eager(*args, **kwargs)
        return self.state.run(self.compiled, self.eager, args, kwargs)


class CompiledRegions:
    """``mode="regional"``: every repeated block of ``model`` (:func:`repeated_blocks`) compiled;
    ``"full"``: the whole model. ``revert()`` restores every ``forward`` exactly; revert it
    before the patches it was installed over (fastvader reverts newest first)."""

    def __init__(self, model: nn.Module, mode: str, backend: str = "inductor", grad: bool = False):
        if mode not in ("regional", "full"):
            raise ValueError(f"speed.compile={mode!r}: choose regional or full")
        self.mode, self.backend = mode, backend
        self.state = CompileState(grad)
        self.modules = repeated_blocks(model) if mode == "regional" else [model]
        self.patches = Patches()
        for module in self.modules:
            slot = InstanceAttr(module, "forward")
            self.patches.replace(slot, CompiledForward(slot.resolve(slot.base()), self.state, backend))

    def activate(self) -> None:
        self.state.active = True

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        blocks = ", ".join(f"{name} x{n}" for name, n in counts.items()) or "no block found"
        steps = "grad steps compiled too" if self.state.grad else "grad steps eager"
        return f"{self.mode} via {self.backend}: {blocks}; {steps}"

    def revert(self) -> int:
        return self.patches.revert()


# ---------------------------------------------------------------------------------------------
# compiled artifacts across runs
# ---------------------------------------------------------------------------------------------
def compile_cache_file(folder: str | None, model: nn.Module, backend: str) -> Path:
    """The file ``speed.compile_cache`` keeps this denoiser's artifacts in: one per denoiser class,
    torch version and backend, in ``folder`` (None: ~/.cache/fastvader/compile, or under
    $XDG_CACHE_HOME)."""
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        folder = os.path.join(base, "fastvader", "compile")
    return Path(os.path.expanduser(folder)) / f"{type(model).__name__}-torch{torch.__version__}-{backend}.bin"


def load_compile_cache(path: Path | None) -> int:
    """Hand the artifacts a previous run saved to torch (inductor, AOTAutograd and autotuning
    caches: torch's mega-cache); returns the bytes read (0 without a file)."""
    if path is None or not path.is_file():
        return 0
    data = path.read_bytes()
    try:
        torch.compiler.load_cache_artifacts(data)
    except Exception as err:  # noqa: BLE001  (a stale or foreign cache only costs a compile)
        warnings.warn(f"fastvader: ignoring the compile cache {path}: {type(err).__name__}: {err}", stacklevel=2)
        return 0
    return len(data)


def save_compile_cache(path: Path | None) -> int:
    """Write what torch compiled so far for the next run (written whole or not at all);
    returns the bytes written."""
    if path is None:
        return 0
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(saved[0])
    os.replace(partial, path)
    return len(saved[0])
