"""GPU benchmark of fused GroupNorm+SiLU (fastvader v2 and v1 against eager PyTorch) at every
GroupNorm shape of the UNets and VAE decoders of ModelScope, AnimateDiff and VideoCrafter2, and
checkpointed frame decoding.

    python -m benchmarks.gpu_group_norm                 # table + JSON in benchmarks/results/
    python -m benchmarks.gpu_group_norm --dry-run       # CPU, the tiny ModelScope: checks the wiring, no figure
    python -m benchmarks.gpu_group_norm --decode        # also measure_decode (16 frames 320x512 through the SD VAE)

Shapes: :func:`group_norm_sites` builds each preset (configs/<preset>.yaml, the packaged real
configs, random weights) on the meta device and records the input of every ``nn.GroupNorm``
(shape, strides, groups) during one classifier-free-guidance denoiser call at the preset's
resolution and frames, and during the VAE decode of one frame (fastvader decodes frame by frame)
and of 16 frames at once (VADER's eager decode). Each distinct input is measured once; ``sites``
counts the norms that see it.

Per shape and implementation, bf16, the norm's weight and bias frozen (LoRA training):
``fwd_ms`` (gradients off: fastvader's inference op, no statistics), ``fwd_bwd_ms`` (training
forward + ``torch.autograd.grad`` to x, dy with x's strides), both as CUDA-graph replays, and
their share of the bandwidth floor of the op's own traffic (forward: read x, write y; forward +
backward: that, then read x and dy, write dx: 5 tensors), with copy bandwidth measured in the
same run; ``saved_bytes``; ``max_err`` against an fp32 reference; ``plan`` (v2's path and
blocks). Implementations: ``fastvader`` (v2), ``fastvader-v1`` (FASTVADER_KERNEL_IMPL=v1) and
``eager`` (``F.silu(F.group_norm(...))``).

``measure_decode(device)`` decodes 16 frames at 320x512 through the real SD VAE architecture
(random weights) with every frame carrying gradients and reports peak memory above the weights,
for ``decode_frames`` and for plain ``vae.decode``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import copy_bandwidth, floor_pct, kernel_generation, markdown_table, time_ms  # noqa: E402
from result_files import record, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("modelscope", "animatediff", "videocrafter2")
DRY_PRESETS = ("tiny_modelscope",)
DRY_MAX_SHAPES = 1
VAE_BATCHES = (1, 16)
IMPLS = ("fastvader", "fastvader-v1", "eager")
GIB = 2 ** 30


# --------------------------------------------------------------------------------------------
# the shapes: every GroupNorm input of a preset's denoiser and VAE decoder
# --------------------------------------------------------------------------------------------
def _record_inputs(modules: nn.Module, part: str, seen: collections.Counter):
    """Forward pre-hooks on every nn.GroupNorm of ``modules`` counting (part, shape, strides,
    groups) of their inputs; returns the hook handles."""
    def hook(module, args):
        x = args[0]
        seen[(part, tuple(x.shape), tuple(x.stride()), module.num_groups)] += 1
    return [m.register_forward_pre_hook(hook) for m in modules.modules() if isinstance(m, nn.GroupNorm)]


def group_norm_sites(preset: str) -> list[dict]:
    """The distinct GroupNorm inputs of ``preset`` (one CFG denoiser call; VAE decodes of 1 and 16
    frames), built on the meta device: [{model, part, shape, strides, groups, sites}]."""
    from fastvader.config import load_config
    from fastvader.memory.accounting import gpu_like_attention
    from fastvader.memory.planner import build_on_meta
    from fastvader.training.sampling import classifier_free_guidance

    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    backbone, _, _ = build_on_meta(cfg, torch.bfloat16)
    shape = backbone.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
    latents = torch.empty(1, *shape, device="meta", dtype=torch.bfloat16)
    seen: collections.Counter = collections.Counter()
    handles = _record_inputs(backbone.denoiser, "denoiser", seen)
    try:
        with torch.no_grad(), gpu_like_attention():
            classifier_free_guidance(backbone, latents, 500, backbone.placeholder_embeddings(1, torch.bfloat16),
                                     cfg.sampler.guidance_scale)
            for frames in VAE_BATCHES:
                for h in handles:
                    h.remove()
                handles = _record_inputs(backbone.vae, f"vae decoder, {frames} frame(s)", seen)
                backbone.decode_frames(latents[:, :, :1].expand(-1, -1, frames, -1, -1).contiguous(),
                                       list(range(frames)), [], chunk=frames)
    finally:
        for h in handles:
            h.remove()
    return [{"model": preset, "part": part, "shape": list(s), "strides": list(st), "groups": g, "sites": n}
            for (part, s, st, g), n in seen.items()]


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    seen: dict = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _impl(name: str, x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    if name == "eager":
        return lambda: F.silu(F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype), 1e-6))
    from fastvader.kernels import group_norm

    return lambda: group_norm(x, groups, w, b, 1e-6, "silu")


def _plan(x: torch.Tensor, groups: int) -> str:
    from fastvader.kernels.ops import group_norm as gn

    return gn._plan(x, groups, None, None).describe()


def _measure_site(site: dict, impls, device, dtype, bandwidth, reps) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty_strided(site["shape"], site["strides"], device=device, dtype=dtype)
    x.copy_(torch.randn(x.shape, device=device, generator=gen))
    x.requires_grad_(True)
    dy = torch.empty_strided(x.shape, x.stride(), device=device, dtype=dtype).copy_(torch.randn(x.shape, device=device, generator=gen))
    channels, groups = x.shape[1], site["groups"]
    w, b = (torch.randn(channels, device=device, generator=gen) for _ in range(2))
    with torch.no_grad():
        want = F.silu(F.group_norm(x.float(), groups, w, b, 1e-6))
    x_bytes = x.numel() * x.element_size()
    replays = 5 if device.type == "cuda" else 1
    rows = []
    for name in impls:
        row = {**site, "impl": name, "dtype": str(dtype).replace("torch.", ""), "x_bytes": x_bytes, "error": None}
        try:
            with kernel_generation("v1" if name == "fastvader-v1" else "v2"):
                fn = _impl(name, x, groups, w, b)
                with torch.no_grad():
                    out = fn()
                    fwd_ms, method = time_ms(fn, device, reps, replays)
                fwd_bwd_ms, _ = time_ms(lambda: torch.autograd.grad(fn(), x, dy), device, reps, replays)
                row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, timing=method, saved_bytes=_saved_bytes(fn),
                           max_err=(out.float() - want).abs().max().item(),
                           fwd_floor_pct=floor_pct(2 * x_bytes, bandwidth, fwd_ms),
                           fwd_bwd_floor_pct=floor_pct(5 * x_bytes, bandwidth, fwd_bwd_ms),
                           plan=_plan(x, groups) if name == "fastvader" else None)
        except Exception as err:  # noqa: BLE001  (recorded; the other implementations still run)
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        rows.append(row)
    return rows


def _distinct_sites(presets) -> list[dict]:
    """Each (shape, strides, groups) once, with the models and parts that use it and their sites."""
    merged: dict[tuple, dict] = {}
    for preset in presets:
        for site in group_norm_sites(preset):
            key = (tuple(site["shape"]), tuple(site["strides"]), site["groups"])
            if key in merged:
                merged[key]["sites"] += site["sites"]
                merged[key]["model"] += f", {preset}" if preset not in merged[key]["model"] else ""
            else:
                merged[key] = dict(site)
    return list(merged.values())


def measure(device: str = "cuda", presets=PRESETS, impls=IMPLS, reps: int = 50, dry: bool = False,
            log=print) -> tuple[list[dict], dict]:
    """(rows, meta): one row per (distinct GroupNorm input, implementation)."""
    dev = torch.device(device)
    if dev.type != "cuda" and not dry:
        raise RuntimeError("measure() needs a CUDA device (dry=True checks the wiring on a CPU)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sites = _distinct_sites(DRY_PRESETS if dry else presets)
    sites = sites[:DRY_MAX_SHAPES] if dry else sites
    bandwidth = copy_bandwidth(dev)
    rows = []
    for site in sites:
        rows += _measure_site(site, impls, dev, dtype, bandwidth, reps if not dry else 1)
        log(format_table(rows[-len(impls):], header=len(rows) == len(impls)))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows, {"presets": list(DRY_PRESETS if dry else presets), "copy_GBps": bandwidth / 1e9,
                  "dtype": str(dtype).replace("torch.", "")}


COLUMNS = [("model", "model", ""), ("part", "part", ""), ("shape", "shape", ""), ("groups", "groups", ""),
           ("sites", "sites", ""), ("impl", "impl", ""), ("fwd ms", "fwd_ms", ".3f"), ("fwd+bwd ms", "fwd_bwd_ms", ".3f"),
           ("fwd % floor", "fwd_floor_pct", ".1f"), ("fwd+bwd % floor", "fwd_bwd_floor_pct", ".1f"),
           ("saved MiB", "saved_MiB", ".1f"), ("max err", "max_err", ".2e"), ("plan", "plan", ""),
           ("error", "error", "")]


def format_table(rows: list[dict], header: bool = True) -> str:
    shown = [{**r, "saved_MiB": None if r.get("saved_bytes") is None else r["saved_bytes"] / 2 ** 20} for r in rows]
    table = markdown_table(shown, COLUMNS)
    return table if header else "\n".join(table.splitlines()[2:])


# --------------------------------------------------------------------------------------------
# checkpointed frame decoding (peak memory)
# --------------------------------------------------------------------------------------------
def sd_vae(device, dtype, config: dict | None = None):
    """The SD 1.5 VAE architecture from its real config, random weights, frozen."""
    from diffusers import AutoencoderKL

    from fastvader.model_configs import packaged_config

    if config is None:
        config = json.loads(packaged_config("sd15/vae_config.json").read_text())
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def measure_decode(device: str = "cuda", frames: int = 16, size: tuple[int, int] = (320, 512),
                   dtype: torch.dtype = torch.bfloat16, chunk: int = 1, vae_config: dict | None = None,
                   eager: bool = True) -> dict:
    """Peak memory above the weights for a decode of ``frames`` frames with gradients on all of
    them: decode_frames (plain, and with the group_norm patch) vs plain vae.decode."""
    import fastvader
    from fastvader.memory.decode import decode_frames, to_unit_range

    dev = torch.device(device)
    vae = sd_vae(dev, dtype, vae_config)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = size[0] // f, size[1] // f
    on_gpu = dev.type == "cuda"
    result = {"frames": frames, "size": list(size), "dtype": str(dtype).replace("torch.", ""),
              "chunk": chunk, "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu"}

    def run(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        torch.manual_seed(1)
        lat = torch.randn(1, vae.config.latent_channels, frames, h, w, device=dev, dtype=dtype,
                          requires_grad=True)
        if on_gpu:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        try:
            out = fn(lat)
            out.float().mean().backward()
        except torch.cuda.OutOfMemoryError:
            result[f"{name}_peak_GiB"] = "OOM"
            return
        if on_gpu:
            torch.cuda.synchronize(dev)
            result[f"{name}_peak_GiB"] = round((torch.cuda.max_memory_allocated(dev) - base) / GIB, 3)
        result[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        result[f"{name}_grad_norm"] = float(lat.grad.float().norm())

    run("decode_frames", lambda lat: decode_frames(vae, lat, chunk=chunk))
    report = fastvader.apply(vae, ops=["group_norm"])
    result["patched_backend"] = report.backends.get("group_norm")
    try:
        run("decode_frames_fused_gn", lambda lat: decode_frames(vae, lat, chunk=chunk))
    finally:
        fastvader.revert(vae)
    if eager:
        def plain(lat):
            z = lat[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
            return to_unit_range(vae.decode(z).sample)
        run("eager_decode", plain)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=50, help="calls per timed CUDA graph")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tiny ModelScope: the wiring only")
    parser.add_argument("--decode", action="store_true", help="also measure checkpointed decoding's peak memory")
    parser.add_argument("--results-dir", default=None,
                        help="where the JSON goes (default benchmarks/results/; a dry run: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run to check the wiring on a CPU)")
    rows, meta = measure("cpu" if args.dry_run else "cuda", args.presets, args.impls, args.reps, dry=args.dry_run)
    if args.decode and not args.dry_run:
        meta["decode"] = measure_decode()
        print(json.dumps(meta["decode"]))
    print(f"wrote {write(record('group_norm', rows, dry_run=args.dry_run, extra=meta), args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
