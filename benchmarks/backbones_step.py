"""One VADER step per diffusers backbone at its full size (random weights), on a GPU.

    python benchmarks/backbones_step.py [family ...]

For each family: build the real architecture (bf16) on the GPU, LoRA r16 (fp32) on the default
targets, encode a prompt (the text encoder visits the GPU and goes back to the CPU), sample
``--steps`` CFG steps under bf16 autocast with gradients on the last one only, decode one frame
with gradients, score it with target_color, backward. Prints one JSON line per family: peak GPU
memory, time per no-grad CFG denoiser call, the grad step (forward + decode + backward) and the
prompt encode. Not a test: numbers only mean something on the card they were measured on.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

SIZES = {  # the family defaults: (frames, height, width, sampler, guidance)
    "modelscope": (16, 384, 384, "ddim", 9.0),
    "animatediff": (16, 512, 512, "ddim", 7.5),
    "wan": (81, 480, 832, "euler_flow", 5.0),
}


CUDA = torch.cuda.is_available()


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak() -> float:
    return gib(torch.cuda.max_memory_allocated()) if CUDA else 0.0


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def run(name: str, steps: int, frame: int | None, tiny: bool = False) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    from fastvader.backbones import build_backbone
    from fastvader.config import BackboneConfig
    from fastvader.rewards.toy import TargetColorReward

    frames, height, width, sampler, guidance = SIZES[name]
    dev = "cuda" if CUDA else "cpu"
    if tiny:  # a dry run of this script on a CPU
        frames, height, width = (5 if name == "wan" else 2), 32, 32
    result: dict = {"family": name, "video": [frames, height, width], "steps": steps}
    reset_peak()
    t0 = time.perf_counter()
    with torch.device(dev):  # random init on the GPU: seconds instead of minutes on the CPU
        bb = build_backbone(BackboneConfig(name=name, random_init=True, dtype="bf16" if CUDA else "fp32",
                                           options={"tiny": tiny}))
    bb.to(dev)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["text_encoder_on"] = str(bb.text_encoder.device)
    result["resident_GiB"] = gib(torch.cuda.memory_allocated()) if CUDA else 0.0

    emb, t_enc = timed(lambda: bb.encode_prompts(["a red panda running in the snow"]))
    result["encode_s"] = round(t_enc, 2)
    result["text_encoder_after_encode"] = str(bb.text_encoder.device)
    result["encode_peak_GiB"] = peak()
    result["after_encode_GiB"] = gib(torch.cuda.memory_allocated()) if CUDA else 0.0
    emb = emb.to(dev, torch.bfloat16 if CUDA else torch.float32)

    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=bb.default_lora_targets), bb.denoiser)
    bb.requires_grad_(False)
    lora = [p for n, p in bb.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    result["lora_params"] = sum(p.numel() for p in lora)
    if getattr(bb.denoiser, "_supports_gradient_checkpointing", False):
        bb.denoiser.enable_gradient_checkpointing()
        result["checkpointing"] = "diffusers"
    else:
        result["checkpointing"] = "none (UNet3DConditionModel refuses it)"

    sched = bb.make_scheduler(sampler)
    sched.set_timesteps(steps)
    shape = bb.latent_shape(frames, height, width)
    x = torch.randn(1, *shape, device=dev)
    context = torch.cat([emb.uncond, emb.cond])
    reset_peak()
    nograd_times = []

    def cfg_step(x, t):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=CUDA):
            u, c = bb.denoise(torch.cat([x, x]), t.expand(2).to(dev), context).chunk(2)
        return sched.step((u + guidance * (c - u)).float(), t, x).prev_sample

    for t in sched.timesteps[:-1]:
        with torch.no_grad():
            x, dt = timed(lambda: cfg_step(x, t))
        nograd_times.append(dt)
    result["nograd_cfg_call_s"] = round(sorted(nograd_times)[len(nograd_times) // 2], 3) if nograd_times else None
    result["sampling_peak_GiB"] = peak()

    pick = frame if frame is not None else (0 if name == "wan" else frames - 1)
    reward = TargetColorReward("red").to(dev)

    def grad_step():
        x_last = cfg_step(x, sched.timesteps[-1])
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=CUDA):
            video = bb.decode_frames(x_last, [pick])
        loss = -reward(video.float(), ["a red panda"]).mean()
        loss.backward()
        return loss

    reset_peak()
    loss, t_grad = timed(grad_step)
    result["decoded_frame"] = pick
    result["grad_step_s"] = round(t_grad, 2)
    result["grad_step_peak_GiB"] = peak()
    result["loss"] = float(loss.detach())
    grads = [p.grad for p in lora if p.grad is not None]
    result["lora_grad_norm"] = float(torch.stack([g.float().norm() for g in grads]).norm()) if grads else 0.0
    result["non_lora_grads"] = sum(1 for n, p in bb.named_parameters() if "lora_" not in n and p.grad is not None)
    del bb, emb, x, lora, grads
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="*", default=list(SIZES),
                        help="family or family:frame (the decoded frame; default the last, 0 for wan)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32x32 (a CPU dry run)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--frame", type=int, default=None, help="decoded frame for every family")
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}),
          flush=True)
    for spec in args.families:
        name, _, frame = spec.partition(":")
        try:
            print(json.dumps(run(name, args.steps, int(frame) if frame else args.frame, args.tiny)), flush=True)
        except Exception as e:  # report and go on to the next family
            print(json.dumps({"family": name, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
