"""What the kernel benchmarks (gpu_temporal_attention.py, gpu_group_norm.py) share: GPU timing,
copy bandwidth, switching kernel generations and markdown tables (their JSON files under
benchmarks/results/ are written by result_files.py, as every benchmark's are).

Timing: on a GPU, ``reps`` calls are captured in one CUDA graph and the graph is replayed with
CUDA events around it, so the figure is GPU time per call without Python launch overhead; where
capture fails (some library paths cannot be captured) the same loop runs eagerly between two
events and the record says ``timing: events``. On a CPU (--dry-run) it is wall time, a wiring
check only.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def kernel_generation(impl: str) -> Iterator[None]:
    """Run fastvader's ops with kernel generation ``impl`` ('v2' or 'v1') inside the block."""
    old = os.environ.get("FASTVADER_KERNEL_IMPL")
    os.environ["FASTVADER_KERNEL_IMPL"] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTVADER_KERNEL_IMPL", None)
        else:
            os.environ["FASTVADER_KERNEL_IMPL"] = old


def _graph_ms(fn: Callable[[], object], reps: int, replays: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def _events_ms(fn: Callable[[], object], reps: int, replays: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 50, replays: int = 5) -> tuple[float, str]:
    """(milliseconds per call, method): the median over ``replays`` of ``reps`` back-to-back calls."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(replays):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / reps)
        return statistics.median(times), "wall (cpu)"
    try:
        return _graph_ms(fn, reps, replays), "cuda graph"
    except Exception:  # noqa: BLE001  (not capturable: time the eager loop instead)
        torch.cuda.synchronize()
        return _events_ms(fn, reps, replays), "events"


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), measured the same way."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, reps=10, replays=5)
    return 2 * nbytes / (ms / 1e3)


def floor_pct(nbytes: int, bandwidth: float, ms: float | None) -> float | None:
    """The memory-bandwidth floor (bytes over copy bandwidth) as a percentage of ``ms``."""
    return None if not ms else 100.0 * (nbytes / bandwidth * 1e3) / ms


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows``: columns as (header, key, format spec); '-' for missing values."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
