"""--resume: the README's plain form, a chosen checkpoint, a damaged latest checkpoint, and one
history across invocations (tiny toy runs, in-process). Bit-exact resume after SIGKILL and after a
kill mid-save: tests/training/test_trainer.py."""
from __future__ import annotations

import shutil

from tests.helpers.runs import folder_state, steps_logged, summary
from tests.helpers.trust import single_thread, tiny_config  # noqa: F401
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fastvader.cli import main  # noqa: E402
from fastvader.io import checkpoint as ckpt  # noqa: E402
from fastvader.training.run_folder import SUPERSEDED_DIR  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402

#: held-out rounds every step, and early stopping that never triggers: the rounds must survive resumes
WATCHED = {"validation": {"every": 1}, "safeguards": {"early_stop_patience": 100}}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A finished three-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("three")
    train(tiny_config(out, name="r", train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 0}, **WATCHED))
    return out / "r"


@pytest.fixture()
def run(three_steps, tmp_path):
    shutil.copytree(three_steps, tmp_path / "r")
    return tmp_path / "r"


def _checkpoint(run, step):
    return run / "checkpoints" / f"step_{step:07d}"


def _assert_same_lora(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_the_readme_form_continues_with_the_runs_own_config_and_one_history(run):
    first = summary(run)
    assert main(["train", "--resume", str(run), "--set", "train.steps=5"]) == 0
    second = summary(run)
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    assert [i["status"] for i in second["invocations"]] == ["completed", "completed"]
    assert [(i["start_step"], i["end_step"]) for i in second["invocations"]] == [(0, 3), (3, 5)]
    assert second["invocations"][1]["config_changes"] == {"train.steps": [3, 5]}
    assert second["wall_time_s"] == pytest.approx(sum(i["wall_time_s"] for i in second["invocations"]), abs=0.02)
    assert second["wall_time_s"] > first["wall_time_s"]
    assert all(i["self_check"]["gradient_reaches_lora"] for i in second["invocations"])  # each invocation's check
    assert second["reward_before"] == first["reward_before"]
    assert [r["step"] for r in second["safeguards"]["rounds"]] == [0, 1, 2, 3, 4]  # before, then every step


def test_resume_from_a_chosen_checkpoint_continues_there_and_sets_the_newer_ones_aside(run):
    assert main(["train", "--resume", str(_checkpoint(run, 1))]) == 0
    [aside] = (run / SUPERSEDED_DIR).iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_0000002", "step_0000003"]
    assert steps_logged(aside) == [2, 3]  # their log lines, with them
    assert steps_logged(run) == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001", "step_0000002", "step_0000003"]
    # the same steps again from the same state: the same weights, exactly
    _assert_same_lora(_checkpoint(run, 3) / "lora.safetensors", aside / "step_0000003" / "lora.safetensors")
    assert summary(run)["invocations"][1]["resumed_from"] == str(_checkpoint(run, 1))


def _empty_state(path):
    (path / "state.pt").write_bytes(b"")


def _nan_lora(path):
    lora = load_file(str(path / "lora.safetensors"))
    first = next(iter(lora))
    lora[first][0] = float("nan")
    save_file(lora, str(path / "lora.safetensors"))


@pytest.mark.parametrize("damage, reason", [(_empty_state, "state.pt is empty"), (_nan_lora, "holds NaN/Inf")],
                         ids=["empty_state", "nan_lora"])
def test_a_damaged_latest_checkpoint_is_skipped_naming_why_and_the_run_redoes_its_step(run, damage, reason):
    final_lora = run / "lora.safetensors"  # the uninterrupted run's weights after step 3
    shutil.copy(final_lora, run.parent / "reference.safetensors")
    damage(_checkpoint(run, 3))
    with pytest.warns(UserWarning, match=f"skipped checkpoint step_0000003: .*{reason}"):
        resumed = Trainer(tiny_config(run.parent, name="r", train={"steps": 3, "checkpoint_every": 1,
                                                                   "keep_checkpoints": 0}, **WATCHED), resume=run)
    assert resumed.step == 2
    resumed.fit()
    resumed.close()
    assert ckpt.newest_intact_checkpoint(run).step == 3  # a fresh step 3; the damaged one is set aside
    [aside] = (run / SUPERSEDED_DIR).iterdir()
    assert (aside / "step_0000003").is_dir()
    _assert_same_lora(final_lora, run.parent / "reference.safetensors")


def test_a_named_damaged_checkpoint_and_a_finished_run_are_refused_untouched(run, capsys):
    _empty_state(_checkpoint(run, 2))
    before = folder_state(run)
    assert main(["train", "--resume", str(_checkpoint(run, 2))]) == 2  # named: no fallback to another one
    assert main(["train", "--resume", str(run)]) == 2  # at train.steps already
    assert main(["train", "--resume", str(run / "checkpoints" / "step_0000042")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {_checkpoint(run, 2) / 'state.pt'} is empty" in err
    assert f"{run} is at step 3 and train.steps=3: nothing is left to train; to go on, raise it" in err
    assert "no such checkpoint (the run's checkpoints: ['step_0000001', 'step_0000002', 'step_0000003'])" in err
    assert folder_state(run) == before


def test_checkpoints_by_time_as_well_as_by_steps(tmp_path):
    """train.checkpoint_minutes: a checkpoint whenever that much time passed since the last one
    (here a few microseconds: after every step), with checkpoint_every off."""
    train(tiny_config(tmp_path, train={"steps": 2, "checkpoint_every": 0, "checkpoint_minutes": 1e-7,
                                       "keep_checkpoints": 0}))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_0000001", "step_0000002"]
    train(tiny_config(tmp_path, name="neither", train={"steps": 2, "checkpoint_every": 0, "checkpoint_minutes": 0,
                                                         "keep_checkpoints": 0}))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "neither")] == ["step_0000002"]  # the end's only
