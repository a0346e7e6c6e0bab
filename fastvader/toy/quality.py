"""How good is a trained toy world? Measures what docs/toy_world.md reports.

    python -m fastvader.toy.quality [--weights DIR] [--videos N] [--grid FILE.png]

- VAE: mean squared reconstruction error of held-out synthetic frames (pixels in [0, 1]), and
  the share of held-out videos whose round trip through the VAE still shows each attribute
  (the ceiling for any denoiser on its latents).
- Samples (DDIM 25 steps, guidance 7.5): for N prompts spread over the scenes, the share whose
  pixels show the prompt's colour, background, motion direction and shape, as measured by
  fastvader.toy.world.describe_video (the same measures score the generator at 100%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fastvader.toy import world as synthetic
from fastvader.toy.model import WEIGHTS_DIR, ToyWorld, load_toy_world
from fastvader.toy.sample import decode_latents, encode_latents, sample_videos, save_grid

ATTRIBUTES = ("color", "background", "direction", "shape")


@torch.no_grad()
def vae_reconstruction_mse(world: ToyWorld, videos: int = 32, seed: int = 987_654) -> float:
    _, clips = synthetic.sample_batch(videos, seed=seed)
    reconstruction = decode_latents(world.vae, encode_latents(world.vae, clips))
    return float(((reconstruction - clips) ** 2).mean())


def attribute_accuracy(prompts: list[str], videos: torch.Tensor) -> dict[str, float]:
    """Share of ``videos`` whose measured attributes match their prompts, per attribute."""
    hits = {key: 0 for key in ATTRIBUTES}
    for prompt, video in zip(prompts, videos):
        named, seen = synthetic.parse_prompt(prompt), synthetic.describe_video(video)
        for key in ATTRIBUTES:
            hits[key] += int(named[key] == seen[key])
    return {key: hits[key] / len(prompts) for key in ATTRIBUTES}


@torch.no_grad()
def vae_round_trip_accuracy(world: ToyWorld, videos: int = 48, seed: int = 987_654) -> dict[str, float]:
    """attribute_accuracy of held-out videos after encoding and decoding them."""
    prompts, clips = synthetic.sample_batch(videos, seed=seed, partial_prompt_prob=0.0)
    return attribute_accuracy(prompts, decode_latents(world.vae, encode_latents(world.vae, clips)))


def evaluation_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` full prompts, cycling through colours, directions and backgrounds so every
    value appears about equally often."""
    scenes = synthetic.all_scenes()
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
    return [scenes[order[i % len(scenes)]].describe() for i in range(count)]


def prompt_accuracy(world: ToyWorld, prompts: list[str], seed: int = 0, steps: int = 25,
                    guidance: float = 7.5, batch: int = 16) -> tuple[dict[str, float], torch.Tensor]:
    """Share of samples whose measured attributes match their prompt, per attribute, and the
    samples themselves."""
    videos = torch.cat([sample_videos(world, prompts[i:i + batch], seed=seed + i, steps=steps, guidance=guidance)
                        for i in range(0, len(prompts), batch)])
    return attribute_accuracy(prompts, videos), videos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvader.toy.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(WEIGHTS_DIR), help="toy world folder (default: shipped)")
    parser.add_argument("--videos", type=int, default=48, help="prompts to sample (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5, help="(default: %(default)s)")
    parser.add_argument("--grid", default=None, help="write the first 12 samples as a PNG grid here")
    args = parser.parse_args(argv)
    world = load_toy_world(args.weights)
    start = time.time()
    mse = vae_reconstruction_mse(world)
    round_trip = vae_round_trip_accuracy(world)
    prompts = evaluation_prompts(args.videos, args.seed)
    accuracy, videos = prompt_accuracy(world, prompts, args.seed, args.steps, args.guidance)
    report = dict(vae_heldout_mse=round(mse, 5), vae_round_trip=round_trip, videos=len(prompts), steps=args.steps,
                  guidance=args.guidance, accuracy=accuracy, seconds=round(time.time() - start, 1))
    print(json.dumps(report, indent=1))
    if args.grid:
        save_grid(videos[:12], args.grid)
        for index, prompt in enumerate(prompts[:12]):
            print(f"row {index}: {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
