"""The GPU suite's speed sections (docs/speed.md): the no-grad denoiser call and a diffusers
pipeline, each eagerly and through fastvader's speed settings, with the fidelity of the fast path.

- :func:`nograd_call`: one no-grad ModelScope UNet call at 384x384x16 with CFG (batch 2), bf16:
  ms per call for eager, torch.compile alone (the whole UNet, kernels off) and the fastvader fast
  path (kernels and the ``speed`` defaults), with each variant's first and second call (compile;
  CUDA graph recording) timed apart, and the compile and recording seconds the speed path counted.
- :func:`pipeline`: TextToVideoSDPipeline around the ModelScope UNet and VAE (random weights),
  25 DDIM steps, eager against ``fastvader.accelerate_pipeline`` (and with ``fp8_rollout`` on):
  seconds per video, and the fidelity of the accelerated pipeline's latents after the 25 steps
  (relative error) and decoded frames (PSNR) against the eager bf16 pipeline's.

A dry run does both on the CPU at toy size (tiny ModelScope models, fp32, the ``eager`` compile
backend: dynamo traces, nothing is compiled), which checks the wiring and measures nothing.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: the settings that turn the speed path off (eager rollouts, as before the speed section)
SPEED_OFF = {"compile": "off", "cuda_graphs": "off", "channels_last": "off"}
#: dry runs: what can run on a CPU, quickly (on CUDA "auto" engages the rest)
DRY_SPEED = {"compile": "regional", "compile_backend": "eager", "compile_cache": False}


@dataclass
class Variant:
    """A way to run the denoiser: fastvader's kernels on or off, and the ``speed`` settings."""

    name: str
    kernels: bool
    speed: dict[str, Any] = field(default_factory=dict)


def call_variants(dry: bool) -> list[Variant]:
    full_compile = {**SPEED_OFF, "compile": "full", "compile_cache": False}
    if dry:
        full_compile["compile_backend"] = "eager"
    return [Variant("eager", False, SPEED_OFF), Variant("torch.compile alone", False, full_compile),
            Variant("fastvader fast path", not dry, DRY_SPEED if dry else {})]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed(fn, device: torch.device) -> tuple[Any, float]:
    t0 = _sync(device)
    out = fn()
    return out, _sync(device) - t0


def _speed_backbone(base, variant: Variant, device: torch.device, dtype: torch.dtype):
    """A copy of ``base`` on ``device`` in ``dtype`` with the variant installed; returns it, its
    no-grad denoise call and the SpeedPath (revert it when done)."""
    import fastvader
    from fastvader.config import SpeedConfig, check_speed
    from fastvader.speed import SpeedPath

    backbone = copy.deepcopy(base)
    backbone.to(device, dtype)
    if variant.kernels:
        fastvader.apply(backbone.denoiser)
    settings = SpeedConfig(**variant.speed)
    check_speed(settings)
    path = SpeedPath(settings, backbone.denoiser, device)
    denoise = path.wrap(backbone.denoise)
    path.activate()
    return backbone, denoise, path


def nograd_call(results: dict, args, base_backbone, frames: int, height: int, width: int,
                guidance_scale: float, calls: int) -> list[dict[str, Any]]:
    """Per-call milliseconds of the no-grad CFG denoiser call, per variant."""
    from fastvader.training.sampling import classifier_free_guidance

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    rows = []
    for variant in call_variants(args.dry_run):
        backbone, denoise, path = _speed_backbone(base_backbone, variant, device, dtype)
        latents = torch.randn(1, *backbone.latent_shape(frames, height, width), device=device, dtype=dtype)
        embeds = backbone.placeholder_embeddings(1, dtype)
        t = torch.tensor(500, device=device)  # mid-chain; the call costs the same at every step

        def call():
            with torch.no_grad():
                return classifier_free_guidance(backbone, latents, t, embeds, guidance_scale, denoise)

        _, first = _timed(call, device)   # compiles
        _, second = _timed(call, device)  # records the CUDA graphs
        _, total = _timed(lambda: [call() for _ in range(calls)], device)
        summary = path.summary()
        rows.append({"variant": variant.name, "ms_per_call": 1000 * total / calls, "first_call_s": first,
                     "second_call_s": second, "compile_s": summary["compile"].get("compile_seconds"),
                     "graph_record_s": summary["cuda_graphs"].get("record_seconds"),
                     "engaged": ", ".join(path.engaged) or "-",
                     "shape": f"{height}x{width}x{frames} CFG batch 2", "dtype": str(dtype).replace("torch.", "")})
        path.revert()
        del backbone, denoise, path
        if device.type == "cuda":
            torch.cuda.empty_cache()
    eager_ms = rows[0]["ms_per_call"]
    for row in rows:
        row["speedup_vs_eager"] = eager_ms / row["ms_per_call"]
    results["nograd_call"] = rows
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR of frames in [0, 1] (None for identical frames: the reference row)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return None if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def pipeline_variants(dry: bool) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, accelerate_pipeline's keyword arguments or None for the plain pipeline)."""
    if dry:
        return [("eager", None), ("fastvader.accelerate_pipeline", {"kernels": "off", **DRY_SPEED})]
    return [("eager", None), ("fastvader.accelerate_pipeline", {}),
            ("fastvader.accelerate_pipeline fp8", {"fp8_rollout": True})]


def pipeline(results: dict, args, backbone, frames: int, height: int, width: int, steps: int,
             guidance_scale: float) -> list[dict[str, Any]]:
    """Seconds per video of a TextToVideoSDPipeline, plain and accelerated; the accelerated
    latents and frames against the plain ones."""
    import diffusers

    import fastvader

    pipe = diffusers.TextToVideoSDPipeline(unet=backbone.denoiser, vae=backbone.vae, text_encoder=backbone.text_encoder,
                                           tokenizer=backbone.tokenizer, scheduler=backbone.make_scheduler("ddim"))
    device = backbone.device

    def sample(output_type: str) -> torch.Tensor:
        out = pipe("a corgi running on a beach at sunset", num_inference_steps=steps, guidance_scale=guidance_scale,
                   height=height, width=width, num_frames=frames, output_type=output_type,
                   generator=torch.Generator(device).manual_seed(0))
        return out.frames if isinstance(out.frames, torch.Tensor) else torch.as_tensor(out.frames)

    rows, reference = [], None
    for name, settings in pipeline_variants(args.dry_run):
        report = None if settings is None else fastvader.accelerate_pipeline(pipe, **settings)
        try:
            sample("latent")  # warm-up: compiles and records
            latents, seconds = _timed(lambda: sample("latent"), device)
            video = sample("pt")
        finally:
            engaged = "-" if report is None else ", ".join(report.speed["unet"].engaged) or "-"
            fastvader.revert_pipeline(pipe)
        reference = reference or (latents, video, seconds)
        rows.append({"variant": name, "s_per_video": seconds, "speedup_vs_eager": reference[2] / seconds,
                     "latent_rel_error": _relative_error(latents, reference[0]),
                     "frames_psnr_db": _psnr(video.float(), reference[1].float()), "engaged": engaged,
                     "steps": steps, "size": f"{height}x{width}x{frames}"})
    results["pipeline"] = rows
    return rows
