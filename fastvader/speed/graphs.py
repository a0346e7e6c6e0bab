"""CUDA graphs for no-grad calls whose shapes do not change within a run.

:class:`GraphedCall` wraps a callable (the rollout's no-grad denoiser call, or a pipeline
denoiser's forward). Per input *signature* (the pytree of the arguments: tensor shapes, strides,
dtypes and devices, the other values, and a state key such as the LoRA adapters' switches) the
first call runs plainly, which is when torch.compile compiles; the second warms up on a side
stream and records the call as a CUDA graph with static input buffers; every later call copies
its inputs into those buffers, replays the graph and returns a copy of the static outputs. The
graphs of one GraphedCall share one memory pool, so they hold the working set of the largest
call, not the sum.

A graph replays exactly the kernels it recorded: Python-level state read inside the call
(adapter switches, attention processors, hooks) is frozen at capture, except what the state
key covers. Parameters updated in place (optimizer steps) are read fresh at every replay.
If recording fails the call says so once and runs un-graphed from then on.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Hashable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fastvader.speed.errors import one_line


class CudaGraphRecorder:
    """Records CUDA graphs into one shared memory pool."""

    def __init__(self):
        self.pool = None

    def record(self, run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        """Warm ``run`` up on a side stream, record it; returns its static outputs and the replay."""
        autocast = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                        enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)  # no cached casts in a graph
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast(**autocast):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.autocast(**autocast):
            out = run()
        if self.pool is None:
            self.pool = graph.pool()
        return out, graph.replay


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device))
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return ("value", leaf)
    return ("object", id(leaf))


class _Graph:
    def __init__(self, leaves: list[Any], spec, fn: Callable, recorder):
        self.inputs = [torch.empty_like(x).copy_(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(self.inputs, spec)
        self.outputs, self.replay_graph = recorder.record(lambda: fn(*args, **kwargs))

    def __call__(self, leaves: list[Any]) -> Any:
        for static, value in zip(self.inputs, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        self.replay_graph()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)


class GraphedCall:
    """``fn`` replayed as CUDA graphs for calls without gradients once :meth:`activate`-d.
    ``state_key()`` returns what else a recorded graph depends on; ``recorder`` records them
    (default :class:`CudaGraphRecorder`)."""

    def __init__(self, fn: Callable, state_key: Callable[[], Hashable] = lambda: None, recorder=None):
        self.fn, self.state_key = fn, state_key
        self.recorder = recorder if recorder is not None else CudaGraphRecorder()
        self.graphs: dict[Hashable, _Graph] = {}
        self.seen: set[Hashable] = set()
        self.active = False
        self.error: str | None = None
        self.replays = 0
        self.record_seconds = 0.0

    def activate(self) -> None:
        self.active = True

    def __call__(self, *args, **kwargs):
        if not self.active or self.error is not None or torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves), self.state_key())
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # the first call compiles; record from the second
                self.seen.add(key)
                return self.fn(*args, **kwargs)
            graph = self._record(key, leaves, spec)
            if graph is None:
                return self.fn(*args, **kwargs)
        self.replays += 1
        return graph(leaves)

    def _record(self, key: Hashable, leaves: list[Any], spec) -> _Graph | None:
        start = time.perf_counter()
        try:
            graph = _Graph(leaves, spec, self.fn, self.recorder)
        except Exception as err:  # noqa: BLE001  (a call that cannot be recorded still runs)
            self.error = one_line(err)
            warnings.warn(f"fastvader: speed.cuda_graphs could not record the call ({self.error}); it runs "
                          "without CUDA graphs", stacklevel=3)
            return None
        self.record_seconds += time.perf_counter() - start
        self.graphs[key] = graph
        return graph

    def describe(self) -> str:
        return f"{len(self.graphs)} graph(s) recorded, {self.replays} replay(s)"

    def release(self) -> None:
        """Drop the recorded graphs and their memory pool."""
        self.graphs.clear()
        self.seen.clear()
        self.active = False


def adapter_state(model: nn.Module) -> Callable[[], Hashable]:
    """A state key for :class:`GraphedCall`: the switches of ``model``'s peft adapter layers
    (disabled, active adapters, scales, train/eval), which a recorded graph would freeze."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return lambda: None
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return lambda: tuple((m.disable_adapters, tuple(m.active_adapters), tuple(sorted(getattr(m, "scaling", {}).items())),
                          m.training) for m in layers)
