"""Ctrl-C and SIGTERM: the step in progress finishes, then a checkpoint, the LoRA and summary.json
(status "interrupted") are written and the command exits 130; a second signal quits at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers.runs import steps_logged, summary
from tests.helpers.trust import single_thread, tiny_config  # noqa: F401
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastvader.config import load_config  # noqa: E402
from fastvader.io import checkpoint as ckpt  # noqa: E402
from fastvader.training.interrupt import RunInterrupted  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402

#: no checkpoint but the one the interrupt writes; far more steps than the test waits for
UNTIL_STOPPED = {"steps": 1000, "checkpoint_every": 0, "checkpoint_minutes": 0}


def _lora_steps(run) -> int:
    with safe_open(str(run / "lora.safetensors"), framework="pt") as f:
        return int(f.metadata()["fastvader.steps"])


def _assert_saved_as_interrupted(run, steps: int) -> None:
    """What an interrupted run leaves: its steps logged, a checkpoint, the LoRA and the summary of them."""
    assert steps_logged(run) == list(range(1, steps + 1))
    assert (run / "checkpoints" / "latest").read_text() == f"step_{steps:07d}"
    assert ckpt.newest_intact_checkpoint(run).step == steps
    assert _lora_steps(run) == steps
    saved = summary(run)
    assert saved["status"] == "interrupted" and saved["steps"] == steps and "reward_after" not in saved
    assert saved["invocations"][-1]["status"] == "interrupted" and saved["invocations"][-1]["end_step"] == steps
    assert not list(run.rglob(".*tmp*"))


def _stop_during_step(trainer, step: int, *signals: int) -> None:
    """Raise ``signals`` in this process while step ``step`` computes its reward."""
    compute = trainer.forward_reward

    def forward_reward(*args, **kwargs):
        if trainer.step == step - 1:
            for s in signals:
                signal.raise_signal(s)
        return compute(*args, **kwargs)
    trainer.forward_reward = forward_reward


def test_a_signal_mid_step_finishes_that_step_then_saves_everything(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train=UNTIL_STOPPED))
    handler = signal.getsignal(signal.SIGINT)
    _stop_during_step(trainer, 2, signal.SIGINT)
    with pytest.raises(RunInterrupted, match=rf"SIGINT: stopped after step 2; saved .*step_0000002.* Continue with: "
                                             rf"fastvader train --resume {tmp_path / 'run'}") as stopped:
        trainer.fit()
    trainer.close()
    assert stopped.value.summary["status"] == "interrupted"
    _assert_saved_as_interrupted(tmp_path / "run", steps=2)
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_second_signal_quits_at_once_keeping_the_last_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train={**UNTIL_STOPPED, "checkpoint_every": 1}))
    handler = signal.getsignal(signal.SIGINT)
    _stop_during_step(trainer, 2, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT: quit at once") as stopped:
        trainer.fit()
    trainer.close()
    assert not isinstance(stopped.value, RunInterrupted)
    run = tmp_path / "run"
    assert steps_logged(run) == [1]  # step 2 was abandoned
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001"]
    assert ckpt.newest_intact_checkpoint(run).step == 1
    assert not (run / "summary.json").exists() and not list(run.rglob(".*tmp*"))
    assert signal.getsignal(signal.SIGINT) is handler


TINY_YAML = """
backbone: {{random_init: true}}
video: {{frames: 3, height: 16, width: 16, fps: 4}}
sampler: {{steps: 2, guidance_scale: 1.0}}
frames: {{reward: all}}
lora: {{rank: 4, alpha: 4.0}}
optim: {{lr: 1.0e-3}}
prompts: {{items: [a red ball, a blue cube]}}
validation: {{prompts: [a green tree], seeds: [0], save_videos: false}}
train: {{steps: 1000, checkpoint_every: 0, checkpoint_minutes: 0, device: cpu, cpu_threads: 1, progress: false,
        output_dir: {out}, run_name: run}}
logging: {{tensorboard: false}}
"""


def _interrupted_cli_run(tmp_path, sig: int):
    """`fastvader train` in a subprocess, sent ``sig`` once it has logged two steps."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(out=tmp_path / "runs"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.Popen([sys.executable, "-m", "fastvader.cli", "train", "--config", str(config)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run logged no second step in 5 minutes"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err, config


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signalled_fastvader_train_saves_exits_130_and_resumes_as_if_never_stopped(tmp_path, sig):
    code, err, config = _interrupted_cli_run(tmp_path, sig)
    assert code == 130, err[-2000:]
    run = tmp_path / "runs" / "run"
    steps = summary(run)["steps"]
    assert steps >= 2 and f"{signal.Signals(sig).name}: stopped after step {steps}" in err
    assert "Traceback" not in err
    _assert_saved_as_interrupted(run, steps)

    more = [f"train.steps={steps + 2}"]
    resumed = train(load_config(run / "config.yaml", more), resume=run)
    straight = train(load_config(config, more + ["train.run_name=straight"]))
    assert resumed["status"] == "completed" and steps_logged(run) == list(range(1, steps + 3))
    assert [i["status"] for i in resumed["invocations"]] == ["interrupted", "completed"]
    a, b = load_file(str(run / "lora.safetensors")), load_file(str(tmp_path / "runs" / "straight" / "lora.safetensors"))
    for key in a:  # the first steps ran in another process: equal to rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-8)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps + 2
