"""Logging where users look: TensorBoard and (when installed and asked for) Weights & Biases get
the step scalars, validation scalars, sample videos, frame grids and the reward curve.

``metrics.jsonl`` in the run directory stays the source of truth; these backends are views of it.
A backend that raises is switched off after one warning: a logging failure never kills a run.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def metrics_line(record: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line in strict JSON (what ``json.loads`` in any language accepts):
    a NaN or infinite number is written as null and its field named in ``"nonfinite"``."""
    nonfinite: list[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite.append(where)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if nonfinite:
        out["nonfinite"] = nonfinite
    return json.dumps(out, allow_nan=False, default=str) + "\n"


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _gif_bytes(video: torch.Tensor, fps: int) -> bytes:
    import imageio.v3 as iio

    from fastvader.io.media import to_uint8, upscale

    buf = io.BytesIO()
    iio.imwrite(buf, upscale(to_uint8(video)), extension=".gif", duration=int(1000 / max(fps, 1)), loop=0)
    return buf.getvalue()


class LogBackend:
    """One destination. Override what it supports; everything defaults to doing nothing."""

    name = "backend"

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_videos(self, step: int, tag: str, videos: Sequence[torch.Tensor], fps: int) -> None: ...

    def log_image(self, step: int, tag: str, path: Path) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend(LogBackend):
    """torch.utils.tensorboard; videos go in as animated GIF image summaries (what ``add_video``
    writes, without its moviepy dependency)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_scalars(self, step, scalars):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_videos(self, step, tag, videos, fps):
        from tensorboard.compat.proto.summary_pb2 import Summary

        for i, video in enumerate(videos):
            _, _, h, w = video.shape
            image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=_gif_bytes(video, fps))
            summary = Summary(value=[Summary.Value(tag=f"{tag}/{i}", image=image)])
            self.writer._get_file_writer().add_summary(summary, step)
        self.writer.flush()

    def log_image(self, step, tag, path):
        import imageio.v3 as iio

        self.writer.add_image(tag, np.asarray(iio.imread(path))[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbBackend(LogBackend):
    """Weights & Biases: only built when ``logging.wandb=true``; needs ``pip install wandb``."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path):
        import wandb

        self.wandb = wandb
        kwargs = dict(project=cfg.logging.wandb_project, name=cfg.train.run_name, dir=str(run_dir),
                      config=cfg.to_dict())
        if cfg.logging.wandb_mode:
            kwargs["mode"] = cfg.logging.wandb_mode
        self.run = wandb.init(**kwargs)

    def log_scalars(self, step, scalars):
        self.run.log(dict(scalars), step=step)

    def log_videos(self, step, tag, videos, fps):
        from fastvader.io.media import to_uint8

        clips = {f"{tag}/{i}": self.wandb.Video(to_uint8(v).transpose(0, 3, 1, 2), fps=fps, format="gif")
                 for i, v in enumerate(videos)}
        self.run.log(clips, step=step)

    def log_image(self, step, tag, path):
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


class Loggers:
    """Fans each call out to every live backend. The first exception from a backend is reported
    once as a warning, and that backend is switched off for the rest of the run."""

    def __init__(self, backends: Sequence[LogBackend] = (), videos: bool = True):
        self.backends = list(backends)
        self.videos = videos
        self.disabled: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg, run_dir: Path) -> "Loggers":
        loggers = cls(videos=cfg.logging.videos)
        if cfg.logging.tensorboard:
            loggers._try_add(lambda: TensorBoardBackend(run_dir / "tensorboard"), "tensorboard")
        if cfg.logging.wandb:
            loggers._try_add(lambda: WandbBackend(cfg, run_dir), "wandb",
                             missing="logging.wandb=true but wandb is not installed (pip install wandb)")
        return loggers

    def _try_add(self, build, name: str, missing: str | None = None) -> None:
        try:
            self.backends.append(build())
        except ImportError as err:
            self._warn(name, missing or f"{name} is not available ({err})")
        except Exception as err:  # a backend that cannot start must not stop training
            self._warn(name, f"could not start ({type(err).__name__}: {err})")

    def _warn(self, name: str, why: str) -> None:
        self.disabled[name] = why
        warnings.warn(f"fastvader: logging backend {name} switched off: {why}. metrics.jsonl is unaffected.",
                      stacklevel=3)

    def _call(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                self.backends.remove(backend)
                self._warn(backend.name, f"{method} raised {type(err).__name__}: {err}")

    # -- what the loop logs ----------------------------------------------------------------------
    def log_step(self, step: int, record: dict[str, Any]) -> None:
        self._call("log_scalars", step, {f"train/{k}": v for k, v in _numeric(record).items() if k != "step"})

    def log_validation(self, step: int, tag: str, result: dict[str, Any], videos: Sequence[torch.Tensor],
                       fps: int) -> None:
        scalars = {"heldout/reward": result["reward"]}
        if "second_reward" in result:
            scalars["heldout/second_reward"] = result["second_reward"]
        self._call("log_scalars", step, scalars)
        if result.get("grid"):
            self._call("log_image", step, f"samples/{tag}_grid", Path(result["grid"]))
        if self.videos:
            self._call("log_videos", step, f"videos/{tag}", [v for batch in videos for v in batch], fps)

    def log_summary(self, step: int, curve_png: Path | None, scalars: dict[str, float]) -> None:
        self._call("log_scalars", step, {f"summary/{k}": v for k, v in _numeric(scalars).items()})
        if curve_png is not None and Path(curve_png).is_file():
            self._call("log_image", step, "reward_curve", Path(curve_png))

    def close(self) -> None:
        self._call("close")
        self.backends = []
