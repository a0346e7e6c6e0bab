"""GPU rows for the big models of issue 16: Wan 2.1 14B and Open-Sora 1.2 360p on one 24 GB card.

    python -m benchmarks.gpu_big_models              # every row; JSON under benchmarks/results/ (table big_models)
    python -m benchmarks.gpu_big_models --dry-run    # CPU, tiny Wan and Open-Sora: checks the wiring

(``python -m benchmarks.gpu_suite`` runs it as its ``big_models`` section.) Random weights, built
as a run builds them (Wan 14B straight into fp8, module by module). Each row runs in its own
process: a fresh CUDA context, its own hard memory cap (``set_per_process_memory_fraction``) and
a clean host-memory peak (the process's VmHWM, model building included). Rows:

- Wan 2.1 14B, 480x832x33, K=1 (``configs/wan14b.yaml``: fp8 weights, the planner's block swap and
  activation offload) under a 24 GiB cap: peak, step time, host-memory peak. Then, with the cap
  lifted in the same process: the step with block swap against the same step with every block
  resident, and the overlap achieved on no-grad denoiser calls, 1 - (t_swap - t_resident) / t_copy
  (t_copy: the swapped blocks' host-to-GPU copies timed alone).
- Open-Sora 1.2, 640x360x51, K=1 (``configs/opensora_360p.yaml``) under the cap.
- Wan 2.1 1.3B, 480x832x81, K=5 (``configs/wan.yaml``, the planner's choice for 24 GiB) under the cap.
- fp8 fidelity (Wan 2.1 1.3B, 480x832x33): one denoiser call with fp8 base weights against bf16
  base weights on the same inputs (relative error), and the LoRA gradient cosine of one
  gradient-carrying call (same LoRA weights, same loss).

Sampler steps are fewer than the presets' (``--steps``, default 8): step times are for that many
steps; ``nograd_call_s`` (one no-grad denoiser call) is the per-step cost of the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.result_files import record, write  # (before the root leaves sys.path, below)

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
# `python -m benchmarks.gpu_big_models` puts the repository root first on sys.path, where kernels/
# answers transformers' probe for Hugging Face's `kernels` package; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    preset: str                   # a file in configs/
    overrides: tuple[str, ...]    # --set style, on top of the preset and the suite's own
    cap: str | None               # the hard GPU memory cap of the measured step
    kind: str                     # "train", "train+swap_cost" or "fidelity"
    random_text: bool = False     # prompt embeddings drawn at random (a text encoder only on the hub)


FULL_ROWS = [
    Row("Wan 2.1 14B 480x832x33 K=1", "wan14b.yaml", (), "24GiB", "train+swap_cost"),
    Row("Open-Sora 1.2 640x360x51 K=1", "opensora_360p.yaml", (), "24GiB", "train", random_text=True),
    Row("Wan 2.1 1.3B 480x832x81 K=5", "wan.yaml",
        ("sampler.truncation=specific:5", "memory.gpu_memory=24GiB", "memory.block_swap=auto"), "24GiB", "train"),
    Row("fp8 fidelity, Wan 2.1 1.3B 480x832x33", "wan.yaml", ("video.frames=33",), None, "fidelity"),
]
DRY_ROWS = [
    Row("tiny Wan, fp8 + block swap 1", "tiny_wan.yaml",
        ("memory.fp8_weights=true", "memory.block_swap=1", "memory.checkpointing=sub_block"), None, "train+swap_cost"),
    Row("tiny Open-Sora", "opensora_tiny.yaml", (), None, "train", random_text=True),
    Row("fp8 fidelity, tiny Wan", "tiny_wan.yaml", (), None, "fidelity"),
]
#: the table's columns, in order: every record of the JSON has these keys
COLUMNS = ("row", "cap", "block_swap", "peak_gib", "predicted_gib", "step_s", "nograd_call_s", "host_peak_gib",
           "step_s_no_swap", "swap_cost", "overlap", "out_rel_err", "lora_grad_cosine", "error")


# ---------------------------------------------------------------------------------------------
# one row, in its own process
# ---------------------------------------------------------------------------------------------
def make_config(row: Row, dry: bool, steps: int | None, out_dir: str):
    """The preset with random weights (no download), one prompt, the suite's sampler steps."""
    from fastvader.config import load_config

    suite = ["backbone.random_init=true", "prompts.template=null", "prompts.vocab={}",
             "prompts.items=[a corgi running on a beach at sunset]", "validation.prompts=[a corgi]",
             f"train.output_dir={out_dir}", "train.progress=false", "optim.lr=1e-12"]
    if not dry:
        suite += ["train.device=cuda", "reward.options={aesthetic: {random_init: true}, hpsv2: {random_init: true}}"]
        suite.append(f"sampler.steps={steps}")
    cfg = load_config(ROOT / "configs" / row.preset, suite + list(row.overrides), validate_now=False)
    if not dry:  # keep only the options of the rewards the preset uses
        from fastvader.rewards import expand_terms

        used = expand_terms(cfg.reward_terms)
        cfg.reward.options = {k: v for k, v in cfg.reward.options.items() if k in used}
    return cfg.validate()


def _host_peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return None


@contextlib.contextmanager
def memory_cap(cap: str | None):
    """A hard per-process cap on CUDA memory (nothing on a CPU)."""
    from fastvader.config import parse_bytes

    if cap is None or not torch.cuda.is_available():
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(cap) / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def measured_step(trainer) -> dict[str, Any]:
    """One training step after a reset of the peak: peak, step time, one no-grad call's time."""
    from benchmarks.gpu_suite import GradStepTimer

    timer = GradStepTimer(trainer.device)
    inner = trainer.sampler.grad_step_wrapper
    trainer.sampler.grad_step_wrapper = timer.wrap(inner)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = trainer._train_step()
    trainer.sampler.grad_step_wrapper = inner
    nograd_calls = trainer.cfg.sampler.steps - result.grad_steps
    nograd = result.timings.get("sample", 0.0) - timer.seconds
    return {"peak_gib": torch.cuda.max_memory_allocated() / GiB if trainer.device.type == "cuda" else None,
            "step_s": result.seconds, "nograd_call_s": nograd / nograd_calls if nograd_calls else None}


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_call_s(trainer, call, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = _sync_time(trainer.device)
        call()
        times.append(_sync_time(trainer.device) - t0)
    return sorted(times)[len(times) // 2]


def swap_cost(trainer) -> dict[str, Any]:
    """With the cap lifted: the step with block swap, the overlap on no-grad calls, then the step
    with every block resident again."""
    from fastvader.training.sampling import classifier_free_guidance

    swap = trainer.frozen_weights.block_swap
    if swap is None:
        return {"error": "the plan swapped no block: nothing to compare"}
    swapped = measured_step(trainer)
    embeds = trainer.prompt_cache(trainer.prompts.prompts[:1])
    latents = torch.randn(1, *trainer.latent_shape, device=trainer.device, dtype=trainer.weight_dtype)

    amp = trainer.amp_dtype  # the run's autocast from its dtype: main's Trainer moved its accessor into Rollout

    @torch.no_grad()
    def call():
        with torch.autocast(trainer.device.type, dtype=amp, enabled=amp != torch.float32):
            classifier_free_guidance(trainer.backbone, latents, 500, embeds, trainer.cfg.sampler.guidance_scale)

    call()
    t_swap = _median_call_s(trainer, call)
    t0 = _sync_time(trainer.device)
    for index in swap.swapped:  # the transfers alone, one after another
        [t.copy_to_placeholder(t.slot.read()) for t in swap.swapped_tensors(index)]
    t_copy = _sync_time(trainer.device) - t0
    swap.revert()
    trainer.frozen_weights.block_swap = None
    t_resident = _median_call_s(trainer, call)
    resident = measured_step(trainer)
    return {"step_s": swapped["step_s"], "nograd_call_s": swapped["nograd_call_s"],
            "step_s_no_swap": resident["step_s"], "swap_cost": swapped["step_s"] / resident["step_s"],
            "overlap": 1 - max(0.0, t_swap - t_resident) / t_copy if t_copy > 0 else None}


def random_prompt_embeddings(backbone):
    """``encode_prompts`` without the text encoder: embeddings of its shape, drawn at random.
    Open-Sora's random_init still reads T5-XXL from the hub, which the GPU machine cannot reach."""
    from fastvader.backbones import PromptEmbeddings

    def encode(prompts):
        shaped = backbone.placeholder_embeddings(len(prompts), torch.float32)
        return PromptEmbeddings(shaped.cond.normal_(), shaped.uncond.normal_(), shaped.extra)

    return encode


def train_row(row: Row, dry: bool, steps: int | None) -> list[dict[str, Any]]:
    from fastvader.backbones import build_backbone
    from fastvader.memory.fp8 import Fp8Storage
    from fastvader.memory.planner import make_plan
    from fastvader.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out_dir, memory_cap(row.cap):
        cfg = make_config(row, dry, steps, out_dir)
        backbone = None
        if row.random_text:
            backbone = build_backbone(cfg.backbone, storage=Fp8Storage.from_config(cfg.memory))
            backbone.encode_prompts = random_prompt_embeddings(backbone)
        trainer = Trainer(cfg, backbone=backbone)
        predicted = make_plan(trainer.cfg, row.cap or "1TiB").current.peak / GiB
        trainer._train_step()  # warm-up
        first = {"row": row.name, "cap": row.cap, "block_swap": trainer.cfg.memory.block_swap,
                 "predicted_gib": predicted, **measured_step(trainer)}
    records = [first]
    if row.kind == "train+swap_cost":
        records.append({"row": row.name + ", no cap: swap vs resident", "cap": None,
                        "block_swap": trainer.cfg.memory.block_swap, **swap_cost(trainer)})
    trainer.close()
    host_peak = _host_peak()
    first["host_peak_gib"] = None if host_peak is None else host_peak / GiB
    return records


def fidelity_row(row: Row, dry: bool) -> list[dict[str, Any]]:
    """fp8 against bf16 base weights (fp32 in a dry run) under the same LoRA and inputs."""
    from fastvader.backbones import build_backbone
    from fastvader.lora import add_lora
    from fastvader.memory.fp8 import Fp8Storage

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = make_config(row, dry, None, out_dir)
    device = torch.device("cpu" if dry else "cuda")
    backbone = build_backbone(cfg.backbone).freeze()
    shape = backbone.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
    torch.manual_seed(0)
    lora = add_lora(backbone.denoiser, 16, 16.0, target_modules=backbone.default_lora_targets, init_weights=False)
    base = backbone.to(device)
    dtype = backbone.denoiser_dtype
    latents = torch.randn(2, *shape, device=device, dtype=dtype)
    context = backbone.placeholder_embeddings(2, dtype).cond.normal_()
    probe = torch.randn(2, *shape, device=device, dtype=torch.float32)

    def outputs(backbone_, params):
        with torch.no_grad():
            out = backbone_.denoise(latents, 500, context).float()
        loss = (backbone_.denoise(latents, 500, context).float() * probe).mean()
        grads = torch.autograd.grad(loss, params)
        return out, torch.cat([g.float().flatten() for g in grads])

    out_full, grad_full = outputs(base, lora)
    fp8 = copy.deepcopy(base)
    Fp8Storage().convert(fp8.denoiser)
    fp8_lora = [p for n, p in fp8.denoiser.named_parameters() if "lora_" in n]
    out_fp8, grad_fp8 = outputs(fp8, fp8_lora)
    cosine = float(grad_fp8 @ grad_full / (grad_fp8.norm() * grad_full.norm()))
    return [{"row": row.name, "cap": None, "out_rel_err": float((out_fp8 - out_full).norm() / out_full.norm()),
             "lora_grad_cosine": cosine}]


def run_row(row: Row, dry: bool, steps: int | None) -> list[dict[str, Any]]:
    if dry:
        torch.set_num_threads(1)
    return fidelity_row(row, dry) if row.kind == "fidelity" else train_row(row, dry, steps)


# ---------------------------------------------------------------------------------------------
# the suite: every row in a fresh process, one JSON file, one table
# ---------------------------------------------------------------------------------------------
def _in_fresh_process(index: int, args) -> list[dict[str, Any]]:
    rows = DRY_ROWS if args.dry_run else FULL_ROWS
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "benchmarks.gpu_big_models", "--row", str(index), "--row-json", out.name]
        command += ["--dry-run"] if args.dry_run else ["--steps", str(args.steps)]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.row_timeout)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            error = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "failed")
            return [{"row": rows[index].name, "cap": rows[index].cap,
                     "error": "OOM" if "OutOfMemory" in error else error[:300]}]
        return json.loads(Path(out.name).read_text())


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(records: list[dict[str, Any]]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    lines += [" | ".join(_cell(r.get(c)) for c in COLUMNS) for r in records]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_big_models", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the wiring only")
    p.add_argument("--steps", type=int, default=8, help="sampler steps of the training rows")
    p.add_argument("--json", default=None, help="where to write the results (default: in --results-dir)")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON goes without --json (default benchmarks/results/; dry run: a temporary folder)")
    p.add_argument("--only", action="append", default=[], help="rows whose name contains this (repeatable)")
    p.add_argument("--row-timeout", type=int, default=1800, help="seconds one row may take")
    p.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # inside the row's own process
    p.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: these rows measure a GPU (use --dry-run to check the wiring on a CPU)")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = DRY_ROWS if args.dry_run else FULL_ROWS
    if args.row is not None:
        Path(args.row_json).write_text(json.dumps(run_row(rows[args.row], args.dry_run, args.steps)))
        return {}
    start, records = time.perf_counter(), []
    for index, row in enumerate(rows):
        if args.only and not any(s in row.name for s in args.only):
            continue
        try:
            records += _in_fresh_process(index, args)
        except Exception as err:  # noqa: BLE001  (one row failing must not lose the others)
            records.append({"row": row.name, "cap": row.cap, "error": f"{type(err).__name__}: {err}"[:300],
                            "traceback": traceback.format_exc()[-1500:]})
        print(f"[gpu_big_models] {records[-1]}", flush=True)
    results = record("big_models", records, columns=COLUMNS, dry_run=args.dry_run,
                     extra={"steps": None if args.dry_run else args.steps,
                            "total_s": round(time.perf_counter() - start, 1)})
    path = write(results, args.results_dir, args.json)
    print(f"[gpu_big_models] wrote {path} ({results['total_s']} s)")
    print(table(results["rows"]))
    return results


if __name__ == "__main__":
    main()
