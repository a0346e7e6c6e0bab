"""GPU check of fastvader's own VideoCrafter2 and Open-Sora modules at full size (random weights,
bf16): one no-grad CFG denoiser call (time), and one VADER-style gradient step (LoRA r16 on the
attention, sub-block checkpointing, CFG, one decoded frame, backward) with its peak memory.

    python benchmarks/gpu_custom_backbones.py [--out results.json] [--only videocrafter2|opensora]

Not a pytest file: it needs a CUDA device and several GiB; numbers go to the JSON and stdout.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


DEVICE = "cuda"
TINY = False  # --tiny: the test-size configs on any device, to try the script before a GPU run


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if DEVICE == "cuda" else 0.0


def _allocated_gib() -> float:
    return round(torch.cuda.memory_allocated() / 2 ** 30, 2) if DEVICE == "cuda" else 0.0


def _reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _timed(fn, repeats: int = 3) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def _lora(module, targets):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets), module)
    module.requires_grad_(False)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def videocrafter2(frames: int = 12, height: int = 320, width: int = 512) -> dict:
    from fastvader.backbones.videocrafter2 import VideoCrafter2Backbone
    from fastvader.backbones.videocrafter2.config import tiny_config

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if TINY:
        frames, height, width = 2, 16, 16
    with torch.device(DEVICE):
        model = VideoCrafter2Backbone(tiny_config() if TINY else None)
        model.denoiser.randomize_zero_initialized_layers()
    model.to(torch.bfloat16)
    build_s = time.perf_counter() - t0
    c, f, h, w = model.latent_shape(frames, height, width)
    latents = torch.randn(1, c, f, h, w, device=DEVICE, dtype=torch.bfloat16)
    text = model.config.text
    context = torch.randn(2, text.context_length, text.width, device=DEVICE, dtype=torch.bfloat16)
    t = torch.tensor([961], device=DEVICE)

    def cfg_call(x):
        out = model.denoise(torch.cat([x, x]), t.expand(2), context)
        uncond, cond = out.chunk(2)
        return uncond + 12.0 * (cond - uncond)

    with torch.no_grad():
        fwd_s = _timed(lambda: cfg_call(latents))

    lora = _lora(model.denoiser, model.default_lora_targets)
    model.denoiser.enable_gradient_checkpointing()
    model.vae.enable_gradient_checkpointing()
    scheduler = model.make_scheduler("ddim")
    scheduler.set_timesteps(25)
    _reset_peak()
    base = _allocated_gib()
    start = time.perf_counter()
    eps = cfg_call(latents)
    x0 = scheduler.step(eps, scheduler.timesteps[-1], latents, eta=1.0).prev_sample
    pixels = model.decode_latents(x0, frames=[frames // 2])
    loss = -pixels.mean()
    loss.backward()
    _sync()
    step_s = time.perf_counter() - start
    grads_ok = all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
    return dict(model="videocrafter2", video=[frames, height, width], latent=[c, f, h, w], build_s=round(build_s, 2),
                cfg_forward_ms=round(fwd_s * 1e3, 1), grad_step_s=round(step_s, 3),
                weights_gib=base, grad_step_peak_gib=_peak_gib(),
                lora_params=sum(p.numel() for p in lora), lora_grads_nonzero=bool(grads_ok),
                finite=bool(torch.isfinite(loss).item()))


def opensora(frames: int = 51, height: int = 240, width: int = 424) -> dict:
    from fastvader.backbones.opensora import OpenSoraBackbone
    from fastvader.backbones.opensora.config import tiny_config

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if TINY:
        frames, height, width = 7, 16, 16
    with torch.device(DEVICE):
        model = OpenSoraBackbone(tiny_config() if TINY else None)
    model.to(torch.bfloat16)
    build_s = time.perf_counter() - t0
    c, f, h, w = model.latent_shape(frames, height, width)
    latents = torch.randn(1, c, f, h, w, device=DEVICE, dtype=torch.bfloat16)
    st = model.config.stdit
    y = torch.randn(2, st.model_max_length, st.caption_channels, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.zeros(2, st.model_max_length, dtype=torch.long, device=DEVICE)
    mask[:, :4] = 1
    t = torch.tensor([900.0], device=DEVICE)

    def cfg_call(x):
        out = model.denoise(torch.cat([x, x]), t.expand(2), y, mask=mask)
        uncond, cond = out.chunk(2)
        return uncond + 7.0 * (cond - uncond)

    with torch.no_grad():
        fwd_s = _timed(lambda: cfg_call(latents), repeats=2)

    lora = _lora(model.denoiser, model.default_lora_targets)
    model.denoiser.enable_gradient_checkpointing()
    model.vae.gradient_checkpointing = True
    scheduler = model.make_scheduler("euler_flow")
    scheduler.set_timesteps(30)
    _reset_peak()
    base = _allocated_gib()
    start = time.perf_counter()
    v = cfg_call(latents)
    x0 = scheduler.step(v, scheduler.timesteps[-1], latents).prev_sample
    pixels = model.decode_frames(x0, frames=[frames // 2], grad_frames=[frames // 2])
    loss = -pixels.mean()
    loss.backward()
    _sync()
    step_s = time.perf_counter() - start
    grads_ok = all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
    return dict(model="opensora", video=[frames, height, width], latent=[c, f, h, w], build_s=round(build_s, 2),
                cfg_forward_ms=round(fwd_s * 1e3, 1), grad_step_s=round(step_s, 3),
                weights_gib=base, grad_step_peak_gib=_peak_gib(),
                lora_params=sum(p.numel() for p in lora), lora_grads_nonzero=bool(grads_ok),
                finite=bool(torch.isfinite(loss).item()), flow_shift=round(scheduler.shift, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=["videocrafter2", "opensora"], default=None)
    parser.add_argument("--tiny", action="store_true", help="test-size configs (a dry run, e.g. on CPU)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE, TINY
    DEVICE, TINY = args.device, args.tiny
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__}
    for name, fn in (("videocrafter2", videocrafter2), ("opensora", opensora)):
        if args.only and args.only != name:
            continue
        try:
            results[name] = fn()
        except Exception as e:  # report and go on to the next model
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(results[name]), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
