"""Where the shared real-architecture configs live: ``$FASTVADER_MODEL_CONFIGS``, else
``../shared/model-configs`` next to the repository root. Tests and benchmarks may read them; the
package itself ships its own copies (fastvader/model_configs), which tests should prefer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def model_configs_dir() -> Path | None:
    candidates = [Path(os.environ["FASTVADER_MODEL_CONFIGS"])] if os.environ.get("FASTVADER_MODEL_CONFIGS") else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "model-configs")
    return next((c for c in candidates if c.is_dir()), None)


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
