"""Where the shared real-architecture configs live: ``../shared/model-configs`` next to the
repository root, falling back to /work/shared (git worktrees sit elsewhere)."""
from __future__ import annotations

from pathlib import Path

import pytest


def model_configs_dir() -> Path | None:
    for root in (Path(__file__).resolve().parents[1].parent / "shared", Path("/work/shared")):
        if (root / "model-configs").is_dir():
            return root / "model-configs"
    return None


def require_model_configs() -> Path:
    folder = model_configs_dir()
    if folder is None:
        pytest.skip("../shared/model-configs is absent: the real-architecture configs are not available here")
    return folder


def require_shared(*parts: str) -> Path:
    """A path under model-configs, or skip the calling test saying what is missing."""
    path = require_model_configs().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing from the shared model-configs folder")
    return path
