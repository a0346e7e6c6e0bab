"""Checkpoints that survive crashes: everything is written to a temporary name and renamed into
place, so a crash mid-write leaves the previous checkpoint intact. Loading never unpickles
arbitrary objects (safetensors, and ``torch.load(weights_only=True)`` for optimizer state).

A checkpoint is ``checkpoints/step_<N>/``: ``lora.safetensors``, ``state.pt`` (optimizer, lr
schedule, loss scale, random streams, history) and, under DeepSpeed ZeRO, one
``zero_rank<R>.pt`` per rank (that rank's partition of the optimizer state)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CHECKPOINT_DIR = "checkpoints"
#: ``zero_rank<R>.pt``: rank R's part of the ZeRO optimizer state
ZERO_SHARD = "zero_rank"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block
    finishes. A file or a directory may be written there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _remove(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` (a directory replaces a directory)."""
    if path.is_dir() and tmp.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def user_file_mode(path: str | Path) -> None:
    """Give a written file the mode any file the user creates gets (safetensors makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def save_checkpoint(run_dir: str | Path, step: int, lora_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep: int = 0, *, lora_metadata: dict[str, str] | None = None,
                    rank_state: dict[str, Any] | None = None,
                    rank: int = 0, barrier: Callable[[], None] | None = None) -> Path:
    """Write ``checkpoints/step_<N>/`` atomically, then point ``checkpoints/latest`` at it and
    prune old ones (``keep`` > 0). Every rank of a run calls this: rank 0 writes the LoRA and
    ``state.pt``, each rank its ``rank_state`` (ZeRO). All files go into one staging folder that
    rank 0 renames into place once ``barrier`` says every rank has written its own."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    staging = root / f".{final.name}.tmp"
    wait = barrier or (lambda: None)
    if rank == 0:
        _remove(staging)
        staging.mkdir(parents=True)
    wait()
    try:
        if rank_state is not None:
            torch.save(rank_state, staging / f"{ZERO_SHARD}{rank}.pt")
        if rank == 0:
            save_file(lora_state, str(staging / "lora.safetensors"), metadata=lora_metadata)
            user_file_mode(staging / "lora.safetensors")
            torch.save(train_state, staging / "state.pt")
        wait()
        if rank == 0:
            _replace(staging, final)
            with atomic_path(root / "latest") as tmp:
                tmp.write_text(final.name)
            if keep > 0:
                for old in sorted(root.glob("step_*"))[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        if rank == 0:
            _remove(staging)
    wait()  # nobody reads or writes checkpoints before this one is in place
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    marker = root / "latest"
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    complete = [p for p in sorted(root.glob("step_*")) if (p / "state.pt").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    missing = [n for n in ("lora.safetensors", "state.pt") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")
    return load_file(str(path / "lora.safetensors")), torch.load(path / "state.pt", weights_only=True)


def load_rank_states(path: str | Path) -> list[dict[str, Any]]:
    """The per-rank ZeRO optimizer states of a checkpoint, in rank order."""
    files = sorted(Path(path).glob(f"{ZERO_SHARD}*.pt"), key=lambda f: int(f.stem[len(ZERO_SHARD):]))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} holds no ZeRO optimizer state ({ZERO_SHARD}<R>.pt): it was "
                                "written without memory.zero_stage; resume it with the same memory.zero_stage")
    return [torch.load(f, weights_only=True) for f in files]
