"""Reward-hacking safeguards: held-out scoring with a second reward, early stopping, the
base-model regulariser, sample grids per validation round."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.trust import metrics, single_thread, tiny_config  # noqa: E402,F401
import imageio.v3 as iio  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.rewards.base import Reward  # noqa: E402
from fastvader.rewards.toy import BrightnessReward  # noqa: E402
from fastvader.lora import adapters_disabled  # noqa: E402
from fastvader.monitoring.safeguards import EarlyStopper  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402


def test_early_stopping_on_a_synthetic_heldout_curve():
    stopper = EarlyStopper(patience=2)
    curve = [0.10, 0.20, 0.25, 0.24, 0.23, 0.30]
    decisions = [stopper.update(step, r) for step, r in enumerate(curve)]
    assert decisions[:4] == [None] * 4
    assert decisions[4] is not None and "not risen for 2 round(s)" in decisions[4]
    assert decisions[5] == decisions[4] and "best 0.25" in decisions[4]  # the decision sticks

    # rises smaller than min_delta do not count as rising
    stopper = EarlyStopper(patience=2, min_delta=0.05)
    assert [stopper.update(s, r) is None for s, r in enumerate([0.1, 0.12, 0.14])] == [True, True, False]

    # the second reward falling more than the allowed drop stops even while the reward rises
    stopper = EarlyStopper(patience=0, max_second_drop=0.2)
    rounds = [(0.1, 1.0), (0.2, 0.85), (0.3, 0.75)]
    out = [stopper.update(s, r, second) for s, (r, second) in enumerate(rounds)]
    assert out[:2] == [None, None] and "second reward fell from 1 to 0.75" in out[2]


class FallingReward(Reward):
    """A synthetic second reward: 1.0, 0.95, 0.8, ... on successive validation rounds."""

    name = "falling_test_reward"
    weightless = True
    values = [1.0, 0.95, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]

    def __init__(self):
        super().__init__()
        self.round = 0

    def score_videos(self, videos, prompts):
        value = self.values[self.round]
        self.round += 1
        return videos.new_full((videos.shape[0],), value)


def test_the_second_reward_falling_stops_the_run_early(tmp_path):
    cfg = tiny_config(tmp_path, name="hacked", train={"steps": 6}, validation={"every": 1},
                      safeguards={"second_reward": "brightness", "second_reward_max_drop": 0.1})
    trainer = Trainer(cfg)
    trainer.safeguards.second_reward = FallingReward()
    summary = trainer.fit()
    trainer.close()
    assert summary["status"] == "stopped_early" and summary["steps"] == 2
    assert "second reward fell from 1 to 0.8" in summary["safeguards"]["stop_reason"]
    assert [r["second_reward"] for r in summary["safeguards"]["rounds"]] == pytest.approx([1.0, 0.95, 0.8])
    run = tmp_path / "hacked"
    assert len(metrics(run)) == 2 and (run / "lora.safetensors").is_file()
    # one grid per validation round: first, middle and last frame side by side
    for tag in ("before", "step1", "step2", "after"):
        grid = iio.imread(run / "samples" / f"{tag}_grid.png")
        # one prompt x one seed = one row of 3 frames (16 px upscaled to 96) under the frame-index
        # header (19 px), beside the prompt-and-seed label
        assert grid.shape[0] == 19 + 96 + 4 and grid.shape[1] - 3 * (96 + 4) > 40, (tag, grid.shape)


def test_heldout_rounds_score_the_second_reward_on_the_validation_videos(tmp_path):
    cfg = tiny_config(tmp_path, safeguards={"second_reward": "brightness"})
    trainer = Trainer(cfg)
    result = trainer.validate("probe")
    videos = trainer.sample_videos(trainer.val_prompts, seed=0)
    expected = BrightnessReward()(videos, trainer.val_prompts).mean().item()
    assert result["second_reward"] == pytest.approx(expected, rel=1e-6)
    assert result["reward"] != pytest.approx(result["second_reward"])  # a different reward
    assert Path(result["grid"]).is_file()
    trainer.close()


def lora_effect(trainer) -> float:
    """Mean |denoiser output with the LoRA - without it| on a fixed input."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, *trainer.latent_shape, generator=g)
    t = torch.tensor([500, 900])
    ctx = trainer.prompt_cache(["a red ball", "a blue cube"]).cond
    with torch.no_grad():
        tuned = trainer.backbone.denoise(x, t, ctx)
        with adapters_disabled(trainer.backbone.denoiser):
            base = trainer.backbone.denoise(x, t, ctx)
    return float((tuned - base).abs().mean())


def test_the_regulariser_lowers_the_loras_effect_at_a_fixed_step_count(tmp_path):
    effects, penalties = {}, {}
    for weight in (0.0, 1e4):
        extra = {"regularizer": "denoiser", "regularizer_weight": weight} if weight else {}
        trainer = Trainer(tiny_config(tmp_path, optim={"lr": 3e-3}, safeguards=extra))
        for _ in range(4):
            result = trainer.train_step()
        effects[weight], penalties[weight] = lora_effect(trainer), result.signals.get("reg_penalty")
        trainer.close()
    assert effects[0.0] > 0
    assert effects[1e4] < 0.5 * effects[0.0], effects
    assert penalties[0.0] is None and penalties[1e4] > 0


def test_a_second_reward_that_needs_the_base_models_video_is_refused_in_one_line(tmp_path):
    from fastvader.config import ConfigError
    from fastvader.monitoring.safeguards import Safeguards

    cfg = tiny_config(tmp_path, safeguards={"second_reward": "object_recolor",
                                            "second_reward_options": {"anchor": "base"}})
    with pytest.raises(ConfigError, match="safeguards.second_reward: object_recolor as configured scores a change"):
        Safeguards(cfg, [], [], torch.device("cpu"))
    cfg = tiny_config(tmp_path, safeguards={"second_reward": "object_recolor"})
    assert not Safeguards(cfg, [], [], torch.device("cpu")).second_reward.needs_reference
