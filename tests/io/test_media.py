"""What a run shows a person: frame grids that say which prompt, seed and frame each tile is,
and a reward curve with a legend, its smoothing named, and the held-out points."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fastvader.io import media


def coloured_video(frames: int, value: float) -> torch.Tensor:
    """(F, 3, 8, 8) whose frame f is grey ``value`` with frame index f in the red channel."""
    video = torch.full((frames, 3, 8, 8), value)
    video[:, 0] = torch.arange(frames).float().view(-1, 1, 1) / 10
    return video


def ink(region: np.ndarray) -> int:
    """How many pixels of an RGB region are not white (text, lines, marks)."""
    return int((region.min(axis=-1) < 200).sum())


def test_the_frame_grid_labels_rows_and_columns_and_keeps_the_frames(tmp_path):
    videos = [coloured_video(5, 0.25), coloured_video(5, 0.75)]
    path = media.sample_grid([torch.stack(videos)[:1], torch.stack(videos)[1:]], ["a red ball"], [0, 7],
                             tmp_path / "grid.png")
    grid = np.asarray(Image.open(path).convert("RGB"))
    tile = media.upscale(media.to_uint8(videos[0])[[0]], min_side=96)[0]  # 96x96
    h, w = tile.shape[:2]
    label_w = grid.shape[1] - 3 * (w + 4)  # first, middle, last frame: 0, 2, 4
    assert grid.shape[0] == 19 + 2 * (h + 4) and label_w > 40
    for r, video in enumerate(videos):
        for c, frame in enumerate((0, 2, 4)):
            top, left = 19 + r * (h + 4), label_w + c * (w + 4)
            expected = media.upscale(media.to_uint8(video)[[frame]], min_side=96)[0]
            np.testing.assert_array_equal(grid[top:top + h, left:left + w], expected)
        assert ink(grid[19 + r * (h + 4): 19 + r * (h + 4) + 30, :label_w]) > 20  # "a red ball / seed N"
    assert ink(grid[:17, label_w:]) > 30  # "frame 0  frame 2  frame 4"
    assert ink(grid[:17, :label_w]) == 0


def test_running_mean():
    assert media.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_the_reward_curve_has_a_legend_and_the_held_out_points(tmp_path):
    values = [0.1 * i for i in range(20)] + [float("nan")]
    path = media.plot_curve(values, tmp_path / "curve.png", validation=[(0, -0.5), (21, 2.5)])
    img = np.asarray(Image.open(path).convert("RGB"))
    colours = {name: np.all(img == np.array(rgb, dtype=np.uint8), axis=-1) for name, rgb in media._CURVE_COLOURS.items()}
    legend = img[330:, :]  # below the plot: one swatch and one line of text per series
    for name, mask in colours.items():
        assert mask[330:].sum() >= 18 * 6 - 4, f"legend swatch of {name}"
        assert mask[:330].sum() > 20, f"{name} drawn in the plot"
    assert ink(legend[:, 90:]) > 300
    held = np.argwhere(colours["held-out"][:330])
    # the two held-out points: step 0 at the left edge, low; step 21 at the right edge, high
    assert held[:, 1].min() < 64 + 6 and held[:, 1].max() > 700 - 6
    left_rows = held[held[:, 1] < 64 + 6][:, 0]
    right_rows = held[held[:, 1] > 700 - 6][:, 0]
    assert left_rows.mean() > right_rows.mean()  # -0.5 is drawn below 2.5
