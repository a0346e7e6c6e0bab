"""The big-model GPU rows' wiring, checked on the CPU: --dry-run runs every row in its own process
on tiny Wan / Open-Sora (fp8, block swap, fidelity) and writes one JSON record per table row; a
row that fails becomes an error record and the others still run."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import importlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _rows_module():
    """benchmarks.gpu_big_models, imported as its own processes import it (it imports its sibling
    gpu_suite); the root is on sys.path only while the package itself is found."""
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks  # noqa: F401  (the package: nothing that probes for `kernels`)
    finally:
        sys.path.remove(str(ROOT))
    return importlib.import_module("benchmarks.gpu_big_models")


@pytest.mark.slow
def test_dry_run_writes_a_record_per_row(tmp_path):
    rows = _rows_module()
    out = tmp_path / "big.json"
    rows.main(["--dry-run", "--json", str(out)])
    saved = json.loads(out.read_text())
    records = {r["row"]: r for r in saved["rows"]}
    assert saved["table"] == "big_models" and saved["dry_run"] and saved["environment"]["card"]
    assert saved["columns"] == list(rows.COLUMNS) and all(list(r) == list(rows.COLUMNS) for r in saved["rows"])
    assert all(r["error"] is None for r in records.values()), records
    trained = records["tiny Wan, fp8 + block swap 1"]
    assert trained["block_swap"] == 1 and trained["step_s"] > 0 and trained["host_peak_gib"] > 0
    assert trained["peak_gib"] is None  # no GPU: no GPU figure is invented
    compared = records["tiny Wan, fp8 + block swap 1, no cap: swap vs resident"]
    assert compared["step_s_no_swap"] > 0 and compared["swap_cost"] > 0 and compared["overlap"] is not None
    fidelity = records["fp8 fidelity, tiny Wan"]
    assert 0 < fidelity["out_rel_err"] < 0.05 and fidelity["lora_grad_cosine"] > 0.98
    assert records["tiny Open-Sora"]["step_s"] > 0


def test_a_failing_row_is_recorded_and_the_table_shows_it(tmp_path):
    rows = _rows_module()
    out = tmp_path / "big.json"
    rows.main(["--dry-run", "--only", "fidelity", "--row-timeout", "1", "--json", str(out)])  # killed after 1 s
    record = json.loads(out.read_text())["rows"][0]
    assert record["row"] == "fp8 fidelity, tiny Wan" and record["error"].startswith("TimeoutExpired")
    text = rows.table([record, {"row": "ok", "peak_gib": 21.5, "lora_grad_cosine": 0.995}])
    assert text.splitlines()[0].startswith("row | cap | block_swap | peak_gib")
    assert "| 21.5 |" in text and "0.995" in text and "TimeoutExpired" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_a_gpu_unless_dry():
    with pytest.raises(SystemExit):
        _rows_module().parse_args([])
