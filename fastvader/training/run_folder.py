"""A run folder belongs to one run (docs/runs.md).

- A new run goes into an empty folder. One that holds a run is refused, saying what to do:
  ``--resume`` it, ``--overwrite`` it (which deletes everything in it first), or another
  ``train.run_name``.
- ``--resume RUN_DIR`` continues that run in that folder (wherever it was moved or copied to);
  ``--resume RUN_DIR/checkpoints/step_N`` continues from a chosen checkpoint, setting aside the
  newer ones. A changed setting that changes the model or the shapes a checkpoint holds is
  refused, naming the field and both values; other changes are allowed with a warning and
  recorded in the run's history.
- Every check happens in :meth:`RunFolder.open`, before any model is built; nothing in the folder
  changes until :meth:`RunFolder.claim`, at the start of training. One process at a time holds
  the folder (a lock the OS releases when the process dies, however it dies).
- The run's history (``invocations``: one record per ``fastvader train`` that worked on it) lives
  in the trainer's checkpointed history, so that summary.json spans every resume.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from fastvader.config import ConfigError, TrainConfig
from fastvader.io.checkpoint import (CHECKPOINT_DIR, LoadedCheckpoint, atomic_path, checkpoint_step,
                                     list_checkpoints, newest_intact_checkpoint, remove_stale_temporaries,
                                     verified_checkpoint)

LOCK_FILE = ".lock"
#: where a run folder's own files go; a folder holding none of them is not a run's
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "lora.safetensors", CHECKPOINT_DIR)
#: where checkpoints newer than the one a run resumed from are set aside
SUPERSEDED_DIR = "superseded"
#: settings a resumed run cannot change: the checkpoint's tensors, or what they mean, depend on them
FIXED_ON_RESUME = ("backbone.name", "backbone.pretrained", "backbone.random_init", "backbone.config_path",
                   "backbone.options", "lora.rank", "lora.alpha", "lora.target_modules", "video.frames",
                   "video.height", "video.width", "memory.zero_stage")
#: settings that say where the run is or how progress shows, not how it trains
IGNORED_ON_RESUME = ("train.output_dir", "train.run_name", "train.progress")
#: what resuming is usually for, and how often it saves: recorded, not warned about
EXPECTED_ON_RESUME = ("train.steps", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints")


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked; the message says what to do instead."""


@dataclass(frozen=True)
class ResumePoint:
    """What ``--resume`` named: a run folder, and maybe one of its checkpoints."""

    run_dir: Path
    checkpoint: Path | None = None

    @classmethod
    def parse(cls, target: str | Path) -> "ResumePoint":
        path = Path(target)
        if path.parent.name == CHECKPOINT_DIR and checkpoint_step(path) >= 0:
            if not path.is_dir():
                raise RunFolderError(f"--resume {path}: no such checkpoint (the run's checkpoints: "
                                     f"{[p.name for p in list_checkpoints(path.parent.parent)]})")
            return cls(path.parent.parent, path)
        if not path.is_dir():
            raise RunFolderError(f"--resume {path}: no such run folder")
        return cls(path)

    def config_path(self) -> Path:
        """The config.yaml a resumed run continues with when no --config is given: the chosen
        checkpoint's, else the run's."""
        candidates = ([self.checkpoint / "config.yaml"] if self.checkpoint else []) + [self.run_dir / "config.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise RunFolderError(f"{self.run_dir} has no config.yaml to resume with: give the run's config with "
                                 "--config")
        return found


@dataclass
class RunFolder:
    """The folder one run writes to. Build it with :meth:`open`; training calls :meth:`claim`
    and :meth:`release` (on the process that writes the run's files)."""

    path: Path
    overwrite: bool = False
    #: the checkpoint a resumed run continues from and its step (None: a new run)
    resumed_from: Path | None = None
    resumed_step: int | None = None
    #: that checkpoint, verified and loaded, until the trainer has taken its tensors
    checkpoint: LoadedCheckpoint | None = None
    #: settings changed since that checkpoint was written: {field: [old, new]}
    changes: dict[str, list] = field(default_factory=dict)
    _lock: "FolderLock | None" = None
    _prepared: bool = False

    @classmethod
    def open(cls, cfg: TrainConfig, resume: str | Path | None = None,
             overwrite: bool = False) -> tuple["RunFolder", TrainConfig]:
        """Check everything about the folder without changing it; returns the folder and the
        config pointed at it (a resumed run stays in the folder it was resumed from)."""
        if resume is not None and overwrite:
            raise RunFolderError("--resume continues a run and --overwrite deletes one: give only one of them")
        point = ResumePoint.parse(resume) if resume is not None else None
        path = point.run_dir if point is not None else cfg.run_dir
        FolderLock(path).check_free()  # first: a run in progress may be writing what the checks read
        check_writable(path)
        if point is None:
            run = cls(path, overwrite=overwrite)
            run._check_new_run()
            return run, cfg
        loaded = verified_checkpoint(point.checkpoint) if point.checkpoint else newest_intact_checkpoint(path)
        run = cls(path, resumed_from=loaded.path, resumed_step=loaded.step, checkpoint=loaded)
        cfg = run._pointed_at(cfg)
        run.changes = settings_changes(run._saved_config(), cfg, path)
        if loaded.step >= cfg.train.steps:
            raise RunFolderError(f"{path} is at step {loaded.step} and train.steps={cfg.train.steps}: nothing is "
                                 "left to train; to go on, raise it (--set train.steps=N)")
        return run, cfg

    def _check_new_run(self) -> None:
        entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE) if self.path.is_dir() else []
        if not entries:
            return
        if not self.overwrite:
            raise RunFolderError(self._occupied_message())
        if not any((self.path / name).exists() for name in RUN_FILES):
            raise RunFolderError(f"{self.path} holds {entries[:5]} and no fastvader run ({', '.join(RUN_FILES)}): "
                                 "--overwrite only clears run folders; choose another train.run_name or "
                                 "train.output_dir")

    def _occupied_message(self) -> str:
        summary = _read_json(self.path / "summary.json")
        checkpoints = list_checkpoints(self.path)
        held = [f"status {summary.get('status', '?')} at step {summary.get('steps', '?')}" if summary
                else "no summary.json", f"{len(checkpoints)} checkpoint(s)"]
        todo = [f"continue it with --resume {self.path} (and --set train.steps=N to train further)"] if checkpoints else []
        todo += [f"replace it with --overwrite (deletes everything in {self.path} first)",
                 "or choose another train.run_name"]
        return f"{self.path} already holds a run ({', '.join(held)}); a run folder belongs to one run: " + "; ".join(todo)

    def _pointed_at(self, cfg: TrainConfig) -> TrainConfig:
        here = self.path
        if cfg.run_dir.resolve() != here.resolve():
            warnings.warn(f"fastvader: resuming in {here}, the folder named by --resume; the config's "
                          f"train.output_dir/run_name ({cfg.run_dir}) now name it", stacklevel=3)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(here.parent),
                                                                  run_name=here.name))

    def _saved_config(self) -> dict | None:
        text = self.checkpoint.config_yaml
        if text is None and (self.path / "config.yaml").is_file():
            text = (self.path / "config.yaml").read_text()
        data = yaml.safe_load(text) if text else None
        return data if isinstance(data, dict) else None

    # -- the folder, once training starts ----------------------------------------------------------
    def claim(self) -> list[str]:
        """Take the folder for this process and make it ready: killed writes' leftovers go and,
        the first time only, --overwrite empties it or a resumed run sets aside the checkpoints
        newer than the one it continues from and drops the log lines after it (they will be
        redone). Returns what it did."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(self.path)
        self._lock.acquire()
        done = []
        if self.overwrite and not self._prepared:
            for entry in self.path.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            done.append(f"--overwrite: emptied {self.path}")
        done += remove_stale_temporaries(self.path)
        if self.resumed_step is not None and not self._prepared:
            done += self._set_aside_newer(self.resumed_step)
            _truncate_metrics(self.path / "metrics.jsonl", self.resumed_step)
        self._prepared = True
        for line in done:
            print(f"fastvader: {line}")
        return done

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _set_aside_newer(self, step: int) -> list[str]:
        newer = [p for p in list_checkpoints(self.path) if checkpoint_step(p) > step]
        if not newer:
            return []
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = self.path / SUPERSEDED_DIR / f"after_step_{step}_{stamp}"
        dest.mkdir(parents=True)
        for p in newer:
            os.replace(p, dest / p.name)
        dropped = _truncate_metrics(self.path / "metrics.jsonl", step)
        (dest / "metrics.jsonl").write_text("".join(ln + "\n" for ln in dropped))
        return [f"resuming from step {step}: set aside the newer checkpoints {[p.name for p in newer]} and their "
                f"log lines in {dest}"]


def settings_changes(saved: dict | None, cfg: TrainConfig, run_dir: Path) -> dict[str, list]:
    """{field: [old, new]} for each setting ``cfg`` changes against the ``saved`` config (a
    section -> fields mapping). Raises RunFolderError for settings a resumed run cannot change;
    warns about the others, but for more steps."""
    if saved is None:
        warnings.warn(f"fastvader: {run_dir} keeps no config.yaml: the resumed settings cannot be compared with the "
                      "run's", stacklevel=3)
        return {}
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    changes = {k: [old[k], v] for k, v in new.items() if k in old and old[k] != v and k not in IGNORED_ON_RESUME}
    fixed = [f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items() if k in FIXED_ON_RESUME]
    if fixed:
        raise RunFolderError(f"cannot resume {run_dir} with a changed {'; '.join(fixed)}: the checkpoint's weights "
                             "belong to the run's values. Resume with them, or start a new run (another "
                             "train.run_name)")
    warned = {k: v for k, v in changes.items() if k not in EXPECTED_ON_RESUME}
    if warned:
        listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in warned.items())
        warnings.warn(f"fastvader: resuming {run_dir} with changed settings ({listed}); summary.json records them "
                      "under invocations", stacklevel=3)
    return changes


def _flatten(config: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def check_writable(path: Path) -> None:
    """Refuse a run folder this process cannot create or write, before anything is built."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RunFolderError(f"cannot create the run folder {path}: {existing} is a file; set train.output_dir to a "
                             "folder")
    for folder in (existing, existing / CHECKPOINT_DIR):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise RunFolderError(f"cannot write to {folder}: permission denied; make it writable or set "
                                 "train.output_dir to a folder you can write")


class FolderLock:
    """An exclusive lock on ``<run>/.lock`` (fcntl.flock: the OS drops it when the holder dies, so
    a killed run never leaves its folder locked). Where flock is missing, no lock is taken."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / LOCK_FILE
        self.handle = None

    def check_free(self) -> None:
        """Raise when another process holds the folder; changes nothing."""
        if self.file.is_file():
            self.acquire(probe=True)
            self.release()

    def acquire(self, probe: bool = False) -> None:
        """Hold the lock (writing this process's id into the file), or only try it (``probe``)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return
        self.handle = open(self.file, "r" if probe else "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "?"
            self.release()
            raise RunFolderError(f"{self.file.parent} is in use by another fastvader process (pid {holder}); wait for "
                                 "it to end, or choose another train.run_name") from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            return
        if not probe:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(str(os.getpid()))
            self.handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


# -- the run's history across invocations ----------------------------------------------------------
def begin_invocation(history: dict, step: int, resumed_from: Path | None, changes: dict) -> dict:
    """Append this invocation's record to ``history["invocations"]`` and return it. A previous
    record still "running" belongs to a process that ended without closing the run (killed or
    crashed): its figures are as of its last checkpoint."""
    records = history.setdefault("invocations", [])
    for record in records:
        if record["status"] == "running":
            record["status"] = "unfinished"
    record = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "start_step": step,
              "end_step": step, "wall_time_s": 0.0, "status": "running",
              "resumed_from": str(resumed_from) if resumed_from is not None else None, "config_changes": changes,
              "self_check": None}
    records.append(record)
    return record


def update_invocation(record: dict, step: int, wall_time_s: float, status: str | None = None,
                      self_check: dict | None = None) -> None:
    """Bring the record up to ``step`` (before each checkpoint and at the end)."""
    record.update(end_step=step, wall_time_s=round(wall_time_s, 2))
    if status is not None:
        record["status"] = status
    if self_check:
        record["self_check"] = self_check


def total_wall_time(history: dict) -> float:
    return round(sum(r["wall_time_s"] for r in history.get("invocations", [])), 2)


def _truncate_metrics(path: Path, step: int) -> list[str]:
    """Drop log lines written after ``step`` (the checkpoint a run resumes from); returns them."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(kept) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in kept))
    return [ln for ln in lines if json.loads(ln)["step"] > step]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
