"""The one writer of GPU benchmark results: JSON files under benchmarks/results/, so that runs on
other days and cards can be compared (benchmarks/RESULTS.md is the readable view of them).
Every benchmark (the suite's tables, the kernel benchmarks, the big-model and family rows) writes
through ``record`` and ``write``; benchmarks/results/README.md describes the format.

One file per table and run, ``<date>_<card>_<table>.json``::

    {"table": "nograd_call", "dry_run": false,
     "environment": {"card": "NVIDIA H200", "date_utc": "2026-12-02 14:05", "torch": "2.13.0+cu130",
                     "triton": "3.7.1", "cuda": "13.0", "python": "3.12.3", "triton_interpret": false},
     "columns": ["variant", "ms_per_call", ...],
     "rows": [{"variant": "eager bf16", "ms_per_call": 120.1, ...}, ...],
     ...}                     # the benchmark's own metadata (copy bandwidth, autotuned configs...)

Every row has exactly the table's columns (null where a row has no value). A dry run (CPU, toy
sizes) is marked ``"dry_run": true``; unless told where to go, it is written to a temporary
folder, never into benchmarks/results/.
"""
from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: the keys of every record; a benchmark's own metadata may not reuse them
RECORD_KEYS = ("table", "dry_run", "environment", "columns", "rows")


def environment() -> dict[str, Any]:
    """Card, date (UTC) and versions of this process: what makes figures of two runs comparable."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {"card": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
                           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
                           "triton": None, "cuda": torch.version.cuda if cuda else None,
                           "python": platform.python_version(),
                           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def default_dir(dry_run: bool) -> Path:
    """benchmarks/results/ for a measured run; a temporary folder for a dry run."""
    return Path(tempfile.gettempdir()) / "fastvader-dry-run-results" if dry_run else RESULTS_DIR


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def results_path(table: str, env: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<date>_<card>_<table>.json``."""
    stamp = env["date_utc"].replace(" ", "T").replace(":", "")
    return Path(out_dir) / f"{stamp}_{_slug(env['card'])}_{table}.json"


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order they first appear (for tables without fixed columns)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def record(table: str, rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None,
           env: dict[str, Any] | None = None, dry_run: bool = False,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table as a record: ``rows`` cut to ``columns`` (default: every key of the rows), the
    environment (default: this process's) and ``extra``, the benchmark's own metadata."""
    columns = list(columns) if columns is not None else columns_of(rows)
    clashing = set(extra or {}) & set(RECORD_KEYS)
    if clashing:
        raise ValueError(f"fastvader: the extra metadata of table {table!r} reuses the record's keys "
                         f"{sorted(clashing)}; rename them")
    return {"table": table, "dry_run": dry_run, "environment": env or environment(), "columns": columns,
            "rows": [{column: row.get(column) for column in columns} for row in rows], **(extra or {})}


def write(rec: dict[str, Any], out_dir: str | os.PathLike | None = None,
          path: str | os.PathLike | None = None) -> Path:
    """Write ``rec`` to ``path``, else to its standard name in ``out_dir`` (default: ``default_dir``);
    returns the file's path."""
    if path is None:
        path = results_path(rec["table"], rec["environment"],
                            out_dir if out_dir is not None else default_dir(rec["dry_run"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    return path
