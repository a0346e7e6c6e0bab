"""Where the shared hyperparameter files live: ``../shared/model-configs`` next to the repo root
(the layout of the integration checkout), else /work/shared/model-configs (worktrees)."""
from __future__ import annotations

from pathlib import Path

import pytest

_CANDIDATES = (Path(__file__).resolve().parents[1].parent / "shared" / "model-configs",
               Path("/work/shared/model-configs"))


def shared_model_configs() -> Path | None:
    for path in _CANDIDATES:
        if path.is_dir():
            return path
    return None


def require_shared(*parts: str) -> Path:
    """The path under model-configs, or skip the test saying what is missing."""
    root = shared_model_configs()
    if root is None:
        pytest.skip(f"shared model-configs folder not found (looked at {[str(c) for c in _CANDIDATES]})")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing from the shared model-configs folder")
    return path
