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


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return [line for part in text.splitlines() for line in (textwrap.wrap(part, width) or [""])]


def frame_grid(videos: Sequence[torch.Tensor], path: str | Path, frames: Sequence[int] | None = None,
               labels: Sequence[str] | None = None) -> Path:
    """A PNG with one row per video and one column per chosen frame (default first, middle,
    last). Each column is headed by its frame index and each row by its label (prompt and seed)."""
    from PIL import Image, ImageDraw

    rows = [to_uint8(video) for video in videos]
    idx = list(frames) if frames is not None else sorted({0, len(rows[0]) // 2, len(rows[0]) - 1})
    tiles = [upscale(arr[idx], min_side=96) for arr in rows]
    tile_h, tile_w = tiles[0].shape[1:3]
    font, line_h, gap = _font(12), 15, 4
    label_lines = [_wrap(text, 28) for text in (labels or [f"video {i}" for i in range(len(rows))])]
    label_w = 8 + max(int(font.getlength(line)) for lines in label_lines for line in lines)
    head = line_h + gap
    grid = Image.new("RGB", (label_w + len(idx) * (tile_w + gap), head + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, frame in enumerate(idx):
        draw.text((label_w + c * (tile_w + gap), 2), f"frame {frame}", fill="black", font=font)
    for r, (frames_of_row, lines) in enumerate(zip(tiles, label_lines)):
        top = head + r * (tile_h + gap)
        for c, frame in enumerate(frames_of_row):
            grid.paste(Image.fromarray(frame), (label_w + c * (tile_w + gap), top))
        for i, line in enumerate(lines[: max(1, tile_h // line_h)]):
            draw.text((4, top + i * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def sample_grid(videos: Sequence[torch.Tensor], prompts: Sequence[str], seeds: Sequence[int],
                path: str | Path) -> Path:
    """:func:`frame_grid` of sampled videos, one (B, F, 3, H, W) batch a seed, labelled with
    each video's prompt and seed."""
    rows = [video for batch in videos for video in batch]
    labels = [f"{prompt}\nseed {seed}" for seed in seeds for prompt in prompts]
    return frame_grid(rows, path, labels=labels)


#: colours of the reward curve's three series
_CURVE_COLOURS = {"step": (31, 119, 180), "mean": (214, 39, 40), "held-out": (44, 160, 44)}


def running_mean(values: Sequence[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def plot_curve(values: Sequence[float], path: str | Path, title: str = "reward",
               validation: Sequence[tuple[int, float]] = (), width: int = 720, height: int = 400) -> Path:
    """The training reward per step, its running mean (the window named in the legend) and the
    held-out (validation) reward at the steps it was measured, with a legend: a PNG drawn with
    PIL alone. NaN steps (skipped by the guards) are left out."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 64, width - 20, 30, height - 70
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black", font=font)
    steps = [(i + 1, float(v)) for i, v in enumerate(values) if v == v]
    held = [(int(s), float(v)) for s, v in validation if v == v]
    window = max(1, len(steps) // 10)
    if steps or held:
        ys = [v for _, v in steps + held]
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        last = max([s for s, _ in steps + held] + [1])

        def xy(step: float, v: float) -> tuple[float, float]:
            return left + (right - left) * step / last, bottom - (bottom - top) * (v - lo) / (hi - lo)

        if steps:
            draw.line([xy(*p) for p in steps], fill=_CURVE_COLOURS["step"], width=1)
            mean = running_mean([v for _, v in steps], window)
            draw.line([xy(s, m) for (s, _), m in zip(steps, mean)], fill=_CURVE_COLOURS["mean"], width=2)
        for step, v in held:
            x, y = xy(step, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_CURVE_COLOURS["held-out"], outline="black")
        draw.text((4, top - 4), f"{hi:.3g}", fill="black", font=font)
        draw.text((4, bottom - 8), f"{lo:.3g}", fill="black", font=font)
        draw.text((left, bottom + 4), "step 0", fill="black", font=font)
        draw.text((right - 60, bottom + 4), f"step {last}", fill="black", font=font)
    legend = [("step", "training reward, each step (its batch)"),
              ("mean", f"running mean over the last {window} step(s)"),
              ("held-out", "held-out reward (validation prompts and seeds)")]
    for i, (key, text) in enumerate(legend):
        y = bottom + 24 + i * 14
        draw.rectangle([left, y + 3, left + 18, y + 9], fill=_CURVE_COLOURS[key])
        draw.text((left + 26, y), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
