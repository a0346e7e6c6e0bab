"""The embedded world's data: coloured shapes moving across plain backgrounds.

A video is 8 frames of 32x32 RGB in [0, 1], shaped (F, 3, H, W): one shape (square, circle or
triangle) of one colour slides in a straight line (left, right, up or down) over a dark, gray or
light background. Its prompt says exactly that, e.g. "a red square moving left on a gray
background". Shapes are drawn with analytic anti-aliasing (one pixel of soft edge) so the VAE
and the reward gradients see smooth images rather than aliased staircases.

Everything is drawn from a seed: ``sample_batch(n, seed)`` returns the same (prompts, videos)
on every machine. Background words (dark/gray/light) never coincide with shape colours, so every
word means one thing wherever it appears in the prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FRAMES, HEIGHT, WIDTH = 8, 32, 32

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.97, 0.97, 0.97),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates, y grows down
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}
BACKGROUNDS: dict[str, float] = {"dark": 0.08, "gray": 0.50, "light": 0.85}
# A white shape on a light background has too little contrast to be worth learning.
EXCLUDED = {("white", "light")}

FILLER_WORDS = ("a", "moving", "on", "background")
VOCAB: list[str] = ["<pad>", "<unk>", *FILLER_WORDS, *COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS]

# Per-video variation: the prompt fixes the categories, these ranges the rest.
SIZE_RANGE = (4.0, 6.5)        # half-size of the shape in pixels
SPEED_RANGE = (1.6, 2.4)       # pixels per frame
COLOR_JITTER = 0.06            # +- per channel, so colour words name a region, not one RGB
BACKGROUND_JITTER = 0.05


@dataclass(frozen=True)
class Scene:
    """Everything a video shows. ``describe`` turns it into the prompt."""

    color: str
    shape: str
    direction: str
    background: str

    def describe(self, with_motion: bool = True, with_background: bool = True) -> str:
        words = f"a {self.color} {self.shape}"
        if with_motion:
            words += f" moving {self.direction}"
        if with_background:
            words += f" on a {self.background} background"
        return words


def all_scenes() -> list[Scene]:
    """Every (colour, shape, direction, background) the world draws: 5*3*4*3 minus exclusions."""
    return [Scene(c, s, d, b) for c in COLORS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS
            if (c, b) not in EXCLUDED]


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The categories a prompt names (None where it names none): the inverse of ``describe``."""
    words = prompt.lower().split()
    pick = lambda options: next((w for w in words if w in options), None)  # noqa: E731
    return dict(color=pick(COLORS), shape=pick(SHAPES), direction=pick(DIRECTIONS),
                background=pick(BACKGROUNDS))


def _shape_coverage(shape: str, xs: torch.Tensor, ys: torch.Tensor, cx: torch.Tensor,
                    cy: torch.Tensor, size: float) -> torch.Tensor:
    """Fraction of each pixel covered by the shape (anti-aliased over about one pixel).

    xs, ys: pixel-centre coordinates (1, H, W); cx, cy: centres per frame (F, 1, 1).
    Each shape is a signed distance d (positive inside); coverage = clamp(d + 0.5, 0, 1)."""
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        inside = size - torch.maximum(dx.abs(), dy.abs())
    elif shape == "circle":
        inside = size * 1.1 - torch.sqrt(dx * dx + dy * dy)  # same visual area as the square
    elif shape == "triangle":
        # Upward-pointing isosceles triangle: apex at (0, -1.2s), base at y = +s, width 2.4s.
        r = size * 1.2
        apex_y, base_y, half_base = -r, size, r
        base = base_y - dy
        # The two slanted edges: outward normals (+-h, -w) / norm for a side of rise h, run w.
        rise, run = base_y - apex_y, half_base
        norm = math.hypot(rise, run)
        right = ((dy - apex_y) * run - dx * rise) / norm
        left = ((dy - apex_y) * run + dx * rise) / norm
        inside = torch.minimum(base, torch.minimum(left, right))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return (inside + 0.5).clamp(0.0, 1.0)


def render(scene: Scene, start: tuple[float, float], speed: float, size: float,
           color: tuple[float, float, float], background: float,
           frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """One video (F, 3, H, W) in [0, 1]: the shape's centre starts at ``start`` (x, y) and
    moves ``speed`` pixels per frame in the scene's direction."""
    dx, dy = DIRECTIONS[scene.direction]
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    cx, cy = start[0] + dx * speed * t, start[1] + dy * speed * t
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    cover = _shape_coverage(scene.shape, xs, ys, cx, cy, size).unsqueeze(1)  # (F, 1, H, W)
    rgb = torch.tensor(color, dtype=torch.float32).view(1, 3, 1, 1)
    return (cover * rgb + (1.0 - cover) * background).clamp(0.0, 1.0)


def sample_scene_video(scene: Scene, generator: torch.Generator, frames: int = FRAMES,
                       height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """A random instance of ``scene``: size, speed, start point and colour jitter drawn from
    ``generator``. The path stays inside the frame (margin = the shape's extent)."""
    u = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u()
    speed = SPEED_RANGE[0] + (SPEED_RANGE[1] - SPEED_RANGE[0]) * u()
    travel = speed * (frames - 1)
    margin = size * 1.2 + 0.5
    dx, dy = DIRECTIONS[scene.direction]

    def start_on(axis_len: float, step: float) -> float:
        if step == 0.0:  # across the motion: anywhere that keeps the shape in view
            return margin + (axis_len - 2 * margin) * u()
        lo, hi = margin, axis_len - margin - travel  # room left over after the whole path
        first = lo + max(0.0, hi - lo) * u()
        return first if step > 0 else axis_len - first

    start = (start_on(width, dx), start_on(height, dy))
    color = tuple(min(1.0, max(0.0, c + COLOR_JITTER * (2 * u() - 1))) for c in COLORS[scene.color])
    background = BACKGROUNDS[scene.background] + BACKGROUND_JITTER * (2 * u() - 1)
    return render(scene, start, speed, size, color, background, frames, height, width)


def sample_batch(n: int, seed: int, partial_prompt_prob: float = 0.15,
                 frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH
                 ) -> tuple[list[str], torch.Tensor]:
    """``n`` (prompt, video) pairs drawn deterministically from ``seed``.

    Returns prompts and videos (n, F, 3, H, W) in [0, 1]. With probability
    ``partial_prompt_prob`` each, the prompt leaves out the motion or the background phrase
    (the video still has both), so short prompts such as "a red circle" work too."""
    if n < 1:
        raise ValueError(f"sample_batch needs n >= 1; got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    scenes = all_scenes()
    picks = torch.randint(len(scenes), (n,), generator=generator).tolist()
    prompts, videos = [], []
    for index in picks:
        scene = scenes[index]
        keep_motion, keep_background = (torch.rand(2, generator=generator) >= partial_prompt_prob).tolist()
        prompts.append(scene.describe(keep_motion, keep_background))
        videos.append(sample_scene_video(scene, generator, frames, height, width))
    return prompts, torch.stack(videos)


# -- measurements used by the tests and the quality report -----------------------------------
def foreground_mask(video: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """(..., F, 3, H, W) -> (..., F, H, W) bool: pixels that differ from the frame's background
    (its per-channel median, the background covering most of every frame)."""
    background = video.flatten(-2).median(dim=-1).values[..., None, None]
    return (video - background).abs().amax(dim=-3) > threshold


def dominant_color(video: torch.Tensor) -> str | None:
    """The named colour nearest to the mean foreground colour of a video (F, 3, H, W), or None
    when nothing stands out from the background."""
    mask = foreground_mask(video)  # (F, H, W)
    if mask.sum() < 4:
        return None
    pixels = video.permute(1, 0, 2, 3)[:, mask]  # (3, N)
    mean = pixels.mean(dim=1)
    names = list(COLORS)
    table = torch.tensor([COLORS[n] for n in names])
    return names[int(((table - mean) ** 2).sum(dim=1).argmin())]


def centroid_track(video: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) -> (F, 2): the (x, y) centroid of the foreground in each frame (NaN where
    a frame has no foreground)."""
    mask = foreground_mask(video).float()  # (F, H, W)
    h, w = mask.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    total = mask.sum(dim=(1, 2))
    cx = (mask * xs).sum(dim=(1, 2)) / total
    cy = (mask * ys).sum(dim=(1, 2)) / total
    return torch.stack([cx, cy], dim=1)


def motion_direction(video: torch.Tensor) -> str | None:
    """The direction the foreground centroid travels from the first to the last frame in which it
    is visible, or None when it barely moves (< 3 pixels) or cannot be found."""
    track = centroid_track(video)
    valid = ~torch.isnan(track).any(dim=1)
    if valid.sum() < 2:
        return None
    first, last = track[valid][0], track[valid][-1]
    dx, dy = (last - first).tolist()
    if max(abs(dx), abs(dy)) < 3.0:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def background_name(video: torch.Tensor) -> str:
    """The background word whose gray level is nearest the video's median luminance."""
    level = float(video.mean(dim=-3).median())
    return min(BACKGROUNDS, key=lambda name: abs(BACKGROUNDS[name] - level))


def shape_name(video: torch.Tensor) -> str | None:
    """Rough shape class from how much of its bounding box the foreground fills, per frame then
    median over frames: a square fills ~1, a circle ~pi/4, a triangle ~1/2. None without a
    foreground."""
    fills = []
    for mask in foreground_mask(video):
        if mask.sum() < 4:
            continue
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(float(mask.sum()) / float(box))
    if not fills:
        return None
    fill = sorted(fills)[len(fills) // 2]
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def describe_video(video: torch.Tensor) -> dict[str, str | None]:
    """What a video (F, 3, H, W) shows, measured from its pixels: the keys of ``parse_prompt``."""
    return dict(color=dominant_color(video), shape=shape_name(video),
                direction=motion_direction(video), background=background_name(video))
