"""Numerical guards: NaN/Inf steps are skipped, a run stuck on them stops, NaN weights are never
written, fp16 on a bf16-native family is refused unless forced."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.trust import ScriptedReward, lora_snapshot, metrics, single_thread, tiny_config  # noqa: F401
import pytest  # noqa: E402
import torch  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from fastvader.backbones import _REGISTRY
from fastvader.backbones.toy import ToyBackbone
from fastvader.config import ConfigError, load_config
from fastvader.monitoring.guards import NonFiniteError, NumericalGuard, check_finite_state
from fastvader.training.trainer import Trainer, train


def test_nan_reward_skips_the_step_and_leaves_the_lora_unchanged(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, optim={"lr": 1e-2}), reward=ScriptedReward(nan_calls={0}))
    before = lora_snapshot(trainer)
    ticks = trainer.lr_scheduler.last_epoch

    bad = trainer.train_step()
    assert bad.skipped and bad.signals["skip_reason"] == "non-finite loss or reward"
    assert all(torch.equal(a, b) for a, b in zip(before, lora_snapshot(trainer)))
    assert trainer.lr_scheduler.last_epoch == ticks, "a skipped step must not tick the scheduler"
    assert not trainer.optimizer.state, "a skipped step must not touch the optimizer"
    assert all(p.grad is None for p in trainer.lora_params)
    assert trainer.guard.consecutive == 1

    good = trainer.train_step()  # the same trainer, a finite reward: it does update
    assert not good.skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_snapshot(trainer)))
    assert trainer.lr_scheduler.last_epoch == ticks + 1
    assert trainer.guard.consecutive == 0 and trainer.guard.summary()["skipped_steps"] == 1
    trainer.close()


class NanGradReward(ScriptedReward):
    """Finite value, NaN gradient: the reward's backward poisons the pixels' gradient."""

    def score_videos(self, videos, prompts):
        if videos.requires_grad:
            videos.register_hook(lambda g: g * float("nan"))
        return videos.mean(dim=(1, 2, 3, 4))


def test_nan_gradient_norm_skips_the_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), reward=NanGradReward())
    before = lora_snapshot(trainer)
    result = trainer.train_step()
    assert result.skipped and result.signals["skip_reason"] == "non-finite gradient norm"
    assert result.reward == result.reward  # the value itself was finite
    assert all(torch.equal(a, b) for a, b in zip(before, lora_snapshot(trainer)))
    assert trainer.lr_scheduler.last_epoch == 0
    trainer.close()


def test_consecutive_bad_steps_stop_the_run_and_nothing_is_written(tmp_path):
    cfg = tiny_config(tmp_path, name="stuck", train={"steps": 5, "checkpoint_every": 1},
                      guards={"max_bad_steps": 2})
    with pytest.raises(NonFiniteError) as err, pytest.warns(UserWarning, match="every step was skipped"):
        train(cfg, reward=ScriptedReward(always_nan=True))
    message = str(err.value)
    assert "2 training steps in a row" in message
    for advice in ("optim.lr", "guidance_scale", "precision"):
        assert advice in message
    run = tmp_path / "stuck"
    assert [m["skipped"] for m in metrics(run)] == [True, True]
    assert not (run / "lora.safetensors").exists()
    for saved in run.rglob("*.safetensors"):  # checkpoints of skipped steps hold the untouched LoRA
        assert all(torch.isfinite(t).all() for t in load_file(str(saved)).values()), saved
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "NonFiniteError" in summary["error"]
    assert summary["guards"]["bad_steps"] == 2


def test_weights_holding_nan_are_never_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, name="poisoned"))
    good = trainer.save_lora()
    good_bytes = good.read_bytes()
    with torch.no_grad():
        trainer.lora_params[3][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write the LoRA file"):
        trainer.save_lora()
    assert good.read_bytes() == good_bytes, "the previous good file must survive"
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
        trainer.save_checkpoint()
    assert not (tmp_path / "poisoned" / "checkpoints").exists()
    trainer.close()


def test_check_finite_state_searches_optimizer_state():
    state = {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}, "param_groups": [{"lr": 1e-3}]}
    with pytest.raises(NonFiniteError, match=r"optimizer\.state\.0\.exp_avg"):
        check_finite_state({"optimizer": state}, "a checkpoint")
    check_finite_state({"optimizer": {"state": {0: {"step": torch.tensor(3)}}}}, "a checkpoint")


class FakeWan(ToyBackbone):
    family = "wan"


def test_fp16_on_a_bf16_family_is_refused_unless_forced(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "fake_wan", f"{__name__}:FakeWan")
    base = ["backbone.name=fake_wan", "prompts.items=[a cat]"]
    with pytest.raises(ConfigError, match="ships in bf16.*guards.allow_fp16=true"):
        load_config(None, base + ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="backbone.dtype=fp16"):
        load_config(None, base + ["backbone.dtype=fp16"])
    with pytest.warns(UserWarning, match="forced by guards.allow_fp16"):
        load_config(None, base + ["train.precision=fp16", "guards.allow_fp16=true"])
    load_config(None, base + ["train.precision=bf16"])  # bf16 is what it ships in: fine
    load_config(None, ["prompts.items=[a cat]", "train.precision=fp16"])  # the toy family: fine


def test_fp16_overflows_count_only_once_the_scale_is_exhausted():
    """Under fp16 the GradScaler's own overflow skips are routine until the scale drops below 1."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
    guard = NumericalGuard(max_bad_steps=2, precision="fp16")
    for expected_bad in (0, 0, 1, 2):  # scale 4 -> 2 -> 1 -> 0.5 -> 0.25
        scaler.scale(p.sum()).backward()
        p.grad[0] = float("inf")  # an overflow in the scaled gradient
        scaler.unscale_(opt)
        reason = guard.classify(True, False, scaler)
        assert reason == "fp16 gradient overflow"
        scaler.update()
        guard.record(reason, scaler)
        assert guard.bad_steps == expected_bad
        opt.zero_grad()
    with pytest.raises(NonFiniteError, match="train.precision=bf16 or fp32"):
        guard.raise_if_stuck(step=4)
    assert guard.summary()["fp16_overflow_steps"] == 4


@pytest.mark.parametrize("overrides, needle", [
    (["guards.max_bad_steps=0"], "guards.max_bad_steps=0"),
    (["safeguards.regularizer=frames"], "choose one of ['none', 'denoiser']"),
    (["safeguards.regularizer=denoiser"], "set a weight > 0"),
    (["safeguards.second_reward=nope"], "safeguards.second_reward='nope'"),
    (["safeguards.early_stop_patience=2"], "set validation.every > 0"),
    (["safeguards.second_reward_max_drop=0.1", "validation.every=1"], "needs safeguards.second_reward"),
    (["logging.wandb_mode=sometimes"], "logging.wandb_mode"),
])
def test_trust_config_errors_name_the_field_and_the_fix(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prompts.items=[a cat]", *overrides])
    assert needle in str(err.value)
