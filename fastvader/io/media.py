"""Writing what a run shows a person: sample videos (mp4 and gif), frame grids, reward curves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    return (video.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def upscale(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale so tiny videos are visible (and mp4 encoders accept them)."""
    h, w = frames.shape[1:3]
    factor = max(1, math.ceil(min_side / min(h, w)))
    factor += factor % 2  # even sizes for yuv420p
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_video(video: torch.Tensor, path: str | Path, fps: int = 8) -> list[Path]:
    """Write ``path``.mp4 and ``path``.gif; returns the files written (mp4 may be skipped when
    no ffmpeg is available)."""
    import imageio.v3 as iio

    frames = upscale(to_uint8(video))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    gif = path.with_suffix(".gif")
    iio.imwrite(gif, frames, duration=int(1000 / fps), loop=0)
    written.append(gif)
    try:
        mp4 = path.with_suffix(".mp4")
        _write_mp4(frames, mp4, fps)
        written.append(mp4)
    except Exception as err:  # an encoder problem must not lose the run
        print(f"fastvader: could not write mp4 ({err}); the gif is there")
    return written


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def frame_grid(videos: Sequence[torch.Tensor], path: str | Path, frames: Sequence[int] | None = None) -> Path:
    """One row per video, columns = chosen frames (default first, middle, last): a PNG."""
    import imageio.v3 as iio

    rows = []
    for video in videos:
        arr = to_uint8(video)
        idx = frames if frames is not None else sorted({0, len(arr) // 2, len(arr) - 1})
        rows.append(np.concatenate([arr[i] for i in idx], axis=1))
    grid = upscale(np.concatenate(rows, axis=0)[None], min_side=256)[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, grid)
    return path


def plot_curve(values: Sequence[float], path: str | Path, title: str = "reward",
               width: int = 640, height: int = 360) -> Path:
    """A line plot as PNG with PIL alone (no plotting library needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    vals = [float(v) for v in values if v == v]
    if vals:
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        def xy(i, v):
            x = left + (right - left) * (i / max(1, len(vals) - 1))
            y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
            return x, y
        draw.line([xy(i, v) for i, v in enumerate(vals)], fill=(31, 119, 180), width=2)
        # running mean over a tenth of the run shows the trend through the noise
        k = max(1, len(vals) // 10)
        smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(214, 39, 40), width=2)
        draw.text((4, top - 4), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 8), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 8), "step 1", fill="black")
        draw.text((right - 60, bottom + 8), f"step {len(vals)}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
