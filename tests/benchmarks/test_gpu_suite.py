"""The GPU suite's wiring, checked on the CPU: --dry-run measures every path on the toy backbone
(their gradients agree) and the speed sections on tiny ModelScope models, writes one JSON file
per table, and a failing section does not stop the table."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _suite():
    spec = importlib.util.spec_from_file_location("fastvader_gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_measures_every_path_and_speed_section(tmp_path):
    suite = _suite()
    out = tmp_path / "suite.json"
    results = suite.main(["--dry-run", "--only", "K=1 one frame", "--skip-kernels", "--json", str(out),
                          "--results-dir", str(tmp_path / "results")])
    saved = json.loads(out.read_text())
    runs = saved["runs"]
    assert [r["path"] for r in runs] == list(suite.PATHS)
    for r in runs:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["backward_s"] > 0 and r["grad_steps"] == 1
        # the split adds up to (at most) the step
        parts = r["nograd_sampling_s"] + r["grad_steps_s"] + r["decode_s"] + r["reward_s"] + r["backward_s"]
        assert 0 < parts <= r["step_s"] + 1e-6
        assert r["peak_bytes"] is None  # no GPU: no memory figure is invented
        # same seed, same LoRA start, same math in fp32 (eager vs checkpointed decode, compiled
        # blocks traced by dynamo): same gradient
        assert r["lora_grad_cosine"] > 0.9999 and r["cosine_vs_bf16_plain"] > 0.9999
    assert runs[3]["speed"] == runs[4]["speed"] == "compile" and runs[2]["speed"] == "-"
    assert all(s["ok"] for s in results["sections"].values()), results["sections"]

    calls = {r["variant"]: r for r in saved["nograd_call"]}
    assert list(calls) == ["eager", "torch.compile alone", "fastvader fast path"]
    assert all(r["ms_per_call"] > 0 and r["first_call_s"] > 0 for r in calls.values())
    assert calls["eager"]["engaged"] == "-" and calls["fastvader fast path"]["engaged"] == "compile"
    assert calls["fastvader fast path"]["compile_s"] > 0 and calls["eager"]["compile_s"] is None
    pipes = saved["pipeline"]
    assert [r["variant"] for r in pipes] == ["eager", "fastvader.accelerate_pipeline"]
    assert pipes[1]["engaged"] == "compile" and pipes[1]["latent_rel_error"] < 1e-5

    # one JSON file per table, in --results-dir, with the table's columns on every row
    files = {json.loads(f.read_text())["table"]: json.loads(f.read_text()) for f in (tmp_path / "results").iterdir()}
    assert set(files) == {"end_to_end", "nograd_call", "pipeline"}
    for name, key in (("end_to_end", "runs"), ("nograd_call", "nograd_call"), ("pipeline", "pipeline")):
        table = files[name]
        env = table["environment"]
        assert table["dry_run"] and env["torch"] == torch.__version__ and env["card"].startswith("cpu")
        assert table["columns"] == suite.TABLE_COLUMNS[key] and len(table["rows"]) == len(saved[key])
        assert all(list(row) == table["columns"] for row in table["rows"])
    assert files["end_to_end"]["rows"][0]["error"] is None


def test_result_files_hold_the_columns_of_every_row(tmp_path):
    _suite()  # puts the repository root's benchmarks/ within reach
    from benchmarks.result_files import record, write

    env = {"card": "NVIDIA H200", "date_utc": "2026-12-02 14:05", "torch": "2.13.0", "triton": "3.7.1"}
    rec = record("nograd_call", [{"variant": "eager", "ms": 120.0, "extra": 1}, {"variant": "fast"}],
                 columns=["variant", "ms"], env=env, extra={"copy_GBps": 3.5})
    path = write(rec, tmp_path)
    assert path.name == "2026-12-02T1405_nvidia-h200_nograd_call.json"
    saved = json.loads(path.read_text())
    assert saved["rows"] == [{"variant": "eager", "ms": 120.0}, {"variant": "fast", "ms": None}]
    assert (saved["environment"], saved["dry_run"], saved["copy_GBps"]) == (env, False, 3.5)
    with pytest.raises(ValueError, match="rows"):
        record("t", [], extra={"rows": 1})


def test_result_files_header_and_dry_runs_stay_out_of_the_repository():
    _suite()
    from benchmarks import result_files

    rec = result_files.record("demo", [{"impl": "a", "ms": 1.0}, {"impl": "b", "error": "boom"}], dry_run=True)
    env = rec["environment"]
    assert set(env) >= {"card", "date_utc", "torch", "triton", "cuda", "python", "triton_interpret"}
    assert env["torch"] == torch.__version__ and env["triton_interpret"] == (os.environ.get("TRITON_INTERPRET") == "1")
    assert rec["columns"] == ["impl", "ms", "error"] and rec["rows"][1] == {"impl": "b", "ms": None, "error": "boom"}
    path = result_files.write(rec)
    try:
        assert result_files.RESULTS_DIR not in path.parents and path.parent == result_files.default_dir(True)
        assert json.loads(path.read_text()) == json.loads(json.dumps(rec))
    finally:
        path.unlink()


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
    assert {"torch", "date_utc"} <= set(saved["environment"]) and saved["diffusers"]
    assert saved["table"] == "families" and "plan_peak_gib" in saved["columns"]
    assert all(list(r) == saved["columns"] for r in saved["rows"])
    runs = saved["rows"]
    assert [(r["config"], r["path"]) for r in runs] == [("tiny svd 3x32x32 K=1", "baseline"),
                                                       ("tiny svd 3x32x32 K=1", "fastvader")]
    for r in runs:
        assert r["error"] is None, r
        assert r["peak_bytes"] is None and r["grad_steps"] == 1 and r["step_s"] > 0
        assert r["full_step_s"] == pytest.approx(r["step_s"] + (25 - 4) * r["nograd_call_s"])
    assert runs[1]["plan_peak_gib"] > 0 and "fastvader | speedup" not in proc.stdout
    assert "tiny svd 3x32x32 K=1 | - | fastvader" in proc.stdout  # the table
