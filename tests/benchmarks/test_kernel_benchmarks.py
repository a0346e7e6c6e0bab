"""The kernel benchmarks' wiring, checked on the CPU: the GPU suite's --dry-run runs both kernel
sections at tiny shapes (the Triton interpreter here), with every implementation, and writes
their JSON (card, date, versions, one record per row); the shape finder reads real
architectures on the meta device; the timing and table helpers."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.benchmarks.test_gpu_suite import _suite  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_group_norm  # noqa: E402
import gpu_temporal_attention  # noqa: E402
import kernel_bench  # noqa: E402


@pytest.mark.slow
def test_dry_run_measures_every_kernel_implementation(tmp_path):
    results = _suite().main(["--dry-run", "--kernels-only", "--json", str(tmp_path / "suite.json"),
                             "--results-dir", str(tmp_path / "results")])
    assert results["sections"]["kernel benchmark temporal_attention"]["ok"]
    assert results["sections"]["kernel benchmark group_norm"]["ok"]
    assert "end_to_end" not in results["sections"] and "kernel_tests" not in results["sections"]
    for name, impls in (("temporal_attention", gpu_temporal_attention.IMPLS), ("group_norm", gpu_group_norm.IMPLS)):
        saved = json.loads(Path(results["kernel_benchmarks"][name]["json"]).read_text())
        assert Path(results["kernel_benchmarks"][name]["json"]).parent == tmp_path / "results"
        assert {"card", "date_utc", "torch", "triton"} <= set(saved["environment"])
        assert saved["table"] == name and saved["dry_run"] and saved["copy_GBps"] > 0
        rows = {r["impl"]: r for r in saved["rows"]}
        assert set(rows) == set(impls)
        for impl, row in rows.items():
            if impl == "flex":  # CUDA only: recorded as an error, with no figure
                assert row["error"] and row.get("fwd_ms") is None
                continue
            assert row["error"] is None, row
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["max_err"] < 1e-4
            assert row["fwd_floor_pct"] > 0 and row["timing"] == "wall (cpu)"
    gn = {r["impl"]: r for r in json.loads(Path(results["kernel_benchmarks"]["group_norm"]["json"]).read_text())["rows"]}
    assert gn["fastvader"]["plan"].startswith(("resident", "split"))
    # the fused op keeps the input and statistics; eager keeps the input and the norm's output too
    assert gn["fastvader"]["saved_bytes"] < gn["eager"]["saved_bytes"]


def test_group_norm_sites_of_the_tiny_modelscope():
    sites = gpu_group_norm.group_norm_sites("tiny_modelscope")
    parts = {s["part"] for s in sites}
    assert parts == {"denoiser", "vae decoder, 1 frame(s)", "vae decoder, 16 frame(s)"}
    # (N, C, H, W) resnets, (B, C, F, H, W) temporal convs, (N, C, H*W) the VAE's attention norm
    assert all(s["sites"] >= 1 and len(s["shape"]) in (3, 4, 5) for s in sites)
    assert {len(s["shape"]) for s in sites if s["part"] == "denoiser"} == {4, 5}
    vae = [s for s in sites if s["part"].startswith("vae decoder, 16")]
    assert vae and all(s["shape"][0] == 16 for s in vae)


def test_grids_cover_the_issue():
    full = gpu_temporal_attention.grid_shapes("full")
    assert {(f, c // h) for _, f, c, h in full} >= {(f, d) for f in (7, 8, 12, 16, 20, 24, 33, 51, 64)
                                                  for d in (40, 64, 80, 128, 160)}
    assert max(n for n, *_ in full) == 100_000
    assert set(gpu_temporal_attention.grid_shapes("suite")) < set(full)


def test_markdown_table():
    rows = [{"impl": "a", "fwd_ms": 1.25, "error": None}, {"impl": "b", "fwd_ms": None, "error": "boom"}]
    table = kernel_bench.markdown_table(rows, [("impl", "impl", ""), ("fwd ms", "fwd_ms", ".2f"), ("error", "error", "")])
    assert "| a | 1.25 | - |" in table and "| b | - | boom |" in table


def test_kernel_generation_switch_restores_the_environment(monkeypatch):
    monkeypatch.delenv("FASTVADER_KERNEL_IMPL", raising=False)
    import os

    with kernel_bench.kernel_generation("v1"):
        assert os.environ["FASTVADER_KERNEL_IMPL"] == "v1"
    assert "FASTVADER_KERNEL_IMPL" not in os.environ
