"""The end-to-end GPU suite: one command on one H100/H200.

    python -m benchmarks.gpu_suite                 # everything, JSON to benchmarks/gpu_suite.json
    python -m benchmarks.gpu_suite --families      # and the CogVideoX / image-to-video rows (gpu_families.py)
    python -m benchmarks.gpu_suite --dry-run       # CPU, toy backbone, tiny sizes: checks the wiring
    python -m benchmarks.gpu_suite --kernels-only  # the kernel benchmarks and kernel tests alone

(The speed paths compile on their first run; their compiled artifacts are reused from
~/.cache/fastvader/compile afterwards, so a second run of the suite is shorter.)

It builds ModelScope T2V 1.7B from the packaged model configs with random weights (the registered
``modelscope`` backbone when present, else fastvader.memory.reference_models' ``modelscope_arch``)
and the aesthetic reward's architecture (CLIP ViT-L/14 + LAION MLP, random weights: ``aesthetic``
with random_init when registered, else ``aesthetic_arch``), and measures in the same process:

- a VADER-style baseline path: kernels off, fp32 base weights under fp16 autocast, sub-block
  checkpointing, eager decode of the chosen frames with every decoder activation kept;
- "bf16 plain": bf16 weights and autocast with kernels and speed settings off (the reference of
  the same precision for the fast path's LoRA-gradient cosine);
- "fastvader": kernels on, bf16 weights and autocast, the default memory settings, speed off;
- "fastvader fast": the same with the ``speed`` defaults (regional compile, CUDA graphs,
  channels_last; under the 24 GiB cap, with the planner's choice for that budget);
- "fast + compiled grad steps": the same with ``speed.compile_grad_steps`` (which is faster is
  what this row measures);

for each config (384x384x16 K=1 one frame; all 16 frames; K=10; 320x512x16 all frames), each
again under a hard 24 GiB cap (torch.cuda.set_per_process_memory_fraction). Per run: peak
allocated memory, step time and its split (no-grad sampling, grad steps, decode, reward,
backward), and per config the cosine of each path's LoRA gradients with the baseline's and
with "bf16 plain"'s (same seed, same LoRA weights). Then the speed sections
(benchmarks/gpu_speed.py: the no-grad call, the diffusers pipeline with its fidelity), the kernel
benchmarks (benchmarks/gpu_temporal_attention.py: fastvader v2 and v1 against SDPA's best
backend, FlexAttention and eager; benchmarks/gpu_group_norm.py: v2, v1 and eager at every
GroupNorm shape of three video models), the kernel tests compiled on the GPU (pytest with
TRITON_INTERPRET unset) and the big-model rows (benchmarks/gpu_big_models.py: Wan 2.1 14B and
Open-Sora 1.2 360p under a 24 GiB cap, block swap cost, fp8 fidelity). Each section runs in its
own try/except: a failure is recorded and the rest still runs. The table prints last; every
table is also written as JSON under benchmarks/results/ by benchmarks/result_files.py (or under
--results-dir; a dry run's go to a temporary folder unless --results-dir says where).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # loaded from its file (the tests): its siblings import from the root
    sys.path.insert(0, str(ROOT))
from benchmarks import gpu_speed  # noqa: E402  (before the root leaves sys.path, below)
from benchmarks.result_files import environment, record, write  # noqa: E402

GiB = 2 ** 30
#: steps before the measured one, the same on every path (so all measure the same draw): the
#: self-check's eager step (Triton compiles), then the step that compiles blocks and records graphs
WARMUP_STEPS = 2
PATHS = ("baseline", "bf16 plain", "fastvader", "fastvader fast", "fast + compiled grad steps")
CAPPED_PATHS = ("baseline", "fastvader fast")
# `python -m benchmarks.gpu_suite` puts the repository root first on sys.path, where kernels/
# answers transformers' probe for Hugging Face's `kernels` package and breaks its imports.
# fastvader is installed and `benchmarks` is already imported, so the root can go.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
# The kernel benchmarks import their shared helpers (kernel_bench) from this folder.
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclasses.dataclass
class SuiteConfig:
    name: str
    frames: int
    height: int
    width: int
    k: int
    reward_frames: str  # frames.reward spec


FULL_CONFIGS = [
    SuiteConfig("384x384x16 K=1 one frame", 16, 384, 384, 1, "random:1"),
    SuiteConfig("384x384x16 K=1 all frames", 16, 384, 384, 1, "all"),
    SuiteConfig("384x384x16 K=10 one frame", 16, 384, 384, 10, "random:1"),
    SuiteConfig("320x512x16 K=1 all frames", 16, 320, 512, 1, "all"),
]
DRY_CONFIGS = [
    SuiteConfig("toy 16x16x4 K=1 one frame", 4, 16, 16, 1, "random:1"),
    SuiteConfig("toy 16x16x4 K=2 all frames", 4, 16, 16, 2, "all"),
]


# ---------------------------------------------------------------------------------------------
# building the runs
# ---------------------------------------------------------------------------------------------
def _backbone_and_reward(dry: bool) -> tuple[dict, dict, str]:
    """Backbone and reward config sections, and a note on what stands in for what."""
    from fastvader.backbones import available_backbones
    from fastvader.memory import reference_models  # noqa: F401  (registers the *_arch names)
    from fastvader.rewards import available_rewards

    if dry:
        return ({"name": "toy", "random_init": True}, {"name": "brightness"},
                "dry run: toy backbone and brightness reward on the CPU; numbers are CPU figures")
    notes = []
    if "modelscope" in available_backbones():
        backbone = {"name": "modelscope", "random_init": True}
    else:
        backbone = {"name": "modelscope_arch", "random_init": True}
        notes.append("backbone: modelscope_arch (UNet3D + SD VAE from the packaged configs; fixed random text "
                     "embeddings instead of the text encoder, which leaves the GPU after embedding anyway)")
    if "aesthetic" in available_rewards():
        reward = {"name": "aesthetic", "options": {"aesthetic": {"random_init": True}}}
    else:
        reward = {"name": "aesthetic_arch"}
        notes.append("reward: aesthetic_arch (CLIP ViT-L/14 vision tower + LAION MLP architecture, random "
                     "weights) standing in for the unregistered `aesthetic` reward")
    return backbone, reward, "; ".join(notes)


def make_config(sc: SuiteConfig, path: str, backbone: dict, reward: dict, out_dir: str, dry: bool,
                steps: int, budget: str | None):
    from fastvader.config import TrainConfig

    data: dict[str, Any] = {
        "backbone": dict(backbone),
        "video": {"frames": sc.frames, "height": sc.height, "width": sc.width},
        "sampler": {"name": "ddim", "steps": steps, "guidance_scale": 9.0 if not dry else 7.5,
                    "truncation": "last" if sc.k == 1 else f"specific:{sc.k}"},
        "frames": {"reward": sc.reward_frames, "grad": "same"},
        # random A and B (not B=0), so gradients reach both factors; a vanishing learning rate
        # keeps the LoRA weights at their start, so both paths' gradients are taken at one point
        "lora": {"rank": 16, "alpha": 16.0, "target_modules": ["to_q", "to_k", "to_v"], "init_weights": False},
        "optim": {"lr": 1e-12, "weight_decay": 0.0},
        "reward": dict(reward),
        "prompts": {"items": ["a corgi running on a beach at sunset"]},
        "validation": {"prompts": ["a corgi"], "save_videos": False},
        "train": {"steps": 10, "batch_size": 1, "seed": 0, "output_dir": out_dir, "run_name": "suite",
                  "progress": False, "device": "cpu" if dry else "cuda"},
    }
    data["speed"] = dict(gpu_speed.SPEED_OFF)
    if path == "baseline":
        data["kernels"] = {"enabled": "off"}
        data["backbone"]["dtype"] = "fp32"
        data["train"]["precision"] = "fp32" if dry else "fp16"  # CPU autocast has no fp16 GradScaler path
        data["memory"] = {"checkpointing": "sub_block"}
    else:
        data["kernels"] = {"enabled": "off" if dry or path == "bf16 plain" else "on"}
        data["backbone"]["dtype"] = "fp32" if dry else "bf16"
        data["train"]["precision"] = "fp32" if dry else "bf16"
        if path in ("fastvader fast", "fast + compiled grad steps"):
            data["speed"] = dict(gpu_speed.DRY_SPEED) if dry else {}
            data["speed"]["compile_grad_steps"] = path != "fastvader fast"
        if budget:
            data["memory"] = {"gpu_memory": budget}
    return TrainConfig.from_dict(data).validate()


def eager_decode(vae, latents, frames=None, grad_frames=None, chunk=1):
    """VADER's decode: the chosen frames through the VAE in one batch, every activation kept."""
    b, c, f, h, w = latents.shape
    frames = list(range(f)) if frames is None else list(frames)
    z = latents[:, :, frames].transpose(1, 2).reshape(b * len(frames), c, h, w)
    x = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1).view(b, len(frames), *x.shape[1:])


class GradStepTimer:
    """Wraps the sampler's grad-step calls to time them apart from the no-grad steps."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wrap(self, inner):
        def wrapper(fn):
            wrapped = inner(fn) if inner else fn

            def timed(x, t):
                t0 = self._sync()
                out = wrapped(x, t)
                self.seconds += self._sync() - t0
                return out
            return timed
        return wrapper


def run_once(cfg, path: str, base_backbone, base_reward, lora_state: dict | None, dry: bool) -> dict[str, Any]:
    """Build a Trainer around copies of the prebuilt models, warm up one step, measure one."""
    from fastvader.training import trainer as train_loop
    from fastvader.lora import lora_state_dict

    device = torch.device("cpu" if dry else "cuda")
    backbone, reward = copy.deepcopy(base_backbone), copy.deepcopy(base_reward)
    if path == "baseline":  # VADER's eager decode replaces the backbone's checkpointed one
        backbone.decode_frames = lambda latents, frames=None, grad_frames=None, chunk=1: eager_decode(
            backbone.vae, latents, frames, grad_frames)
    trainer = train_loop.Trainer(cfg, backbone=backbone, reward=reward)
    init_lora = lora_state_dict(trainer.backbone.denoiser) if lora_state is None else None
    if lora_state is not None:  # both paths start from the same LoRA weights
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.backbone.denoiser, {k: v.to(device) for k, v in lora_state.items()})
    timer = GradStepTimer(device)
    trainer.sampler.grad_step_wrapper = timer.wrap(trainer.sampler.grad_step_wrapper)
    grads: list[torch.Tensor] = []
    original_clip = trainer.accelerator.clip_grad_norm_

    def capture(params, max_norm):  # after backward, before clipping and the update: the step's gradients
        grads[:] = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                               for p in trainer.lora_params]).cpu()]
        return original_clip(params, max_norm)  # a scaled fp16 gradient has the same direction

    trainer.accelerator.clip_grad_norm_ = capture
    for _ in range(WARMUP_STEPS):
        trainer._train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer.seconds = 0.0
    result = trainer._train_step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    t = result.timings
    out = {
        "path": path, "peak_bytes": peak, "step_s": result.seconds,
        "nograd_sampling_s": t.get("sample", 0.0) - timer.seconds, "grad_steps_s": timer.seconds,
        "decode_s": t.get("decode", 0.0), "reward_s": t.get("reward", 0.0), "backward_s": t.get("backward", 0.0),
        "grad_steps": result.grad_steps, "reward": result.reward,
        "memory": {"checkpointing": trainer.cfg.memory.checkpointing,
                   "offload_activations": trainer.cfg.memory.offload_activations,
                   "frozen_placement": trainer.cfg.memory.frozen_placement, "optim": trainer.cfg.optim.name},
        "kernels": {k: str(v) for k, v in (trainer.kernel_report or {}).items()},
        "speed": ", ".join(trainer.speed.engaged) or "-",
    }
    out["_grad"] = grads[0] if grads else None
    out["_lora"] = init_lora
    trainer.close()
    del trainer, backbone, reward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _cap(budget_bytes: int | None):
    if budget_bytes is None or not torch.cuda.is_available():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def cap():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    return cap()


def section(results: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; record its error instead of stopping the suite."""
    t0 = time.perf_counter()
    try:
        value = fn()
        results.setdefault("sections", {})[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        return value
    except Exception as err:  # noqa: BLE001  (the suite must print the rest)
        results.setdefault("sections", {})[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                                     "error": f"{type(err).__name__}: {err}".splitlines()[0][:400],
                                                     "traceback": traceback.format_exc()[-2000:]}
        print(f"[gpu_suite] {name} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return None


def cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None or a.numel() != b.numel():
        return None
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else None


# ---------------------------------------------------------------------------------------------
# the sections
# ---------------------------------------------------------------------------------------------
def build_models(results: dict, args) -> dict[str, Any]:
    """The backbone and reward every run copies (fp32 on the CPU), and their config sections."""
    from fastvader.backbones import build_backbone
    from fastvader.rewards import build_reward

    backbone_cfg, reward_cfg, note = _backbone_and_reward(args.dry_run)
    results["models_note"] = note
    configs = DRY_CONFIGS if args.dry_run else FULL_CONFIGS
    probe = make_config(configs[0], "baseline", backbone_cfg, reward_cfg, args.out_dir, args.dry_run, args.steps, None)
    t0 = time.perf_counter()
    models = {"backbone_cfg": backbone_cfg, "reward_cfg": reward_cfg,
              "backbone": build_backbone(probe.backbone).freeze(), "reward": build_reward(probe.reward).freeze()}
    results["build_s"] = round(time.perf_counter() - t0, 1)
    return models


def end_to_end(results: dict, args, models: dict[str, Any]) -> None:
    from fastvader.config import parse_bytes

    configs = DRY_CONFIGS if args.dry_run else FULL_CONFIGS
    if args.only:
        configs = [c for c in configs if any(s in c.name for s in args.only)]
    caps = [None] if args.dry_run or args.no_cap else [None, args.cap]
    rows = results.setdefault("runs", [])
    for cap in caps:  # every uncapped run first: a suite cut short still has the main table
        for sc in configs:
            budget_bytes = None if cap is None else parse_bytes(cap, "--cap")
            runs = [_one_run(results, args, models, sc, path, cap, budget_bytes)
                    for path in (PATHS if cap is None else CAPPED_PATHS)]
            for row in runs:
                row.pop("_lora", None)
            grads = {row["path"]: row.pop("_grad", None) for row in runs}
            for row in runs:
                row["lora_grad_cosine"] = cosine(grads.get("baseline"), grads[row["path"]])
                row["cosine_vs_bf16_plain"] = cosine(grads.get("bf16 plain"), grads[row["path"]])
            rows.extend(runs)


def _one_run(results: dict, args, models: dict[str, Any], sc: SuiteConfig, path: str, cap: str | None,
             budget_bytes: int | None) -> dict[str, Any]:
    """One row of the end-to-end table (a failed run is a row naming its error). Every path of a
    config starts from the first path's LoRA weights."""
    name = f"{sc.name} | {path}" + (f" | cap {cap}" if cap else "")
    lora_state = models.get("lora_state") if path != "baseline" else None

    def one():
        cfg = make_config(sc, path, models["backbone_cfg"], models["reward_cfg"], args.out_dir, args.dry_run,
                          args.steps, cap if path != "baseline" else None)
        with _cap(budget_bytes):
            return run_once(cfg, path, models["backbone"], models["reward"], lora_state, args.dry_run)

    row = section(results, name, one)
    if row is None:
        err = results["sections"][name]["error"]
        row = {"path": path, "error": "OOM" if "OutOfMemory" in err else err, "_grad": None}
    elif row.get("_lora") is not None:
        models["lora_state"] = row["_lora"]
    row.update(config=sc.name, cap=cap)
    print(f"[gpu_suite] {name}: " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        if k in ("peak_bytes", "step_s", "error")), flush=True)
    return row


def speed_sections(results: dict, args, models: dict[str, Any]) -> None:
    """The no-grad call and the pipeline (benchmarks/gpu_speed.py), each a section of its own."""
    from fastvader.backbones import build_backbone
    from fastvader.config import BackboneConfig

    if args.dry_run:  # the toy backbone has no text encoder for a diffusers pipeline
        backbone = build_backbone(BackboneConfig(name="modelscope", random_init=True, dtype="fp32",
                                                 options={"tiny": True})).freeze()
        size, device, dtype = dict(frames=2, height=32, width=32), torch.device("cpu"), torch.float32
    else:
        backbone = models["backbone"]
        size, device, dtype = dict(frames=16, height=384, width=384), torch.device("cuda"), torch.bfloat16
    section(results, "nograd_call", lambda: gpu_speed.nograd_call(results, args, backbone, guidance_scale=9.0,
                                                                  calls=2 if args.dry_run else 20, **size))

    def pipe():
        copy_ = copy.deepcopy(backbone)
        copy_.to(device, dtype)
        return gpu_speed.pipeline(results, args, copy_, steps=args.steps, guidance_scale=9.0, **size)

    section(results, "pipeline", pipe)


def families(results: dict, args) -> None:
    """The CogVideoX and image-to-video rows (benchmarks/gpu_families.py), also written as their
    own table (``--families-json``, else under ``--results-dir``)."""
    from benchmarks import gpu_families

    family_args = argparse.Namespace(dry_run=args.dry_run, steps=args.family_steps, cap=args.cap, no_cap=args.no_cap,
                                     only=[], out_dir=args.out_dir)
    gpu_families.measure(results, family_args)
    gpu_families.write(results["family_runs"], results["environment"], args.dry_run, args.results_dir,
                       args.families_json)


def kernel_benchmarks(results: dict, args) -> None:
    """Temporal attention (fastvader v2 and v1, SDPA's best backend, FlexAttention, eager) and
    GroupNorm+SiLU (v2, v1, eager) at the grid ``--kernel-grid``, each written as JSON under
    ``--results-dir``; on a GPU also checkpointed decoding's peak memory. In a dry run: tiny
    shapes on the CPU (wiring only, no figure)."""
    import gpu_group_norm
    import gpu_temporal_attention

    out = results.setdefault("kernel_benchmarks", {})
    device = "cpu" if args.dry_run else "cuda"
    for name, module, kwargs in (("temporal_attention", gpu_temporal_attention, {"grid": args.kernel_grid}),
                                 ("group_norm", gpu_group_norm, {})):
        def run(module=module, kwargs=kwargs, name=name):
            rows, meta = module.measure(device, dry=args.dry_run, **kwargs)
            rec = record(name, rows, env=results["environment"], dry_run=args.dry_run, extra=meta)
            return {"json": str(write(rec, args.results_dir)), "rows": rows, **meta}
        out[name] = section(results, f"kernel benchmark {name}", run)
    if not args.dry_run:
        out["decode"] = section(results, "kernel benchmark decode", gpu_group_norm.measure_decode)


def kernel_tests(results: dict, args) -> None:
    files = [f for f in ("tests/kernels",) if (ROOT / f).is_dir()]
    if not files:
        results["kernel_tests"] = "no kernel test files present"
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the heuristic launch configurations: measuring candidates per test shape would cost minutes
    # (tests/kernels/test_temporal_attention.py runs every candidate on purpose)
    env.update(PYTHONPATH="", FASTVADER_AUTOTUNE="0")
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.kernel_test_timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    results["kernel_tests"] = {"files": files, "returncode": proc.returncode, "summary": tail[-1] if tail else "",
                               "tail": tail[-30:]}
    if proc.returncode != 0:
        raise RuntimeError(f"kernel tests failed: {tail[-1] if tail else proc.returncode}")


def big_models(results: dict, args) -> None:
    """The big-model rows, each in its own process (benchmarks/gpu_big_models.py)."""
    from benchmarks import gpu_big_models

    results_dir = [] if args.results_dir is None else ["--results-dir", args.results_dir]
    results["big_models"] = gpu_big_models.main(["--steps", str(args.big_model_steps), *results_dir])


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict) -> str:
    head = ("config", "cap", "path", "peak GiB", "step s", "nograd s", "grad s", "decode s", "reward s",
            "backward s", "speedup", "cos", "cos plain", "speed")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    runs = results.get("runs", [])
    for r in runs:
        base = next((b for b in runs if b["config"] == r["config"] and b["cap"] == r["cap"]
                     and b["path"] == "baseline" and "step_s" in b), None)
        speed = "-"
        if r["path"] != "baseline" and base is not None and r.get("step_s"):
            speed = f"{base['step_s'] / r['step_s']:.2f}x"
        if "error" in r:
            cells = (r["config"], r["cap"] or "-", r["path"], r["error"][:40], *["-"] * 10)
        else:
            cos, plain = r.get("lora_grad_cosine"), r.get("cosine_vs_bf16_plain")
            cells = (r["config"], r["cap"] or "-", r["path"], _fmt_bytes(r["peak_bytes"]), _fmt_s(r["step_s"]),
                     _fmt_s(r["nograd_sampling_s"]), _fmt_s(r["grad_steps_s"]), _fmt_s(r["decode_s"]),
                     _fmt_s(r["reward_s"]), _fmt_s(r["backward_s"]), speed, "-" if cos is None else f"{cos:.4f}",
                     "-" if plain is None else f"{plain:.4f}", r.get("speed", "-"))
        lines.append(" | ".join(str(c) for c in cells))
    for name in ("nograd_call", "pipeline"):
        lines += _speed_table(name, results.get(name) or [])
    failed = [n for n, s in results.get("sections", {}).items() if not s["ok"]]
    kt = results.get("kernel_tests")
    lines.append(f"kernel tests on the GPU: {kt.get('summary') if isinstance(kt, dict) else kt}")
    lines.append(f"sections failed: {failed if failed else 'none'}")
    return "\n".join(lines)


def _speed_table(name: str, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["", f"{name}:", " | ".join(columns), " | ".join("---" for _ in columns)]
    return lines + [" | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                               for c in columns) for r in rows]


#: the JSON tables (benchmarks/results/): results key -> columns
TABLE_COLUMNS = {
    "runs": ["config", "cap", "path", "peak_bytes", "step_s", "nograd_sampling_s", "grad_steps_s", "decode_s",
             "reward_s", "backward_s", "lora_grad_cosine", "cosine_vs_bf16_plain", "speed", "error"],
    "nograd_call": ["variant", "ms_per_call", "speedup_vs_eager", "first_call_s", "second_call_s",
                    "compile_s", "graph_record_s", "engaged",
                    "shape", "dtype"],
    "pipeline": ["variant", "s_per_video", "speedup_vs_eager", "latent_rel_error", "frames_psnr_db", "engaged",
                 "steps", "size"],
}


def write_tables(results: dict, args) -> list[Path]:
    """Each table of this run as JSON under --results-dir (default: result_files.default_dir)."""
    names = {"runs": "end_to_end"}
    return [write(record(names.get(key, key), results[key], columns=columns, env=results["environment"],
                         dry_run=args.dry_run), args.results_dir)
            for key, columns in TABLE_COLUMNS.items() if results.get(key)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy backbone, tiny sizes: checks the wiring only")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "gpu_suite.json"), help="where to write results")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25; 4 in a dry run)")
    p.add_argument("--cap", default="24GiB", help="the hard memory cap of the capped runs")
    p.add_argument("--no-cap", action="store_true", help="skip the capped runs")
    p.add_argument("--only", action="append", default=[], help="run configs whose name contains this (repeatable)")
    p.add_argument("--skip-kernels", action="store_true", help="skip kernel benchmarks and kernel tests")
    p.add_argument("--families", action="store_true",
                   help="also the CogVideoX-5b, SVD-xt and CogVideoX-5b-I2V rows (benchmarks/gpu_families.py)")
    p.add_argument("--family-steps", type=int, default=4, help="sampler steps of the family rows")
    p.add_argument("--families-json", default=None,
                   help="where the family rows' JSON goes (default: <date>_<card>_families.json in --results-dir)")
    p.add_argument("--skip-big-models", action="store_true", help="skip the Wan 14B / Open-Sora 360p rows")
    p.add_argument("--big-model-steps", type=int, default=8, help="sampler steps of the big-model rows")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel benchmarks and kernel tests")
    p.add_argument("--kernel-grid", choices=["suite", "full"], default="suite",
                   help="temporal-attention shapes: a cross-section (default) or the issue's whole F x head_dim grid")
    p.add_argument("--results-dir", default=None,
                   help="where every table's JSON goes (default benchmarks/results/; a dry run: a temporary folder)")
    p.add_argument("--kernel-test-timeout", type=int, default=480)
    p.add_argument("--skip-speed", action="store_true", help="skip the no-grad call and pipeline sections")
    p.add_argument("--out-dir", default=None, help="scratch run directory (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 4 if args.dry_run else 25
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: the suite measures a GPU (use --dry-run to check the wiring on a CPU)")
    return args


def timed_results(args, measure: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The results ``measure`` fills in, runs in ``args.out_dir`` (a temporary folder by default),
    with the environment and the total time (one thread on a dry run: tiny models, shared CPUs)."""
    import tempfile

    if args.dry_run:
        torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(), "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory() as tmp:
        args.out_dir = args.out_dir or tmp
        measure(results)
    results["total_s"] = round(time.perf_counter() - start, 1)
    return results


def measure_suite(results: dict[str, Any], args) -> None:
    if not args.kernels_only:
        models = section(results, "build", lambda: build_models(results, args))
        if models is not None:
            section(results, "end_to_end", lambda: end_to_end(results, args, models))
            if not args.skip_speed:
                speed_sections(results, args, models)
        if args.families:
            section(results, "families", lambda: families(results, args))
    if not args.skip_kernels:
        section(results, "kernel_benchmarks", lambda: kernel_benchmarks(results, args))
        if not args.dry_run:
            section(results, "kernel_tests", lambda: kernel_tests(results, args))
    if not (args.kernels_only or args.skip_big_models or args.dry_run):
        section(results, "big_models", lambda: big_models(results, args))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    results = timed_results(args, lambda results: measure_suite(results, args))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"[gpu_suite] wrote {path} ({results['total_s']} s)")
    for table_file in write_tables(results, args):
        print(f"[gpu_suite] wrote {table_file}")
    if results.get("models_note"):
        print(f"[gpu_suite] {results['models_note']}")
    print(table(results))
    if results.get("family_runs"):
        from benchmarks.gpu_families import table as family_table

        print(family_table(results["family_runs"]))
    return results


if __name__ == "__main__":
    main()
