"""A run folder belongs to one run: what is refused, what --overwrite and --resume do to it, and
that every refusal leaves the folder exactly as it was (tiny toy runs, in-process)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.helpers.runs import folder_state, steps_logged, summary
from tests.helpers.trust import single_thread, tiny_config  # noqa: F401
import pytest  # noqa: E402

from fastvader.cli import main  # noqa: E402
from fastvader.config import load_config  # noqa: E402
from fastvader.io import checkpoint as ckpt  # noqa: E402
from fastvader.training.run_folder import FolderLock, RunFolderError  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-step run with its checkpoint; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished")
    train(tiny_config(out, name="done", train={"steps": 1}))
    return out / "done"


@pytest.fixture()
def run(finished, tmp_path):
    copy = tmp_path / "done"
    shutil.copytree(finished, copy)
    return copy


def test_a_new_run_into_a_run_folder_is_refused_with_what_to_do(run):
    before = folder_state(run)
    with pytest.raises(RunFolderError) as err:
        Trainer(tiny_config(run.parent, name="done", train={"steps": 3}))
    message = str(err.value)
    assert f"{run} already holds a run (status completed at step 1, 1 checkpoint(s))" in message
    assert f"--resume {run}" in message and "--overwrite" in message and "another train.run_name" in message
    assert folder_state(run) == before


def test_config_errors_are_found_before_the_folder_is_touched(run, capsys):
    """The issue's failure: a new run over a finished one emptied its metrics, then failed."""
    before = folder_state(run)
    bad = [["--set", "frames.reward=list:0,1", "--set", "frames.grad=list:2"],  # grad outside the reward's frames
           ["--set", "video.height=18"],  # a size the toy model cannot take
           ["--set", "frames.reward=random:1", "--set", "frames.grad=random:2"]]
    for extra in bad:
        assert main(["train", "--config", str(run / "config.yaml"), "--set", "train.run_name=fresh", *extra]) == 2
        assert main(["train", "--resume", str(run), "--set", "train.steps=3", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("frames.grad='list:2' is invalid: frames [2] are not among the frames the reward sees") == 2
    assert err.count("video.height=18 does not fit toy: it must be a multiple of 4") == 2
    assert err.count("frames.grad='random:2' is invalid: it asks for 2 frames, but frames.reward='random:1'") == 2
    assert folder_state(run) == before and not (run.parent / "fresh").exists()


def test_overwrite_empties_the_folder_first_but_only_once_the_new_run_is_built(run):
    (run / "notes.txt").write_text("mine")
    shutil.copytree(run / "checkpoints" / "step_0000001", run / "checkpoints" / "step_0000009")
    before = folder_state(run)
    broken = tiny_config(run.parent, name="done", backbone={"random_init": False, "pretrained": str(run / "nope")})
    with pytest.raises(Exception, match="nope"):  # the new run fails while it is built: nothing moved
        train(broken, overwrite=True)
    assert folder_state(run) == before

    new = train(tiny_config(run.parent, name="done", train={"steps": 2, "checkpoint_every": 1}), overwrite=True)
    assert new["status"] == "completed" and len(new["invocations"]) == 1
    assert not (run / "notes.txt").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001", "step_0000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    assert steps_logged(run) == [1, 2]


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(RunFolderError, match=r"holds \['cat.jpg'\] and no fastvader run .*only clears run folders"):
        Trainer(tiny_config(tmp_path, name="photos"), overwrite=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    with pytest.raises(RunFolderError, match="give only one of them"):
        Trainer(tiny_config(tmp_path, name="photos"), overwrite=True, resume=other)


def test_resuming_a_renamed_copy_writes_only_into_the_copy(run, capsys):
    """--resume DIR continues the run in DIR, from DIR's own config.yaml (the README's form),
    whatever train.output_dir/run_name that config names."""
    original = folder_state(run)
    copy = run.parent / "moved" / "renamed copy"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy), "--set", "train.steps=2"]) == 0
    assert folder_state(run) == original
    resumed = summary(copy)
    assert resumed["run"] == str(copy) and resumed["steps"] == 2
    assert steps_logged(copy) == [1, 2]
    saved = (copy / "config.yaml").read_text()
    assert "run_name: renamed copy" in saved and f"output_dir: {copy.parent}" in saved


@pytest.mark.parametrize("override, named", [
    ("lora.rank=8", "lora.rank: 4 -> 8"),
    ("video.height=32", "video.height: 16 -> 32"),
    ("backbone.options={seed: 3}", "backbone.options: {} -> {'seed': 3}"),
    ("lora.target_modules=[to_q]", "lora.target_modules: [] -> ['to_q']"),
])
def test_resume_refuses_a_changed_model_or_shape_naming_the_field(run, override, named):
    before = folder_state(run)
    cfg = load_config(run / "config.yaml", ["train.steps=2", override])
    with pytest.raises(RunFolderError, match=f"cannot resume {re.escape(str(run))} with a changed {re.escape(named)}:"):
        Trainer(cfg, resume=run)
    assert folder_state(run) == before


def test_resume_allows_other_changes_with_a_warning_and_records_them(run):
    cfg = load_config(run / "config.yaml", ["train.steps=2", "optim.lr=5e-4", "sampler.guidance_scale=2.0",
                                            "train.checkpoint_every=7"])  # recorded, not warned about
    with pytest.warns(UserWarning, match=r"changed settings \(sampler.guidance_scale: 1.0 -> 2.0; optim.lr: 0.001 -> "
                                         r"0.0005\)"):
        resumed = train(cfg, resume=run)
    changes = resumed["invocations"][-1]["config_changes"]
    assert changes == {"optim.lr": [1e-3, 5e-4], "sampler.guidance_scale": [1.0, 2.0], "train.steps": [1, 2],
                       "train.checkpoint_every": [100, 7]}
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
    assert "lr: 0.001" in (run / "checkpoints" / "step_0000001" / "config.yaml").read_text()


def test_a_folder_in_use_is_refused(run):
    holder = FolderLock(run)
    holder.acquire()
    try:
        with pytest.raises(RunFolderError, match=r"is in use by another fastvader process \(pid \d+\)"):
            Trainer(tiny_config(run.parent, name="done", train={"steps": 2}), resume=run)
    finally:
        holder.release()


def test_an_unwritable_or_impossible_output_dir_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import os

    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="a_file is a file; set train.output_dir to a folder"):
        Trainer(tiny_config(tmp_path / "a_file" / "runs"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # the tests run as root, who may write anywhere
    with pytest.raises(RunFolderError, match=f"cannot write to {tmp_path}: permission denied"):
        Trainer(tiny_config(tmp_path / "new_runs"))
    assert not (tmp_path / "new_runs").exists()


def test_stale_temporaries_of_a_killed_save_are_removed_when_the_run_resumes(run, capsys):
    (run / "checkpoints" / ".step_0000002.tmp").mkdir()
    (run / "checkpoints" / ".step_0000002.tmp" / "state.pt").write_bytes(b"partial")
    (run / ".metrics.jsonl.tmp-99999").write_text("half")
    train(tiny_config(run.parent, name="done", train={"steps": 2}), resume=run)
    assert not list(run.rglob("*.tmp*"))
    assert "removed" in capsys.readouterr().out


def test_a_full_disk_stops_the_run_with_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    save, calls = ckpt.torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(ckpt.StorageError, match=f"cannot write {tmp_path / 'run' / 'checkpoints'}: no space left on "
                                                "the device; it needs about .* bytes"):
        train(tiny_config(tmp_path, train={"steps": 3, "checkpoint_every": 1}))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000001"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001"]
    assert ckpt.newest_intact_checkpoint(run).step == 1 and not list(run.rglob(".*tmp*"))
    failed = summary(run)
    assert failed["status"] == "failed" and failed["error"].startswith("StorageError: cannot write")
    assert failed["invocations"][0]["status"] == "failed"


def test_a_second_claim_of_the_same_folder_clears_nothing(tmp_path):
    """fit() called twice on one Trainer: --overwrite empties the folder the first time only."""
    from fastvader.training.run_folder import RunFolder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("old run")
    folder = RunFolder(tmp_path / "run", overwrite=True)
    assert folder.claim() == [f"--overwrite: emptied {tmp_path / 'run'}"]
    (tmp_path / "run" / "metrics.jsonl").write_text("the first fit's log\n")
    folder.release()
    assert folder.claim() == [] and (tmp_path / "run" / "metrics.jsonl").is_file()
    folder.release()
