"""A config's training step measured phase by phase (``fastvader profile``).

:class:`PhaseClock` attributes wall time and peak memory to the phase running: the rollout's
no-grad denoising, the grad steps, decode, reward, backward, the optimizer, and everything else
("other": prompts, noise, clipping, guards). Phases nest (the grad steps run inside the
sampler), and every change of phase synchronises the device, so each figure is the phase's own.
On CUDA the peak is torch's ``max_memory_allocated`` within the phase, and torch's memory
history is recorded for the memory viewer; on a CPU there is no allocator to ask, and the
process's resident memory is sampled at each change of phase instead.

:func:`profile` instruments a built :class:`~fastvader.training.trainer.Trainer` through
:class:`~fastvader.patching.core.Patches` (everything is taken off again), runs warm-up steps
(the self-check's eager step, then the step that compiles and records CUDA graphs) and the
measured steps, and returns a JSON-able report; :func:`table` prints it and
:func:`plot_memory` draws the sampled memory over time.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from fastvader.patching.core import InstanceAttr, Patches

PHASES = ("rollout no-grad", "grad steps", "decode", "reward", "backward", "optimizer", "other")
GiB = 2 ** 30


def _host_rss() -> int:
    """The process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PhaseClock:
    """Seconds and peak memory per phase, and a memory sample at every change of phase."""

    def __init__(self, device: torch.device, now: Callable[[], float] = time.perf_counter):
        self.device, self.perf_counter = device, now
        self.cuda = device.type == "cuda"
        self.stack = ["other"]
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        #: (seconds since the clock started, bytes, phase that just ran)
        self.timeline: list[tuple[float, int, str]] = []
        self.start = self.mark = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.perf_counter()

    def _switch(self) -> None:
        now, phase = self._now(), self.stack[-1]
        self.seconds[phase] += now - self.mark
        if self.cuda:
            peak, current = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak = current = _host_rss()
        self.peak[phase] = max(self.peak[phase], peak)
        self.timeline.append((now - self.start, current, phase))
        self.mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def timed(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return call

    def flush(self) -> None:
        """Count the time and memory of the phase running now."""
        self._switch()

    def reset(self) -> None:
        """Forget what was measured (after the warm-up steps)."""
        self._switch()
        self.seconds.clear()
        self.peak.clear()
        self.timeline.clear()
        self.start = self.mark


def instrument(trainer, clock: PhaseClock) -> Patches:
    """Time the trainer's phases on ``clock``; ``revert()`` the handle to take the timers off."""
    patches = Patches()

    def timed(owner: Any, attr: str, phase: str) -> None:
        def make(below):
            call = clock.timed(phase, lambda *a, **k: below()(*a, **k))
            return functools.update_wrapper(call, below())  # keeps markers such as the LR scheduler's on step
        patches.wrap(InstanceAttr(owner, attr), make)

    def grad_steps(below):  # the sampler's wrapper factory, with the grad steps timed around it
        def factory(fn):
            inner = below()
            return clock.timed("grad steps", inner(fn) if inner is not None else fn)
        return factory

    timed(trainer.sampler, "sample", "rollout no-grad")
    patches.wrap(InstanceAttr(trainer.sampler, "grad_step_wrapper"), grad_steps)
    timed(trainer.backbone, "decode_frames", "decode")
    timed(trainer.rollout.reward, "forward", "reward")
    timed(trainer.accelerator, "backward", "backward")
    timed(trainer.optimizer, "step", "optimizer")
    return patches


@contextlib.contextmanager
def memory_history(device: torch.device, path: Path | None):
    """torch's CUDA memory history while the block runs, dumped to ``path`` (open it at
    https://pytorch.org/memory_viz); nothing on a CPU."""
    if device.type != "cuda" or path is None:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        yield
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


def _planner_peak(cfg) -> dict[str, Any]:
    from fastvader.memory.planner import measure, predict

    try:
        prediction = predict(cfg, measure(cfg))
    except Exception as err:  # noqa: BLE001  (the profile stands without the prediction)
        from fastvader.speed.errors import one_line

        return {"error": one_line(err)}
    return {"peak_bytes": prediction.peak, "parts": prediction.parts}


def _engaged(trainer) -> dict[str, Any]:
    cfg = trainer.cfg
    return {"precision": str(trainer.amp_dtype).replace("torch.", ""),
            "weights": str(trainer.weight_dtype).replace("torch.", ""),
            "kernels": {k: str(v) for k, v in (trainer.kernel_report or {}).items()} or "off",
            "speed": trainer.speed.summary(),
            "memory": {"checkpointing": cfg.memory.checkpointing, "offload_activations": cfg.memory.offload_activations,
                       "frozen_placement": cfg.memory.frozen_placement, "decode_chunk": cfg.memory.decode_chunk,
                       "zero_stage": cfg.memory.zero_stage, "optimizer": cfg.optim.name}}


def profile(trainer, steps: int = 2, warmup: int = 2, out_dir: Path | None = None) -> dict[str, Any]:
    """Run ``warmup`` steps (the self-check's eager step, then the one that compiles and records
    CUDA graphs), then measure ``steps`` steps phase by phase."""
    from tqdm.auto import tqdm

    clock = PhaseClock(trainer.device)
    patches = instrument(trainer, clock)
    bar = tqdm(total=warmup + steps, desc="profile", unit="step", disable=not trainer.cfg.train.progress)
    try:
        warm = []
        for _ in range(warmup):
            warm.append(trainer.train_step().seconds)
            bar.update(1)
        clock.reset()
        with memory_history(trainer.device, out_dir / "memory_snapshot.pickle" if out_dir else None):
            seconds = []
            for _ in range(steps):
                seconds.append(trainer.train_step().seconds)
                bar.update(1)
            clock.flush()  # count the phase running at the end
    finally:
        bar.close()
        patches.revert()
    return _report(trainer, clock, steps, warm, seconds)


def _report(trainer, clock: PhaseClock, steps: int, warm: list[float], seconds: list[float]) -> dict[str, Any]:
    cuda = clock.cuda
    step = sum(seconds) / steps
    phases = {name: {"seconds_per_step": clock.seconds.get(name, 0.0) / steps,
                     "share": clock.seconds.get(name, 0.0) / steps / step if step else 0.0,
                     "peak_bytes": clock.peak.get(name)} for name in PHASES}
    not_measured = [] if cuda else [
        f"peak GPU memory: no CUDA device (the memory column is the process's resident memory on {clock.device.type}, "
        "sampled when a phase ends)",
        "CUDA graphs and fp8 matmuls: they need a CUDA device", "torch's memory history (memory_snapshot.pickle)"]
    return {"device": str(clock.device), "steps": steps, "warmup_step_seconds": warm, "step_seconds": step,
            "phases": phases, "peak_bytes": max(clock.peak.values()) if cuda and clock.peak else None,
            "planner": _planner_peak(trainer.cfg), "engaged": _engaged(trainer), "not_measured": not_measured,
            "timeline": clock.timeline}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def table(report: dict[str, Any]) -> str:
    """The report as the text ``fastvader profile`` prints."""
    from fastvader.memory.planner import format_size

    cuda = report["peak_bytes"] is not None
    memory = "peak GiB" if cuda else "RSS GiB"
    lines = [f"{'phase':<16} | {'s/step':>7} | {'share':>6} | {memory:>8}", "-" * 46]
    for name, p in report["phases"].items():
        lines.append(f"{name:<16} | {p['seconds_per_step']:>7.3f} | {p['share']:>6.1%} | {_gib(p['peak_bytes']):>8}")
    lines.append(f"{'step':<16} | {report['step_seconds']:>7.3f} | {1:>6.1%} | {_gib(report['peak_bytes']):>8}")
    warm = ", ".join(f"{s:.2f}" for s in report["warmup_step_seconds"])
    lines.append(f"{report['steps']} measured step(s) on {report['device']}; warm-up step(s) before them: {warm} s")
    planner = report["planner"]
    if "peak_bytes" in planner:
        measured = f"measured {format_size(report['peak_bytes'])}" if cuda else "not measured here"
        lines.append(f"planner's predicted peak: {format_size(planner['peak_bytes'])} ({measured}; the planner does "
                     "not count a CUDA-graph pool)")
    else:
        lines.append(f"planner: no prediction ({planner['error']})")
    engaged = report["engaged"]
    lines.append(f"precision: autocast {engaged['precision']}, weights {engaged['weights']}")
    kernels = engaged["kernels"]
    lines += [f"kernels: {kernels}"] if isinstance(kernels, str) else [f"kernels [{k}]: {v}" for k, v in kernels.items()]
    for name, item in engaged["speed"].items():
        extra = "".join(f", {k}={item[k]}" for k in ("compile_seconds", "graphs", "replays", "error")
                        if item.get(k) is not None)
        lines.append(f"speed.{name}: {'on' if item['engaged'] else 'off'} ({item['detail']}{extra})")
    lines.append("memory: " + ", ".join(f"{k}={v}" for k, v in engaged["memory"].items()))
    lines += [f"not measured: {item}" for item in report["not_measured"]]
    return "\n".join(lines)


_PHASE_COLOURS = {"rollout no-grad": (31, 119, 180), "grad steps": (255, 127, 14), "decode": (44, 160, 44),
                  "reward": (214, 39, 40), "backward": (148, 103, 189), "optimizer": (140, 86, 75),
                  "other": (127, 127, 127)}


def plot_memory(report: dict[str, Any], path: str | Path, width: int = 900, height: int = 360) -> Path:
    """The sampled memory over the measured steps as a PNG (PIL alone): one point per change of
    phase, coloured by the phase that just ran."""
    from PIL import Image, ImageDraw

    path = Path(path)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 150, 30, height - 40
    what = "allocated GPU memory" if report["peak_bytes"] is not None else "resident host memory"
    draw.text((left, 8), f"{what} (GiB) over {report['steps']} step(s), {report['device']}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    samples = report["timeline"]
    if samples:
        t_max = max(t for t, _, _ in samples) or 1.0
        hi = max(b for _, b, _ in samples) / GiB or 1.0

        def xy(t, b):
            return left + (right - left) * t / t_max, bottom - (bottom - top) * (b / GiB) / hi
        draw.line([xy(t, b) for t, b, _ in samples], fill=(200, 200, 200), width=1)
        for t, b, phase in samples:
            x, y = xy(t, b)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_PHASE_COLOURS.get(phase, (0, 0, 0)))
        draw.text((4, top - 4), f"{hi:.2f}", fill="black")
        draw.text((4, bottom - 8), "0", fill="black")
        draw.text((right - 40, bottom + 8), f"{t_max:.1f} s", fill="black")
    for i, (phase, colour) in enumerate(_PHASE_COLOURS.items()):
        draw.rectangle([right + 12, top + 16 * i, right + 22, top + 16 * i + 10], fill=colour)
        draw.text((right + 28, top + 16 * i), phase, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
