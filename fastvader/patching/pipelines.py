"""fastvader as a faster inference backend for a diffusers pipeline::

    pipe = TextToVideoSDPipeline.from_pretrained("ali-vilab/text-to-video-ms-1.7b", torch_dtype=torch.bfloat16).to("cuda")
    report = fastvader.accelerate_pipeline(pipe)   # kernels + speed settings, on CUDA by default
    frames = pipe("a corgi on a beach", num_inference_steps=25).frames
    fastvader.revert_pipeline(pipe)                # the pipeline runs exactly as before

What it does to the pipeline's denoiser (``unet``, or ``transformer`` and ``transformer_2``) and
``vae``: the fused kernels of :func:`fastvader.apply` (``kernels``: auto = on CUDA), then the
``speed`` settings of :class:`fastvader.config.SpeedConfig` on each denoiser (keyword arguments of
the same names: compile, cuda_graphs, channels_last, fp8_rollout, ...), with the denoiser's
calls replayed as CUDA graphs. Pipelines call their denoiser without gradients, so everything
engages from the first call. TextToVideoSDPipeline (ModelScope, ZeroScope), AnimateDiffPipeline
and WanPipeline are the pipelines it is tested on; any pipeline with those attributes works.

CUDA graphs freeze what a call reads besides its tensors at the time they are recorded; the
LoRA adapters' switches and scales are checked at every call, but loading or fusing new
adapters, or swapping attention processors, needs ``revert_pipeline`` and a new
``accelerate_pipeline``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from fastvader.config import SpeedConfig, check_speed, switch_word
from fastvader.patching.core import InstanceAttr, Patches, PatchReport, apply, revert
from fastvader.speed import SpeedPath

DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
_ACCELERATED_ATTR = "_fastvader_pipeline"  # on the pipeline: what accelerate_pipeline did


@dataclass
class PipelineReport:
    """What :func:`accelerate_pipeline` did, per component."""

    kernels: dict[str, PatchReport] = field(default_factory=dict)
    speed: dict[str, SpeedPath] = field(default_factory=dict)
    graph_wrappers: list[Patches] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [f"[{name}] {report}" for name, report in self.kernels.items()]
        lines += [f"[{name}] {path}" for name, path in self.speed.items()]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {"kernels": {k: str(v) for k, v in self.kernels.items()},
                "speed": {k: v.summary() for k, v in self.speed.items()}}


def _components(pipe) -> tuple[dict[str, nn.Module], nn.Module | None]:
    denoisers = {a: getattr(pipe, a) for a in DENOISER_ATTRS if isinstance(getattr(pipe, a, None), nn.Module)}
    if not denoisers:
        raise TypeError(f"fastvader.accelerate_pipeline: {type(pipe).__name__} has no denoiser "
                        f"(none of {list(DENOISER_ATTRS)} is a torch module)")
    vae = getattr(pipe, "vae", None)
    return denoisers, vae if isinstance(vae, nn.Module) else None


def accelerate_pipeline(pipe, *, kernels: str | bool = "auto", ops: list[str] | None = None,
                        **speed: Any) -> PipelineReport:
    """Make ``pipe`` sample faster in place; :func:`revert_pipeline` undoes it exactly. ``speed``
    takes the fields of the config's ``speed`` section (``compile="regional"``, ``cuda_graphs="off"``,
    ``fp8_rollout=True``, ...); settings that cannot engage here say so once and stay off."""
    if _ACCELERATED_ATTR in pipe.__dict__:
        raise RuntimeError("this pipeline is already accelerated by fastvader; call fastvader.revert_pipeline(pipe) first")
    try:
        settings = SpeedConfig(**speed)
    except TypeError as err:
        raise TypeError(f"fastvader.accelerate_pipeline: {err}; the speed settings are "
                        f"{[f for f in SpeedConfig.__dataclass_fields__]}") from None
    check_speed(settings)
    denoisers, vae = _components(pipe)
    device = next(next(iter(denoisers.values())).parameters()).device
    report = PipelineReport()
    pipe.__dict__[_ACCELERATED_ATTR] = report  # what is done so far is undone if a step fails
    try:
        word = switch_word(kernels)
        if word == "on" or (word == "auto" and device.type == "cuda"):
            for name, model in [*denoisers.items(), ("vae", vae)]:
                if model is not None:
                    report.kernels[name] = apply(model, ops)
        for name, model in denoisers.items():
            path = report.speed[name] = SpeedPath(settings, model, device)
            if path.engaged:
                report.graph_wrappers.append(_graph_forward(model, path))
            path.activate()
    except BaseException:
        revert_pipeline(pipe)
        raise
    return report


def _graph_forward(model: nn.Module, path: SpeedPath) -> Patches:
    """Wrap ``model.forward`` in the path's no-grad call (CUDA graphs, compile-cache saving)."""
    patches = Patches()
    patches.wrap(InstanceAttr(model, "forward"),
                 lambda below: path.wrap(lambda *args, **kwargs: below()(*args, **kwargs)))
    return patches


def revert_pipeline(pipe) -> bool:
    """Undo :func:`accelerate_pipeline` (newest first); False when ``pipe`` was not accelerated."""
    report: PipelineReport | None = pipe.__dict__.pop(_ACCELERATED_ATTR, None)
    if report is None:
        return False
    for patches in reversed(report.graph_wrappers):
        patches.revert()
    for path in report.speed.values():
        path.revert()
    denoisers, vae = _components(pipe)
    for name, model in [*denoisers.items(), ("vae", vae)]:
        if name in report.kernels:
            revert(model)
    return True


def is_accelerated(pipe) -> bool:
    return _ACCELERATED_ATTR in pipe.__dict__


__all__ = ["accelerate_pipeline", "revert_pipeline", "is_accelerated", "PipelineReport"]
