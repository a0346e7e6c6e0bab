"""The demo's before/after measures (fastvader.toy.quality): fidelity and the alignment report,
on hand-built videos whose answers are known."""
import json

import pytest
import torch

from fastvader.toy import world as synthetic
from fastvader.toy.quality import alignment_report, fidelity

BLUE_SQUARE = synthetic.Scene("blue", "square", "right", "gray")


def _video(color=synthetic.COLORS["blue"], start=(10.0, 16.0)):
    return synthetic.render(BLUE_SQUARE, start, 2.0, 5.0, color, 0.5)


def test_fidelity_is_perfect_for_a_recoloured_object_and_drops_for_halos_moves_and_tints():
    before = _video()
    recoloured = _video(color=(0.95, 0.1, 0.1))
    assert fidelity(before, recoloured) == {"shape_iou": 1.0, "background_change": 0.0}
    spotted = recoloured.clone()
    spotted[..., 2:6, 2:6] = 0.9  # a 4x4 spot in a corner: 16 extra pixels a frame against ~100
    kept = fidelity(before, spotted)
    assert 0.8 < kept["shape_iou"] < 0.9 and kept["background_change"] == 0.0
    moved = fidelity(before, _video(start=(15.0, 16.0)))  # 5 px to the right of a 10 px square
    assert 0.3 < moved["shape_iou"] < 0.45
    tinted = before + 0.04 * (~synthetic.foreground_mask(before)).unsqueeze(1)
    assert abs(fidelity(before, tinted)["background_change"] - 0.04) < 1e-4


def test_alignment_report_counts_improved_prompts_and_averages_over_seeds():
    prompts = ["a blue square moving right on a gray background", "a white square moving right on a gray background"]
    before = torch.stack([_video(), _video(color=synthetic.COLORS["white"])])[None].repeat(2, 1, 1, 1, 1, 1)
    after = before.clone()
    after[:, 0] = _video(color=(0.95, 0.1, 0.1))
    rewards_before = torch.tensor([[-0.5, -0.6], [-0.5, -0.6]])
    rewards_after = torch.tensor([[-0.1, -0.7], [-0.2, -0.6]])
    report = alignment_report(prompts, before, after, rewards_before, rewards_after)
    first = report["per_prompt"][prompts[0]]
    assert abs(first["reward_after"] - (-0.15)) < 1e-6 and first["colour_after"] == ["red", "red"]
    assert first["colour_before"] == ["blue", "blue"] and first["shape_iou"] == 1.0
    overall = report["overall"]
    assert overall["prompts_improved"] == 1 and overall["prompts"] == 2  # -0.65 vs -0.6 did not improve
    assert overall["shape_as_prompted_before"] == overall["shape_as_prompted_after"] == 1.0


def test_quality_run_compares_a_finished_run_and_only_adds_alignment_json(tmp_path):
    """`python -m fastvader.toy.quality --run RUN` on a finished run: the base and aligned videos
    of its validation prompts, written to RUN/alignment.json; nothing else in the folder changes
    (the run folder belongs to its run: no Trainer may claim it)."""
    from fastvader.config import load_config
    from fastvader.toy.quality import main
    from fastvader.training.trainer import train
    from tests.helpers.disk import tree_state

    cfg = load_config(None, ["backbone.random_init=true", "video.frames=3", "video.height=16", "video.width=16",
                             "sampler.steps=3", "sampler.truncation=x0:1-2", "train.steps=2", "train.progress=false",
                             "prompts.items=[a red square moving left]", "validation.prompts=[a green circle moving up]",
                             "validation.save_videos=false", "logging.tensorboard=false", "optim.lr=0.05",
                             "reward.name=object_recolor", "reward.options.object_recolor.anchor=base",
                             f"train.output_dir={tmp_path}", "train.run_name=run"])
    train(cfg)
    run = tmp_path / "run"
    before = tree_state(run)
    assert main(["--run", str(run)]) == 0
    after = tree_state(run)
    assert set(after) - set(before) == {"alignment.json"} and {k: after[k] for k in before} == before
    report = json.loads((run / "alignment.json").read_text())
    row = report["per_prompt"]["a green circle moving up"]
    # the aligned videos are the run's LoRA's, not the base model's again
    assert abs(row["reward_after"] - row["reward_before"]) > 1e-4, row
    assert report["overall"]["prompts"] == 1 and 0.0 <= row["shape_iou"] <= 1.0
