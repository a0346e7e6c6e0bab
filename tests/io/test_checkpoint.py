"""Checkpoint files on their own (tiny tensors, no model): retention per run, ``latest`` always
complete, verification with fallback, stale temporaries, a full or unwritable disk."""
import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

from fastvader.io import checkpoint as ckpt


def _write(run, step, value=1.0, keep=0):
    lora = {"unet.a.lora_A.weight": torch.full((2, 3), value)}
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.full((3,), value)}}}}
    return ckpt.save_checkpoint(run, step, lora, state, keep=keep, config_yaml="train: {steps: 9}\n")


def _names(run):
    return [p.name for p in ckpt.list_checkpoints(run)]


def test_retention_keeps_this_runs_newest_and_latest_names_the_one_just_written(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, keep=2)
    assert _names(tmp_path) == ["step_0000002", "step_0000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"
    # a stray newer checkpoint (another lineage) never makes retention delete the one just written
    shutil.copytree(tmp_path / "checkpoints" / "step_0000003", tmp_path / "checkpoints" / "step_0000009")
    _write(tmp_path, 4, keep=2)
    assert _names(tmp_path) == ["step_0000003", "step_0000004", "step_0000009"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000004"
    loaded = ckpt.newest_intact_checkpoint(tmp_path)
    assert loaded.step == 4 and loaded.config_yaml == "train: {steps: 9}\n"


Damage = namedtuple("Damage", "file how reason")
DAMAGES = [
    Damage("state.pt", lambda f: f.write_bytes(b""), "is empty"),
    Damage("state.pt", lambda f: f.write_bytes(f.read_bytes()[:100]), "is unreadable"),
    Damage("lora.safetensors", lambda f: f.write_bytes(f.read_bytes()[:20]), "is unreadable"),
    Damage("lora.safetensors", lambda f: f.unlink(), "missing ['lora.safetensors']"),
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: f"{d.file}-{d.reason.split()[-1]}")
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    _write(tmp_path, 1, value=1.0)
    bad = _write(tmp_path, 2, value=2.0)
    damage.how(bad / damage.file)
    with pytest.warns(UserWarning, match=f"skipped checkpoint step_0000002: .*{damage.reason.replace('[', '.').replace(']', '.')}"):
        loaded = ckpt.newest_intact_checkpoint(tmp_path)
    assert loaded.path.name == "step_0000001" and loaded.step == 1
    assert float(loaded.lora["unet.a.lora_A.weight"][0, 0]) == 1.0
    with pytest.raises(ckpt.CheckpointError, match=damage.reason.replace("[", r"\[").replace("]", r"\]")):
        ckpt.load_checkpoint(bad)  # a checkpoint named on its own is never replaced by another


def test_nan_in_a_checkpoint_is_named_and_skipped(tmp_path):
    _write(tmp_path, 1)
    poisoned = _write(tmp_path, 2)
    state = torch.load(poisoned / "state.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"][1] = float("nan")
    torch.save(state, poisoned / "state.pt")
    with pytest.warns(UserWarning, match=r"state.pt holds NaN/Inf in state.pt.state.0.exp_avg"):
        assert ckpt.newest_intact_checkpoint(tmp_path).step == 1
    from safetensors.torch import save_file

    save_file({"unet.a.lora_A.weight": torch.tensor([[float("inf")]])}, str(poisoned / "lora.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="lora.safetensors holds NaN/Inf in lora.safetensors.unet.a"):
        ckpt.load_checkpoint(poisoned)


def test_no_intact_checkpoint_lists_every_reason(tmp_path):
    for step in (1, 2):
        (_write(tmp_path, step) / "state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000007")  # names a folder that is gone
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError) as err:
        ckpt.newest_intact_checkpoint(tmp_path)
    message = str(err.value)
    assert "latest names step_0000007, which does not exist" in message
    assert message.count("is empty") == 2
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint under"):
        ckpt.newest_intact_checkpoint(tmp_path / "elsewhere")


def test_a_step_that_does_not_match_its_folder_is_refused(tmp_path):
    path = _write(tmp_path, 3)
    os.replace(path, tmp_path / "checkpoints" / "step_0000005")
    with pytest.raises(ckpt.CheckpointError, match="says step 3, its folder step 5"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000005")


def test_stale_temporaries_are_removed_and_a_half_replaced_checkpoint_is_restored(tmp_path):
    good = _write(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / ".step_0000002.tmp").mkdir()  # a save killed while writing
    (root / ".step_0000002.tmp" / "state.pt").write_bytes(b"partial")
    (tmp_path / ".summary.json.tmp-4242").write_text("{")
    os.replace(good, root / ".step_0000001.old-4242")  # killed between the two renames of a replace
    done = ckpt.remove_stale_temporaries(tmp_path)
    assert len(done) == 3 and any("restored" in line for line in done)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
    assert not list(tmp_path.glob(".*tmp*"))
    assert ckpt.newest_intact_checkpoint(tmp_path).step == 1


def _fill_disk(monkeypatch, exc):
    def failing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise exc
    monkeypatch.setattr(ckpt.torch, "save", failing_save)


def test_a_full_disk_is_one_error_naming_the_path_and_bytes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    previous = _write(tmp_path, 1)
    _fill_disk(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ckpt.StorageError) as err:
        _write(tmp_path, 2)
    message = str(err.value)
    needed = ckpt.state_bytes([{"w": torch.zeros(2, 3)}, {"o": torch.zeros(3)}, "train: {steps: 9}\n"])
    assert str(tmp_path / "checkpoints") in message and "no space left on the device" in message
    assert f"it needs about {needed:,} bytes" in message and "previous checkpoint (if any) is intact" in message
    assert _names(tmp_path) == ["step_0000001"] and ckpt.newest_intact_checkpoint(tmp_path).path == previous
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no half-written staging folder


def test_torchs_unexpected_pos_on_a_full_disk_reads_as_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer drops the errno ('[enforce fail at inline_container.cc:672] unexpected
    pos'); with the disk full afterwards, that is the error the user sees."""
    _write(tmp_path, 1)
    _fill_disk(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    monkeypatch.setattr(ckpt, "check_free_space", lambda *a: None)  # the disk fills during the write
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10, 10))
    with pytest.raises(ckpt.StorageError, match=r"no space left on the device; it needs about .* 10 bytes"):
        _write(tmp_path, 2)
    assert _names(tmp_path) == ["step_0000001"]


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5, 5))
    with pytest.raises(ckpt.StorageError, match=r"checkpoint step 1 to .*checkpoints: it needs about .* only 5 bytes"):
        _write(tmp_path, 1)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_an_unwritable_folder_is_one_error_and_other_errors_pass_through(tmp_path, monkeypatch):
    _fill_disk(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(ckpt.StorageError, match="permission denied; .* make it writable or set train.output_dir"):
        _write(tmp_path, 1)
    _fill_disk(monkeypatch, RuntimeError("a bug, not the disk"))
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        _write(tmp_path, 1)
