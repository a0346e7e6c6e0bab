"""Checkpoints that survive crashes: everything is written to a temporary name and renamed into
place, so a crash mid-write leaves the previous checkpoint intact, and ``checkpoints/latest``
always names a complete one. Loading never unpickles arbitrary objects (safetensors, and
``torch.load(weights_only=True)`` for optimizer state), verifies what it reads (files parse,
tensors finite, the step matches) and falls back to the newest intact checkpoint, saying which
one it skipped and why. A full disk or an unwritable folder is one error naming the path and the
bytes needed.

A checkpoint is ``checkpoints/step_<N>/``: ``lora.safetensors``, ``state.pt`` (optimizer, lr
schedule, loss scale, random streams, history), ``config.yaml`` (the config that wrote it) and,
under DeepSpeed ZeRO, one ``zero_rank<R>.pt`` per rank (that rank's partition of the optimizer
state)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fastvader.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
#: ``zero_rank<R>.pt``: rank R's part of the ZeRO optimizer state
ZERO_SHARD = "zero_rank"
#: what an interrupted write leaves behind: ``.<name>.tmp[-<pid>]`` and ``.<name>.old-<pid>``
TEMP_MARK, OLD_MARK = ".tmp", ".old-"
#: errno values that mean "this folder cannot take the file", as opposed to a bug
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied"}
#: what torch's zip writer says when the underlying write failed (it drops the errno)
_TORCH_WRITE_FAILURES = ("unexpected pos", "failed writing")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file and why."""


class StorageError(ConfigError):
    """A file that could not be written: disk full, quota, read-only or permission denied. The
    message names the path and the bytes needed; the previous checkpoint is kept."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block
    finishes. A file or a directory may be written there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _remove(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` (a directory replaces a directory)."""
    if path.is_dir() and tmp.is_dir():
        old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def user_file_mode(path: str | Path) -> None:
    """Give a written file the mode any file the user creates gets (safetensors makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Clear what killed writes left in ``folder`` and its ``checkpoints/``: temporary files and
    folders are removed; a ``.<name>.old-<pid>`` whose ``<name>`` is missing (killed between the
    two renames of a replace) is renamed back. Call it only while no other process writes there
    (the run folder's lock). Returns one line per thing done."""
    done = []
    for parent in (Path(folder), Path(folder) / CHECKPOINT_DIR):
        if not parent.is_dir():
            continue
        for p in sorted(parent.glob(".*")):
            name = p.name[1:]
            if OLD_MARK in name and not (parent / name.split(OLD_MARK)[0]).exists():
                os.replace(p, parent / name.split(OLD_MARK)[0])
                done.append(f"restored {parent / name.split(OLD_MARK)[0]} from {p.name}")
            elif OLD_MARK in name or TEMP_MARK in name:
                _remove(p)
                done.append(f"removed {p}")
    return done


# -- writing -------------------------------------------------------------------------------------
def state_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: about what writing it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return len(obj) if isinstance(obj, (str, bytes)) else 0


def storage_error(err: BaseException, path: str | Path, needed: int | None = None) -> StorageError | None:
    """``err`` as one clear error when it says the folder cannot take the file (disk full, quota,
    read-only, permission), else None. torch's zip writer drops the errno; its failure counts as a
    full disk when the disk is in fact (nearly) full."""
    path = Path(path)
    reason = _STORAGE_ERRNOS.get(getattr(err, "errno", None))
    if reason is None and isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        free = _free_bytes(path)
        if free is not None and free < (needed or 0) + 2**20:
            reason = _STORAGE_ERRNOS[errno.ENOSPC]
    if reason is None:
        return None
    if reason == _STORAGE_ERRNOS[errno.EACCES] or reason == _STORAGE_ERRNOS[errno.EROFS]:
        fix = "make it writable or set train.output_dir to a folder you can write"
    else:
        fix = "free space there or set train.output_dir to a disk with room"
    size = f"; it needs about {_human(needed)}" if needed else ""
    free = _free_bytes(path)
    room = f", {_human(free)} free" if free is not None and needed else ""
    return StorageError(f"cannot write {path}: {reason}{size}{room}; {fix}. Nothing was half-written: the "
                        "previous checkpoint (if any) is intact")


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes into a folder that has not the room for them."""
    free = _free_bytes(Path(folder))
    if free is not None and free < needed:
        raise StorageError(f"cannot write {what} to {folder}: it needs about {_human(needed)} and only "
                           f"{_human(free)} are free there; free space or set train.output_dir to a disk with room. "
                           "The previous checkpoint (if any) is intact")


def _free_bytes(path: Path) -> int | None:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


def _human(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def checkpoint_step(path: Path) -> int:
    """``step_0000042`` -> 42 (-1 for a name that is not a checkpoint's)."""
    tail = path.name[len("step_"):]
    return int(tail) if path.name.startswith("step_") and tail.isdigit() else -1


def save_checkpoint(run_dir: str | Path, step: int, lora_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep: int = 0, *, lora_metadata: dict[str, str] | None = None,
                    rank_state: dict[str, Any] | None = None, rank: int = 0,
                    barrier: Callable[[], None] | None = None, config_yaml: str | None = None) -> Path:
    """Write ``checkpoints/step_<N>/`` atomically, then point ``checkpoints/latest`` at it and
    prune this run's older ones (``keep`` > 0; never the one just written). Every rank of a run
    calls this: rank 0 writes the LoRA, ``state.pt`` and ``config.yaml``, each rank its
    ``rank_state`` (ZeRO). All files go into one staging folder that rank 0 renames into place
    once ``barrier`` says every rank has written its own."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    staging = root / f".{final.name}{TEMP_MARK}"
    wait = barrier or (lambda: None)
    needed = state_bytes(rank_state) + (state_bytes([lora_state, train_state, config_yaml]) if rank == 0 else 0)
    check_free_space(root, needed, f"checkpoint step {step}")
    if rank == 0:
        _remove(staging)
        try:
            staging.mkdir(parents=True)
        except OSError as err:
            raise (storage_error(err, staging, needed) or err) from err
    wait()
    try:
        _write_files(staging, rank, lora_state, lora_metadata, train_state, rank_state, config_yaml, needed)
        wait()
        if rank == 0:
            _replace(staging, final)
            with atomic_path(root / "latest") as tmp:
                tmp.write_text(final.name)
            _prune(root, step, keep)
    finally:
        if rank == 0:
            _remove(staging)
    wait()  # nobody reads or writes checkpoints before this one is in place
    return final


def _write_files(staging: Path, rank: int, lora_state, lora_metadata, train_state, rank_state, config_yaml,
                 needed: int) -> None:
    from safetensors.torch import save_file

    try:
        if rank_state is not None:
            torch.save(rank_state, staging / f"{ZERO_SHARD}{rank}.pt")
        if rank == 0:
            save_file(lora_state, str(staging / "lora.safetensors"), metadata=lora_metadata)
            user_file_mode(staging / "lora.safetensors")
            torch.save(train_state, staging / "state.pt")
            if config_yaml is not None:
                (staging / "config.yaml").write_text(config_yaml)
    except (OSError, RuntimeError) as err:
        found = storage_error(err, staging.parent, needed)
        if found is None:
            raise
        raise found from err


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep - 1`` newest older ones."""
    if keep <= 0:
        return
    older = sorted((p for p in root.glob("step_*") if 0 <= checkpoint_step(p) < step), key=checkpoint_step)
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its folder, LoRA tensors and training state."""

    path: Path
    lora: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config_yaml(self) -> str | None:
        saved = self.path / "config.yaml"
        return saved.read_text() if saved.is_file() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return sorted((p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the newest complete one, or None
    (complete: its files are there; :func:`load_checkpoint` verifies their contents)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    marker = root / "latest"
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    complete = [p for p in list_checkpoints(run_dir) if (p / "state.pt").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA tensors and training state of one checkpoint, verified: raises CheckpointError
    naming the file and what is wrong with it."""
    loaded = verified_checkpoint(path)
    return loaded.lora, loaded.state


def verified_checkpoint(path: str | Path) -> LoadedCheckpoint:
    from safetensors.torch import load_file

    from fastvader.monitoring.guards import first_nonfinite

    path = Path(path)
    missing = [n for n in ("lora.safetensors", "state.pt") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    lora = _read(path / "lora.safetensors", lambda f: load_file(str(f)))
    state = _read(path / "state.pt", lambda f: torch.load(f, weights_only=True))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path / 'state.pt'} holds no training state (no 'step')")
    if not lora:
        raise CheckpointError(f"checkpoint {path / 'lora.safetensors'} holds no LoRA tensor")
    for name, tensors in (("lora.safetensors", lora), ("state.pt", state.get("optimizer", {}))):
        bad = first_nonfinite(tensors, name)
        if bad is not None:
            raise CheckpointError(f"checkpoint {path / name} holds NaN/Inf in {bad}")
    if checkpoint_step(path) >= 0 and int(state["step"]) != checkpoint_step(path):
        raise CheckpointError(f"checkpoint {path / 'state.pt'} says step {int(state['step'])}, its folder "
                              f"step {checkpoint_step(path)}")
    return LoadedCheckpoint(path, lora, state)


def _read(file: Path, reader: Callable[[Path], Any]) -> Any:
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {file} is empty (a write that never finished)")
    try:
        return reader(file)
    except Exception as err:  # any parse failure: truncated zip, bad header, pickle error
        first = (str(err).splitlines() or ["no message"])[0].split(". ")[0]
        raise CheckpointError(f"checkpoint file {file} is unreadable ({type(err).__name__}: {first})") from err


def newest_intact_checkpoint(run_dir: str | Path) -> LoadedCheckpoint:
    """The checkpoint ``latest`` names, else the newest one that verifies. Each skipped one is
    named with the reason in a warning; raises CheckpointError when none is intact."""
    root = Path(run_dir) / CHECKPOINT_DIR
    marker = root / "latest"
    named = [root / marker.read_text().strip()] if marker.is_file() else []
    candidates = list(dict.fromkeys(named + list_checkpoints(run_dir)[::-1]))
    reasons = []
    for path in candidates:
        if not path.is_dir():
            reasons.append(f"checkpoints/latest names {path.name}, which does not exist")
            continue
        try:
            return verified_checkpoint(path)
        except CheckpointError as err:
            reasons.append(str(err))
            warnings.warn(f"fastvader: skipped checkpoint {path.name}: {err}; trying an older one", stacklevel=2)
    if not candidates:
        raise CheckpointError(f"no checkpoint under {root}: nothing to resume (train.checkpoint_every and "
                              "train.checkpoint_minutes set how often a run writes them)")
    raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(reasons))


def load_rank_states(path: str | Path) -> list[dict[str, Any]]:
    """The per-rank ZeRO optimizer states of a checkpoint, in rank order."""
    files = sorted(Path(path).glob(f"{ZERO_SHARD}*.pt"), key=lambda f: int(f.stem[len(ZERO_SHARD):]))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no ZeRO optimizer state ({ZERO_SHARD}<R>.pt): it was "
                              "written without memory.zero_stage; resume it with the same memory.zero_stage")
    return [_read(f, lambda g: torch.load(g, weights_only=True)) for f in files]
