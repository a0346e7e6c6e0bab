"""Where the shared, read-only model configs live for tests: ``../shared/model-configs`` next to
the repository root, falling back to /work/shared/model-configs (worktrees sit one level deeper
than the main checkout, so the relative path does not exist there)."""
from __future__ import annotations

from pathlib import Path

import pytest


def model_configs_dir() -> Path | None:
    for candidate in (Path(__file__).resolve().parents[1].parent / "shared" / "model-configs",
                      Path("/work/shared/model-configs")):
        if candidate.is_dir():
            return candidate
    return None


def require_model_configs() -> Path:
    """The folder, or skip the calling test saying why."""
    path = model_configs_dir()
    if path is None:
        pytest.skip("the shared model-configs folder (../shared/model-configs or /work/shared/model-configs) is absent")
    return path
