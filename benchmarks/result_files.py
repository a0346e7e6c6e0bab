"""GPU benchmark tables as JSON files under benchmarks/results/, so that runs on other days and
cards can be compared (benchmarks/RESULTS.md is the readable view of them).

One file per table and run: ``<date>_<card>_<table>.json`` holding the card, the date (UTC),
the torch and triton versions, the table's columns and one record per row with exactly those
columns (a value a row does not have is null)::

    {"table": "nograd_call", "card": "NVIDIA H200", "date": "2026-12-02 14:05", "torch": "2.13.0+cu130",
     "triton": "3.7.1", "dry_run": false, "columns": ["variant", "ms_per_call", ...],
     "rows": [{"variant": "eager bf16", "ms_per_call": 120.1, ...}, ...]}

A dry run (CPU, toy sizes) is marked ``"dry_run": true`` and its card is the CPU's; its files
never belong in benchmarks/results/ (the suite writes them elsewhere unless told).
"""
from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """Card, date and versions of this process (the header of every results file)."""
    import torch

    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
                           "python": platform.python_version(), "triton": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, total_memory_bytes=props.total_memory)
    else:
        env["card"] = f"cpu ({platform.machine()})"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_table(table: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], env: dict[str, Any],
                out_dir: Path = RESULTS_DIR, dry_run: bool = False) -> Path:
    """Write one table; returns the file's path."""
    record = {"table": table, "card": env["card"], "date": env["date"], "torch": env["torch"],
              "triton": env["triton"], "dry_run": dry_run, "columns": list(columns),
              "rows": [{column: row.get(column) for column in columns} for row in rows]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(" ", "T").replace(":", "")
    path = out_dir / f"{stamp}_{_slug(env['card'])}_{table}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path
