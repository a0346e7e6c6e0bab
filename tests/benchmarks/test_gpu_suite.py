"""The GPU suite's wiring, checked on the CPU: --dry-run measures both paths on the toy backbone,
gradients of the two paths agree, a failing section does not stop the table."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _suite():
    spec = importlib.util.spec_from_file_location("fastvader_gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_dry_run_measures_both_paths(tmp_path):
    suite = _suite()
    out = tmp_path / "suite.json"
    results = suite.main(["--dry-run", "--only", "K=1 one frame", "--skip-kernels", "--json", str(out)])
    saved = json.loads(out.read_text())
    runs = saved["runs"]
    assert [r["path"] for r in runs] == ["baseline", "fastvader"]
    for r in runs:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["backward_s"] > 0 and r["grad_steps"] == 1
        # the split adds up to (at most) the step
        parts = r["nograd_sampling_s"] + r["grad_steps_s"] + r["decode_s"] + r["reward_s"] + r["backward_s"]
        assert 0 < parts <= r["step_s"] + 1e-6
        assert r["peak_bytes"] is None  # no GPU: no memory figure is invented
    # same seed, same LoRA start, same math in fp32 (eager vs checkpointed decode): same gradient
    assert runs[0]["lora_grad_cosine"] > 0.9999
    assert results["sections"]["end_to_end"]["ok"]


def test_table_survives_failed_runs():
    suite = _suite()
    results = {"runs": [{"config": "c", "cap": "24GiB", "path": "baseline", "error": "OOM"},
                        {"config": "c", "cap": "24GiB", "path": "fastvader", "peak_bytes": 5 * 2 ** 30, "step_s": 1.0,
                         "nograd_sampling_s": 0.5, "grad_steps_s": 0.2, "decode_s": 0.1, "reward_s": 0.05,
                         "backward_s": 0.15, "lora_grad_cosine": None}],
               "sections": {"c | baseline": {"ok": False, "error": "OutOfMemoryError"}}}
    text = suite.table(results)
    assert "OOM" in text and "5.00" in text and "sections failed: ['c | baseline']" in text


def test_section_records_errors_and_continues():
    suite = _suite()
    results = {}
    assert suite.section(results, "boom", lambda: 1 / 0) is None
    assert suite.section(results, "fine", lambda: 3) == 3
    assert not results["sections"]["boom"]["ok"] and "ZeroDivisionError" in results["sections"]["boom"]["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_a_gpu_unless_dry():
    with pytest.raises(SystemExit):
        _suite().parse_args([])


@pytest.mark.slow
def test_family_rows_dry_run(tmp_path):
    """`python -m benchmarks.gpu_families --dry-run` (the rows `gpu_suite --families` adds): both paths of
    a tiny image-to-video row, the planner's prediction beside fastvader's, the JSON record."""
    import subprocess

    out = tmp_path / "families.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_families", "--dry-run", "--only", "svd",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert {"torch", "date_utc", "diffusers"} <= set(saved["environment"])
    runs = saved["family_runs"]
    assert [(r["config"], r["path"]) for r in runs] == [("tiny svd 3x32x32 K=1", "baseline"),
                                                       ("tiny svd 3x32x32 K=1", "fastvader")]
    for r in runs:
        assert "error" not in r, r
        assert r["peak_bytes"] is None and r["grad_steps"] == 1 and r["step_s"] > 0
        assert r["full_step_s"] == pytest.approx(r["step_s"] + (25 - 4) * r["nograd_call_s"])
    assert runs[1]["plan_peak_gib"] > 0 and "fastvader | speedup" not in proc.stdout
    assert "tiny svd 3x32x32 K=1 | - | fastvader" in proc.stdout  # the table
