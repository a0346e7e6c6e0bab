"""How good is a trained toy world, and what did alignment do to it? Measures what
docs/toy_world.md and the README's demo section report.

    python -m fastvader.toy.quality [--weights DIR] [--videos N] [--grid FILE.png]
    python -m fastvader.toy.quality --run runs/demo     # the demo: before vs after alignment

- VAE: mean squared reconstruction error of held-out synthetic frames (pixels in [0, 1]), and
  the share of held-out videos whose round trip through the VAE still shows each attribute
  (the ceiling for any denoiser on its latents).
- Samples (DDIM 25 steps, guidance 7.5): for N prompts spread over the scenes, the share whose
  pixels show the prompt's colour, background, motion direction and shape, as measured by
  fastvader.toy.world.describe_video (the same measures score the generator at 100%).
- Alignment (``--run``): the validation prompts and seeds of a finished run sampled by the base
  model and by the aligned one from the same noise; per prompt the reward before and after and
  how much of the object and the background the aligned model kept (``fidelity``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


# -- alignment: what the aligned model kept ----------------------------------------------------
def fidelity(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """What alignment kept of one video (F, 3, H, W), against the base model's video from the same
    prompt and noise:

    - ``shape_iou``: intersection over union of the two foreground masks (pixels away from the
      frame's background colour, all frames). 1 is the same object in the same place; halos and
      spots grow the union, a shrinking or broken-up object shrinks the intersection.
    - ``background_change``: mean absolute change (largest over the channels) of the pixels that
      are background in both videos; 0 is an untouched background.
    """
    mask_before, mask_after = synthetic.foreground_mask(before), synthetic.foreground_mask(after)
    union = mask_before | mask_after
    if not union.any():  # nothing drawn before or after: nothing to lose
        return {"shape_iou": 1.0, "background_change": float((after - before).abs().amax(dim=-3).mean())}
    iou = float((mask_before & mask_after).sum()) / float(union.sum())
    change = (after - before).abs().amax(dim=-3)[~union]
    return {"shape_iou": iou, "background_change": float(change.mean()) if change.numel() else 0.0}


def alignment_report(prompts: list[str], before: torch.Tensor, after: torch.Tensor,
                     rewards_before: torch.Tensor, rewards_after: torch.Tensor) -> dict:
    """Per prompt and overall: the reward before and after, ``fidelity``, and the object's colour
    and shape as measured from the pixels. ``before``/``after``: videos (seeds, prompts, F, 3, H,
    W); ``rewards_*``: their scores (seeds, prompts)."""
    per_prompt = {}
    for index, prompt in enumerate(prompts):
        pair = before[:, index], after[:, index]
        kept = [fidelity(b, a) for b, a in zip(*pair)]
        named_shape = synthetic.parse_prompt(prompt)["shape"]
        per_prompt[prompt] = {
            "reward_before": float(rewards_before[:, index].mean()),
            "reward_after": float(rewards_after[:, index].mean()),
            "shape_iou": sum(k["shape_iou"] for k in kept) / len(kept),
            "background_change": sum(k["background_change"] for k in kept) / len(kept),
            "colour_before": [synthetic.dominant_color(v) for v in pair[0]],
            "colour_after": [synthetic.dominant_color(v) for v in pair[1]],
            "shape_as_prompted_before": sum(synthetic.shape_name(v) == named_shape for v in pair[0]) / len(kept),
            "shape_as_prompted_after": sum(synthetic.shape_name(v) == named_shape for v in pair[1]) / len(kept),
        }
    mean = lambda key: sum(p[key] for p in per_prompt.values()) / len(per_prompt)  # noqa: E731
    overall = {key: mean(key) for key in ("reward_before", "reward_after", "shape_iou", "background_change",
                                          "shape_as_prompted_before", "shape_as_prompted_after")}
    overall["prompts_improved"] = sum(p["reward_after"] > p["reward_before"] for p in per_prompt.values())
    overall["prompts"] = len(per_prompt)
    overall["min_shape_iou"] = min(p["shape_iou"] for p in per_prompt.values())
    return {"overall": overall, "per_prompt": per_prompt}


@torch.no_grad()
def compare_with_base(rollout, prompts: list[str], seeds: list[int]) -> dict:
    """``alignment_report`` for ``prompts`` and ``seeds``: the same noise sampled by a
    :class:`~fastvader.training.rollout.Rollout` (a Trainer's or a VideoPipeline's) with its
    LoRA switched off (the base model) and on."""
    with rollout.base_model():
        before = [rollout.sample_videos(prompts, seed) for seed in seeds]
    after = [rollout.sample_videos(prompts, seed) for seed in seeds]
    # a reward that scores a change (``needs_reference``) measures it against the base model's video
    reference = before if rollout.reward.needs_reference else [None] * len(before)
    scores = [torch.stack([rollout.reward(v, prompts, r) for v, r in zip(videos, reference)]).cpu()
              for videos in (before, after)]
    return alignment_report(prompts, torch.stack(before).cpu(), torch.stack(after).cpu(), *scores)


def compare_run(run_dir: str | Path) -> dict:
    """``compare_with_base`` for a finished run folder (its config.yaml and lora.safetensors) on
    its validation prompts and seeds; also written to ``run_dir/alignment.json``."""
    from fastvader.config import load_config
    from fastvader.inference import VideoPipeline
    from fastvader.io.checkpoint import write_json
    from fastvader.training.prompts import validation_prompts

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    # no Trainer: the run folder belongs to the finished run, and only alignment.json is added to it
    pipe = VideoPipeline(cfg, lora=run_dir / "lora.safetensors")
    report = compare_with_base(pipe.rollout, validation_prompts(cfg), list(cfg.validation.seeds))
    write_json(run_dir / "alignment.json", report)
    return report


def print_alignment(report: dict) -> None:
    """The report as a table a person reads."""
    print(f"{'validation prompt':50s} {'reward before -> after':>24s} {'shape IoU':>9s} {'bg change':>9s}  colour after")
    rows = list(report["per_prompt"].items()) + [("mean", report["overall"])]
    for prompt, row in rows:
        colours = ", ".join(str(c) for c in row.get("colour_after", []))
        print(f"{prompt:50s} {row['reward_before']:>11.3f} -> {row['reward_after']:<9.3f} "
              f"{row['shape_iou']:>9.2f} {row['background_change']:>9.3f}  {colours}")
    overall = report["overall"]
    print(f"{overall['prompts_improved']} of {overall['prompts']} prompts improved; "
          f"shape as prompted {overall['shape_as_prompted_before']:.2f} -> {overall['shape_as_prompted_after']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvader.toy.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(WEIGHTS_DIR), help="toy world folder (default: shipped)")
    parser.add_argument("--videos", type=int, default=48, help="prompts to sample (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5, help="(default: %(default)s)")
    parser.add_argument("--grid", default=None, help="write the first 12 samples as a PNG grid here")
    parser.add_argument("--run", default=None, help="a finished run folder: compare its LoRA with the base model "
                        "on its validation prompts (writes alignment.json there)")
    args = parser.parse_args(argv)
    if args.run:
        missing = [name for name in ("config.yaml", "lora.safetensors") if not (Path(args.run) / name).is_file()]
        if missing:
            print(f"fastvader: --run {args.run} has no {' or '.join(missing)}; give the folder of a finished "
                  "training run (runs/<name>)", file=sys.stderr)
            return 2
        print_alignment(compare_run(args.run))
        return 0
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
