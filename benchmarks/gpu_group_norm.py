"""GPU measurements for issue 6: fused GroupNorm+SiLU and checkpointed frame decoding.

    python benchmarks/gpu_group_norm.py            # prints both tables as JSON lines

``measure(device)`` times forward and forward+backward of the fused op against eager
``F.silu(F.group_norm(...))`` at the issue's shapes, reports each as a share of the bandwidth
floor (bytes that must move / copy bandwidth measured in the same run) and the bytes each keeps
for backward. ``measure_decode(device)`` decodes 16 frames at 320x512 through the real SD VAE
architecture (random weights) with every frame carrying gradients and reports peak memory above
the weights, for ``decode_frames`` and for plain ``vae.decode``.

Both also run on CPU with small shapes (``shapes=``, ``frames=``, ``size=``) as a smoke test
of the code; only CUDA numbers mean anything.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(16, 512, 48, 48), (16, 512, 96, 96), (16, 256, 192, 192), (16, 128, 384, 384)]
GROUPS = 32
GIB = 2 ** 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 3) -> float:
    """Median wall time of fn in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps=20)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    seen: dict = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(device: str = "cuda", shapes=SHAPES, dtype: torch.dtype = torch.bfloat16,
            groups: int = GROUPS, reps: int = 10) -> list[dict]:
    """One dict per shape: fused and eager fwd / fwd+bwd ms, share of the bandwidth floor,
    bytes saved for backward."""
    from fastvader.kernels.ops.group_norm import group_norm_triton

    dev = torch.device(device)
    bw = copy_bandwidth(dev, nbytes=(1 << 30) if dev.type == "cuda" else (1 << 24))
    rows = []
    for shape in shapes:
        N, C = shape[:2]
        x = torch.randn(shape, device=dev, dtype=dtype).requires_grad_(True)
        w = torch.randn(C, device=dev, requires_grad=True)
        b = torch.randn(C, device=dev, requires_grad=True)
        dy = torch.randn_like(x)
        x_bytes = x.numel() * x.element_size()

        def fused():
            return group_norm_triton(x, groups, w, b, 1e-5, "silu")

        def eager():
            return F.silu(F.group_norm(x, groups, w.to(dtype), b.to(dtype), 1e-5))

        row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "groups": groups,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "copy_bandwidth_GBps": round(bw / 1e9, 1)}
        for name, fn in (("fused", fused), ("eager", eager)):
            with torch.no_grad():
                fwd = _time_ms(fn, dev, reps)
            fwd_bwd = _time_ms(lambda: torch.autograd.grad(fn(), (x, w, b), dy), dev, reps)
            # Floors: forward reads x and writes y; backward reads x and dy and writes dx.
            row[f"{name}_fwd_ms"] = round(fwd, 3)
            row[f"{name}_fwd_bwd_ms"] = round(fwd_bwd, 3)
            row[f"{name}_fwd_floor_share"] = round(2 * x_bytes / bw / (fwd / 1e3), 3)
            row[f"{name}_fwd_bwd_floor_share"] = round(5 * x_bytes / bw / (fwd_bwd / 1e3), 3)
            row[f"{name}_saved_bytes"] = _saved_bytes(fn)
        row["input_bytes"] = x_bytes
        row["speedup_fwd_bwd"] = round(row["eager_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 2)
        rows.append(row)
        del x, dy
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


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


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: these measurements need a GPU (the CPU path is a smoke test: "
              "measure('cpu', shapes=[(2, 64, 16, 16)]))")
        return
    for row in measure():
        print(json.dumps(row))
    print(json.dumps(measure_decode()))


if __name__ == "__main__":
    main()
