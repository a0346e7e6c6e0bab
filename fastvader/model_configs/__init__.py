"""The real model configurations fastvader builds architectures from, packaged with it.

Hyperparameter files only (JSON/YAML: no code, no weights), in the layout of the shared
``model-configs`` collection they were copied from: ``modelscope_t2v_1.7b/unet_config.json``,
``reward_models/hpsv2_config.json``, ... Each folder's ``SOURCES.md`` says where every file
comes from. ``random_init`` backbones and rewards, ``fastvader models`` and the memory planner
read them from here, so none of them needs a download or a folder outside the package.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def packaged_config(relative: str) -> Path:
    """The packaged file or folder ``relative`` (e.g. ``"sd15/vae_config.json"``).

    Raises FileNotFoundError naming it when this installation lacks it."""
    path = ROOT / relative
    if not path.exists():
        raise FileNotFoundError(f"fastvader's packaged model config {relative!r} is missing from {ROOT}: "
                                "reinstall fastvader, or give the config file or folder explicitly")
    return path
