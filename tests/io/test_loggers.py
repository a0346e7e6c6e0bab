"""Logging backends: TensorBoard gets the scalars, videos, grids and reward curve; W&B when asked
for; a backend that raises never stops training; metrics.jsonl stays the source of truth."""
from __future__ import annotations

import sys
import types
from pathlib import Path

from tests.helpers.trust import metrics, single_thread, tiny_config  # noqa: E402,F401
import pytest  # noqa: E402

from fastvader.io import loggers as logging_backends  # noqa: E402
from fastvader.training.trainer import train  # noqa: E402


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, name="tb", train={"steps": 3}, validation={"every": 2},
                      logging={"tensorboard": True}, safeguards={"second_reward": "brightness"})
    summary = train(cfg)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/reward", "train/loss", "train/grad_norm", "train/lora_norm", "train/lora_change",
                "train/reward_change", "heldout/reward", "heldout/second_reward"):
        assert tag in tags["scalars"], tag
    rows = metrics(tmp_path / "tb")
    logged = events.Scalars("train/reward")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([r["reward"] for r in rows], rel=1e-6)
    heldout = events.Scalars("heldout/reward")
    assert [e.step for e in heldout] == [0, 2, 3]  # before, the round at step 2, after
    assert heldout[-1].value == pytest.approx(summary["reward_after"], rel=1e-6)
    images = set(tags["images"])
    assert {"reward_curve", "samples/before_grid", "samples/after_grid", "videos/after/0"} <= images
    gif = events.Images("videos/after/0")[0]
    assert gif.encoded_image_string[:6] == b"GIF89a"


class RaisingBackend(logging_backends.LogBackend):
    name = "raising"

    def __init__(self):
        self.calls = 0

    def log_scalars(self, step, scalars):
        self.calls += 1
        raise ConnectionError("the logging service is down")


def test_a_raising_backend_does_not_stop_training(tmp_path, monkeypatch):
    raising = RaisingBackend()
    build = logging_backends.Loggers.from_config

    def with_raising(cfg, run_dir):
        loggers = build(cfg, run_dir)
        loggers.backends.insert(0, raising)
        return loggers
    monkeypatch.setattr(logging_backends.Loggers, "from_config", with_raising)
    cfg = tiny_config(tmp_path, name="flaky", train={"steps": 3}, logging={"tensorboard": True})
    with pytest.warns(UserWarning, match="logging backend raising switched off: log_scalars raised ConnectionError"):
        summary = train(cfg)
    assert raising.calls == 1, "a failed backend is switched off after its first error"
    assert summary["status"] == "completed" and len(metrics(tmp_path / "flaky")) == 3
    assert list((tmp_path / "flaky" / "tensorboard").glob("events.*")), "the healthy backend kept logging"


def test_wandb_asked_for_but_not_installed_only_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = tiny_config(tmp_path, name="nowandb", train={"steps": 1}, logging={"wandb": True})
    with pytest.warns(UserWarning, match="wandb is not installed"):
        summary = train(cfg)
    assert summary["status"] == "completed"


def test_wandb_gets_scalars_videos_and_the_reward_curve(tmp_path, monkeypatch):
    logged, calls = [], []

    class FakeRun:
        def log(self, data, step=None):
            logged.append((step, data))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    fake.Video = lambda data, fps, format: ("video", data.shape, fps, format)
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(tmp_path, name="wb", train={"steps": 2},
                      logging={"wandb": True, "wandb_project": "proj", "wandb_mode": "offline"})
    train(cfg)
    init = calls[0][1]
    assert init["project"] == "proj" and init["mode"] == "offline" and init["name"] == "wb"
    assert calls[-1] == "finish"
    keys = {k for _, data in logged for k in data}
    assert {"train/reward", "train/lora_delta", "heldout/reward", "reward_curve", "videos/after/0"} <= keys
    video = next(data["videos/after/0"] for _, data in logged if "videos/after/0" in data)
    assert video[0] == "video" and video[1] == (3, 3, 16, 16) and video[3] == "gif"


def refuse_constant(name: str):
    raise ValueError(f"bare {name} in a metrics line: not strict JSON")


def strict(text: str):
    import json

    return json.loads(text, parse_constant=refuse_constant)


def test_metrics_lines_are_strict_json_with_nonfinite_values_flagged():
    line = logging_backends.metrics_line({"step": 3, "reward": float("nan"), "loss": 1.5,
                                          "timings": {"sample": float("inf")}, "ok": True})
    assert line.endswith("\n") and "NaN" not in line and "Infinity" not in line
    assert strict(line) == {"step": 3, "reward": None, "loss": 1.5, "timings": {"sample": None}, "ok": True,
                            "nonfinite": ["reward", "timings.sample"]}
    assert "nonfinite" not in strict(logging_backends.metrics_line({"step": 1, "reward": 0.5}))


def test_a_run_with_a_nan_step_writes_strict_json(tmp_path):
    from tests.helpers.trust import ScriptedReward

    # reward call 0 is the "before" validation, call 1 the first training step
    train(tiny_config(tmp_path, name="nan", train={"steps": 2}), reward=ScriptedReward(nan_calls={1}))
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    rows = [strict(line) for line in lines]
    assert [r["skipped"] for r in rows] == [True, False]
    assert rows[0]["reward"] is None and "reward" in rows[0]["nonfinite"]
    assert "nonfinite" not in rows[1]
