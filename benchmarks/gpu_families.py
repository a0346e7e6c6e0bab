"""GPU suite rows for the CogVideoX and image-to-video families (issue 17): real architectures
from the packaged configs, random weights, bf16, batch 1, LoRA r16.

    python -m benchmarks.gpu_families               # these rows alone (part of `gpu_suite --families`)
    python -m benchmarks.gpu_families --dry-run     # CPU, tiny configurations: checks the wiring

| row | backbone | video | K | frames the reward sees (all with gradients) |
|---|---|---|---|---|
| CogVideoX-5b 49x480x720 K=1 all frames | cogvideox (5b) | 49x480x720 | 1 | all 49 |
| SVD-xt 25x576x1024 K=1 | svd | 25x576x1024 | 1 | one |
| CogVideoX-5b-I2V 49x480x720 K=1 | cogvideox_i2v | 49x480x720 | 1 | one |

Per row, in one process, one warm-up training step and one measured step for each path:

- **baseline** (diffusers as it comes): kernels off, block checkpointing of the denoiser (what
  ``enable_gradient_checkpointing`` does), the chosen frames decoded by the plain
  ``backbone.decode_latents`` with every decoder activation kept (CogVideoX's per-block VAE
  checkpointing off);
- **fastvader**: kernels on, the default memory settings (sub-block checkpointing, the chunked
  checkpointed decode);
- **fastvader under a hard 24 GiB cap** (``torch.cuda.set_per_process_memory_fraction``), with the
  planner's prediction for that budget recorded beside it (``plan_peak_gib``: the default settings;
  ``plan_best``: the fastest setting it predicts to fit, if any). A dry run records the prediction
  on its fastvader rows instead (there is no cap to run under).

The sampler runs ``--steps`` steps (default 4, K=1): the row records the time of one no-grad CFG
call, so a 50-step (CogVideoX) or 25-step (SVD) step time is ``step_s + (steps_full - steps) *
nograd_call_s``; ``full_step_s`` says it. Writes the table ``families`` (benchmarks/result_files.py:
``<date>_<card>_families.json`` under benchmarks/results/, with the diffusers version; one record
per row and path).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_suite import GradStepTimer, ROOT, _cap, section, timed_results
from benchmarks.result_files import record, write as write_record

GiB = 2 ** 30
IMAGES = ROOT / "configs" / "images"
#: the table's columns, in order: every record of the JSON has these keys
COLUMNS = ("config", "path", "cap", "steps", "grad_steps", "peak_bytes", "step_s", "full_step_s", "nograd_call_s",
           "nograd_sampling_s", "grad_steps_s", "decode_s", "reward_s", "backward_s", "plan_peak_gib", "plan_best",
           "plan_best_peak_gib", "kernels", "error")


@dataclasses.dataclass
class FamilyRow:
    name: str
    backbone: dict
    frames: int
    height: int
    width: int
    reward_frames: str
    #: the pipeline's number of steps (for full_step_s)
    full_steps: int
    image: str | None = None


FULL_ROWS = [
    FamilyRow("CogVideoX-5b 49x480x720 K=1 all frames", {"name": "cogvideox", "options": {"variant": "5b"}},
              49, 480, 720, "all", 50),
    FamilyRow("SVD-xt 25x576x1024 K=1", {"name": "svd"}, 25, 576, 1024, "random:1", 25, "red_ball_16x9.png"),
    FamilyRow("CogVideoX-5b-I2V 49x480x720 K=1", {"name": "cogvideox_i2v"}, 49, 480, 720, "random:1", 50,
              "red_ball_3x2.png"),
]
DRY_ROWS = [
    FamilyRow("tiny cogvideox 5x32x32 K=1 all frames", {"name": "cogvideox", "options": {"tiny": True}},
              5, 32, 32, "all", 50),
    FamilyRow("tiny svd 3x32x32 K=1", {"name": "svd", "options": {"tiny": True}}, 3, 32, 32, "random:1", 25,
              "red_ball_16x9.png"),
    FamilyRow("tiny cogvideox_i2v 5x32x32 K=1", {"name": "cogvideox_i2v", "options": {"tiny": True}},
              5, 32, 32, "random:1", 50, "red_ball_3x2.png"),
]


def make_config(row: FamilyRow, path: str, steps: int, out_dir: str, dry: bool):
    """The row's TrainConfig for ``path`` (baseline | fastvader)."""
    from fastvader.backbones import backbone_class
    from fastvader.config import TrainConfig

    family = backbone_class(row.backbone["name"])
    d = family.defaults
    text = "a red ball rolling across a wooden table"
    prompt = text if row.image is None else {"text": text, "image": str(IMAGES / row.image)}
    reward = {"name": "brightness"} if dry else {"name": "aesthetic", "options": {"aesthetic": {"random_init": True}}}
    data: dict[str, Any] = {
        "backbone": {**row.backbone, "random_init": True, "dtype": "fp32" if dry else "bf16"},
        "video": {"frames": row.frames, "height": row.height, "width": row.width, "fps": d["fps"]},
        "sampler": {"name": d["sampler"], "steps": steps, "guidance_scale": d["guidance_scale"], "truncation": "last"},
        "frames": {"reward": row.reward_frames, "grad": "same"},
        "lora": {"rank": 16, "alpha": 16.0, "init_weights": False},
        "optim": {"lr": 1e-12, "weight_decay": 0.0},
        "reward": reward,
        "prompts": {"items": [prompt], "image_resize": "crop" if dry else "stretch"},
        "validation": {"prompts": [prompt], "save_videos": False},
        "kernels": {"enabled": "off" if dry or path == "baseline" else "on"},
        "memory": {"checkpointing": "block" if path == "baseline" else "sub_block"},
        "train": {"steps": 10, "batch_size": 1, "seed": 0, "output_dir": out_dir, "run_name": "families",
                  "progress": False, "device": "cpu" if dry else "cuda", "precision": "fp32" if dry else "bf16"},
    }
    return TrainConfig.from_dict(data).validate()


def build(cfg, dry: bool):
    """The backbone (built on the GPU: seconds where the CPU takes minutes) and the reward."""
    from fastvader.backbones import build_backbone
    from fastvader.rewards import build_reward

    torch.manual_seed(0)
    with torch.device("cpu" if dry else "cuda"):
        return build_backbone(cfg.backbone), build_reward(cfg.reward)


def plain_decode(backbone):
    """The baseline's decode: the chosen frames by ``decode_latents``, every activation kept."""
    vae = backbone.vae
    if getattr(vae, "gradient_checkpointing", False):
        vae.disable_gradient_checkpointing()
    return lambda latents, frames=None, grad_frames=None, chunk=1: backbone.decode_latents(latents, frames)


def run_path(row: FamilyRow, path: str, cap: str | None, args) -> dict[str, Any]:
    """One warm-up and one measured training step of ``path``; peak memory and the time split."""
    from fastvader.training.trainer import Trainer

    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = make_config(row, path, args.steps, args.out_dir, args.dry_run)
    backbone, reward = build(cfg, args.dry_run)
    if path == "baseline":
        backbone.decode_frames = plain_decode(backbone)
    trainer = Trainer(cfg, backbone=backbone, reward=reward)
    timer = GradStepTimer(device)
    trainer.sampler.grad_step_wrapper = timer.wrap(trainer.sampler.grad_step_wrapper)
    trainer._train_step()  # warm-up: Triton compiles, the allocator settles
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer.seconds = 0.0
    result = trainer._train_step()
    t = result.timings
    nograd = t.get("sample", 0.0) - timer.seconds
    out = {"config": row.name, "path": path, "cap": cap, "steps": args.steps, "grad_steps": result.grad_steps,
           "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
           "step_s": result.seconds, "nograd_sampling_s": nograd, "grad_steps_s": timer.seconds,
           "decode_s": t.get("decode", 0.0), "reward_s": t.get("reward", 0.0), "backward_s": t.get("backward", 0.0),
           "kernels": {k: str(v) for k, v in (trainer.kernel_report or {}).items()}}
    out["nograd_call_s"] = nograd / max(1, args.steps - result.grad_steps)
    out["full_step_s"] = out["step_s"] + (row.full_steps - args.steps) * out["nograd_call_s"]
    trainer.close()
    del trainer, backbone, reward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def planner_prediction(row: FamilyRow, budget: str, args) -> dict[str, Any]:
    """What the planner predicts for the fastvader path under ``budget`` (meta device, no GPU)."""
    from fastvader.memory.planner import make_plan

    plan = make_plan(make_config(row, "fastvader", args.steps, args.out_dir, args.dry_run), budget)
    return {"plan_peak_gib": round(plan.current.peak / GiB, 2),
            "plan_best": None if plan.best is None else plan.best.setting.describe(),
            "plan_best_peak_gib": None if plan.best is None else round(plan.best.peak / GiB, 2)}


def measure(results: dict, args) -> list[dict]:
    """Every row's paths (each in its own try: a failure or an OOM is recorded, the rest runs)."""
    from fastvader.config import parse_bytes

    rows = [r for r in (DRY_ROWS if args.dry_run else FULL_ROWS) if not args.only or any(s in r.name for s in args.only)]
    records = results.setdefault("family_runs", [])
    runs = [("baseline", None), ("fastvader", None)] + ([] if args.dry_run or args.no_cap else [("fastvader", args.cap)])
    for row in rows:
        for path, cap in runs:
            name = f"{row.name} | {path}" + (f" | cap {cap}" if cap else "")
            budget = None if cap is None else parse_bytes(cap, "--cap")

            def one(row=row, path=path, cap=cap, budget=budget):
                with _cap(budget):
                    return run_path(row, path, cap, args)

            record = section(results, name, one)
            if record is None:
                error = results["sections"][name]["error"]
                record = {"config": row.name, "path": path, "cap": cap, "error": "OOM" if "OutOfMemory" in error else error}
            if cap is not None or (args.dry_run and path == "fastvader"):  # dry: the wiring, with no cap to run
                record.update(section(results, f"{name} | planner",
                                      lambda row=row: planner_prediction(row, args.cap, args)) or {})
            records.append(record)
            print(f"[gpu_families] {name}: " + ", ".join(f"{k}={record[k]}" for k in ("peak_bytes", "step_s", "error")
                                                          if k in record), flush=True)
    return records


def table(records: list[dict]) -> str:
    """The rows as a markdown table, the baseline's step time beside each fastvader run."""
    head = ("config", "cap", "path", "peak GiB", "step s", "full-length step s", "no-grad call s", "decode s",
            "backward s", "speedup", "planner GiB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in records:
        base = next((b for b in records if b["config"] == r["config"] and b["path"] == "baseline" and "step_s" in b),
                    None)
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base and r["path"] != "baseline" and r.get("step_s") else "-"
        if "error" in r:
            cells = (r["config"], r["cap"] or "-", r["path"], r["error"][:40], *["-"] * 7)
        else:
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GiB:.2f}"
            cells = (r["config"], r["cap"] or "-", r["path"], peak, f"{r['step_s']:.2f}", f"{r['full_step_s']:.1f}",
                     f"{r['nograd_call_s']:.3f}", f"{r['decode_s']:.2f}", f"{r['backward_s']:.2f}", speed,
                     r.get("plan_peak_gib", "-"))
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_families", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configurations: checks the wiring only")
    p.add_argument("--json", default=None, help="where the JSON goes (default: <date>_<card>_families.json "
                   "in --results-dir)")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON goes without --json (default benchmarks/results/; dry run: a temporary folder)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per training step (K=1)")
    p.add_argument("--cap", default="24GiB", help="the hard memory cap of the capped runs (GiB)")
    p.add_argument("--no-cap", action="store_true", help="skip the capped runs")
    p.add_argument("--only", action="append", default=[], help="rows whose name contains this (repeatable)")
    p.add_argument("--out-dir", default=None, help="scratch run directory (default: a temporary folder)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: these rows measure a GPU (use --dry-run to check the wiring on a CPU)")
    return args


def write(records: list[dict], env: dict, dry_run: bool, out_dir: str | None = None, path: str | None = None) -> Path:
    """The table ``families``: one record per row and path, with the diffusers version."""
    import diffusers

    rec = record("families", records, columns=COLUMNS, env=env, dry_run=dry_run,
                 extra={"diffusers": diffusers.__version__})
    return write_record(rec, out_dir, path)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    results = timed_results(args, lambda results: measure(results, args))
    path = write(results["family_runs"], results["environment"], args.dry_run, args.results_dir, args.json)
    print(f"[gpu_families] wrote {path} ({results['total_s']} s)")
    print(table(results["family_runs"]))
    return results


if __name__ == "__main__":
    main()
