"""The ``speed`` settings of a config, resolved for one device and put on one denoiser.

:class:`SpeedPath` decides what engages (``auto``: on CUDA, off on the CPU; a setting asked for
by name that cannot engage says so once, in a warning and in :meth:`SpeedPath.summary`, and the
run goes on without it), installs it on the denoiser in the order that composes (channels_last
weights, fp8 shadows, compiled blocks) and wraps the call the rollout makes without gradients
(:meth:`SpeedPath.wrap`: CUDA graphs, and saving freshly compiled artifacts for the next run).
Nothing runs compiled or graphed before :meth:`activate`; :meth:`revert` takes everything off.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from fastvader.config import SpeedConfig, switch_word
from fastvader.speed.compile import CompiledRegions, compile_cache_file, load_compile_cache, save_compile_cache
from fastvader.speed.fp8 import NoGradFp8, fp8_unavailable
from fastvader.speed.graphs import GraphedCall, adapter_state
from fastvader.speed.layout import ChannelsLast

SETTINGS = ("compile", "cuda_graphs", "channels_last", "fp8_rollout")


@dataclass
class Engagement:
    """One setting: what the config asked for, whether it engaged, and what it did or why not."""

    requested: str
    engaged: bool
    detail: str


def _switch(value: Any, name: str, device: torch.device, needs_cuda: bool) -> tuple[bool, str]:
    """(engage?, why not) for an auto/on/off setting."""
    word = switch_word(value)
    if word == "off":
        return False, "off"
    if word == "auto" and device.type != "cuda":
        return False, f"auto: off on {device.type} (speed.{name}=on to force it)"
    if needs_cuda and device.type != "cuda":
        return False, f"needs a CUDA device; this run is on {device.type}"
    return True, ""


class SpeedPath:
    """``settings`` (a :class:`SpeedConfig`) on ``model`` (the denoiser) running on ``device``."""

    def __init__(self, settings: SpeedConfig, model: nn.Module, device: torch.device | str):
        self.settings, self.model, self.device = settings, model, torch.device(device)
        self.report: dict[str, Engagement] = {}
        self.layout: ChannelsLast | None = None
        self.fp8: NoGradFp8 | None = None
        self.regions: CompiledRegions | None = None
        self.graphed: list[GraphedCall] = []
        self.cache_file = None
        self.cache_loaded_bytes = 0
        self._saved_compile_seconds = 0.0
        self._install()

    def _install(self) -> None:
        s, device = self.settings, self.device
        on, why = _switch(s.channels_last, "channels_last", device, needs_cuda=False)
        if on:
            self.layout = ChannelsLast(self.model)
        self._note("channels_last", s.channels_last, self.layout, why)

        why = "off" if not s.fp8_rollout else fp8_unavailable(device)
        if why is None:
            self.fp8 = NoGradFp8(self.model)
        self._note("fp8_rollout", s.fp8_rollout, self.fp8, why or "")

        requested = switch_word(s.compile)
        mode = requested if requested != "auto" else ("regional" if device.type == "cuda" else "off")
        why = "off" if requested == "off" else f"auto: off on {device.type} (speed.compile=regional to compile here)"
        if mode != "off":
            if s.compile_cache:
                self.cache_file = compile_cache_file(s.compile_cache_dir, self.model, s.compile_backend)
                self.cache_loaded_bytes = load_compile_cache(self.cache_file)
            self.regions = CompiledRegions(self.model, mode, s.compile_backend, s.compile_grad_steps)
            if not self.regions.modules:
                why = f"no repeated block found in {type(self.model).__name__} (speed.compile=full compiles it whole)"
                self.regions = None
        self._note("compile", s.compile, self.regions, why)

        self.graphs_on, why = _switch(s.cuda_graphs, "cuda_graphs", device, needs_cuda=True)
        self.report["cuda_graphs"] = Engagement(str(s.cuda_graphs), self.graphs_on,
                                                "no-grad rollout calls replayed as CUDA graphs" if self.graphs_on else why)
        self._warn_refused()

    def _note(self, name: str, requested: Any, installed: Any, why: str) -> None:
        detail = installed.describe() if installed is not None else why
        self.report[name] = Engagement(str(requested), installed is not None, detail)

    def _warn_refused(self) -> None:
        """Once per path: each setting asked for by name that cannot engage."""
        for name, item in self.report.items():
            if not item.engaged and switch_word(item.requested) not in ("off", "auto"):
                warnings.warn(f"fastvader: speed.{name}={item.requested} cannot engage: {item.detail}; "
                              "running without it", stacklevel=4)

    @classmethod
    def for_rollout(cls, settings: SpeedConfig, backbone, sampler, device: torch.device | str) -> "SpeedPath":
        """The path on ``backbone.denoiser``, its no-grad calls made through ``sampler``
        (``Sampler.nograd_denoise``); says what engaged when anything did."""
        path = cls(settings, backbone.denoiser, device)
        sampler.nograd_denoise = path.wrap(backbone.denoise)
        if path.engaged:
            print(f"[speed] {path}")
        return path

    # -- the no-grad call ------------------------------------------------------------------------
    def wrap(self, fn: Callable) -> Callable:
        """``fn`` (a denoiser call made without gradients) replayed as CUDA graphs when they
        engaged; after a call that compiled something, the compile cache is saved."""
        call: Callable = fn
        if self.graphs_on:
            call = GraphedCall(fn, adapter_state(self.model))
            self.graphed.append(call)

        def fast_call(*args, **kwargs):
            out = call(*args, **kwargs)
            if self.regions is not None and self.regions.state.compile_seconds > self._saved_compile_seconds:
                self._saved_compile_seconds = self.regions.state.compile_seconds
                save_compile_cache(self.cache_file)
            return out

        return fast_call

    def activate(self) -> None:
        """From now on compiled blocks and CUDA graphs run."""
        if self.regions is not None:
            self.regions.activate()
        for call in self.graphed:
            call.activate()

    @property
    def engaged(self) -> list[str]:
        return [name for name, item in self.report.items() if item.engaged]

    def summary(self) -> dict[str, Any]:
        """What engaged and what it did so far (for the self-check, summary.json, profile)."""
        out: dict[str, Any] = {name: asdict(item) for name, item in self.report.items()}
        if self.regions is not None:
            state = self.regions.state
            out["compile"].update(compile_seconds=round(state.compile_seconds, 2), compiled_calls=state.calls,
                                  error=state.error, cache_file=str(self.cache_file) if self.cache_file else None,
                                  cache_loaded_bytes=self.cache_loaded_bytes)
        if self.graphed:
            out["cuda_graphs"].update(graphs=sum(len(c.graphs) for c in self.graphed),
                                      replays=sum(c.replays for c in self.graphed),
                                      record_seconds=round(sum(c.record_seconds for c in self.graphed), 2),
                                      error=next((c.error for c in self.graphed if c.error), None))
        return out

    def __str__(self) -> str:
        return "fastvader speed: " + "; ".join(f"{name}: {'on' if item.engaged else 'off'} ({item.detail})"
                                               for name, item in self.report.items())

    def revert(self) -> None:
        """Take every setting off the denoiser, newest first; the wrapped calls run plainly."""
        for call in self.graphed:
            call.release()
        for part in (self.regions, self.fp8, self.layout):
            if part is not None:
                part.revert()
        self.regions = self.fp8 = self.layout = None
