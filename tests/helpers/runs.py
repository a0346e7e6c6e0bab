"""What a run folder holds, to compare before and after something touched it."""
from __future__ import annotations

import json
from pathlib import Path


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(run: Path) -> list[int]:
    """The step of each metrics.jsonl line, in file order."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())
