"""DeepSpeed ZeRO through the Trainer's accelerator, in one gloo process on the CPU: ZeRO-2 trains
like plain AdamW; a ZeRO-2 run resumed from its checkpoint continues exactly like an uninterrupted
one; the checkpoint holds the optimizer state after ``prepare`` (the partition's fp32 master
weights and Adam moments) as tensors and plain values. DeepSpeed's shared-memory CPU op is never
built (fastvader.memory.zero): these tests need no compiler."""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.lora import lora_state_dict  # noqa: E402
from fastvader.memory.tiny import tiny_toy_config  # noqa: E402

torch.set_num_threads(1)


def _config(out, stage, **sections):
    # the startup self-check reads p.grad, which DeepSpeed keeps in its own partitioned buffers:
    # it would report "no gradient" under ZeRO, so it is off for every run compared here
    sections.setdefault("optim", {"lr": 0.05, "eps": 1.0, "max_grad_norm": 0.0})
    return tiny_toy_config(out, memory={"zero_stage": stage}, guards={"self_check": False}, **sections)


def _flat_lora(trainer):
    return torch.cat([v.flatten() for v in lora_state_dict(trainer.backbone.denoiser).values()])


@pytest.mark.slow
def test_zero2_trains_like_plain_adamw(tmp_path):
    """memory.zero_stage=2 reaches the same LoRA weights as the plain AdamW path after two steps."""
    from fastvader.training.trainer import Trainer

    moved = {}
    for stage in (0, 2):
        trainer = Trainer(_config(tmp_path / f"zero{stage}", stage, train={"steps": 2}))
        init = _flat_lora(trainer)
        for _ in range(2):
            trainer.train_step()
        moved[stage] = _flat_lora(trainer) - init
        trainer.close()
    assert moved[0].abs().max() > 1e-5
    torch.testing.assert_close(moved[2], moved[0], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_zero2_resume_continues_exactly(tmp_path):
    from fastvader.io import checkpoint as ckpt
    from fastvader.training.trainer import Trainer

    common = {"optim": {"lr": 1e-3, "max_grad_norm": 1.0}, "sampler": {"steps": 3, "truncation": "rand"}}
    straight = Trainer(_config(tmp_path / "a", 2, train={"steps": 4}, **common))
    start = _flat_lora(straight)
    straight.fit()
    straight.close()

    first = Trainer(_config(tmp_path / "b", 2, train={"steps": 2, "checkpoint_every": 2}, **common))
    first.fit()
    after_two = _flat_lora(first)
    first.close()
    saved = ckpt.latest_checkpoint(first.run_dir)
    _, state = ckpt.load_checkpoint(saved)
    assert "optimizer" not in state  # the optimizer state is each rank's own ...
    [shard] = ckpt.load_rank_states(saved)  # ... read back with weights_only=True
    # ... and it is the one after prepare: the partition's fp32 master weights, which DeepSpeed
    # updates and copies into the LoRA, and the Adam moments of two updates
    torch.testing.assert_close(torch.cat([t.flatten() for t in shard["single_partition_of_fp32_groups"]]).sort()[0],
                               after_two.sort()[0], rtol=0, atol=0)
    assert int(shard["base_optimizer_state"]["state"][0]["step"]) == 2
    assert shard["base_optimizer_state"]["state"][0]["exp_avg_sq"].abs().sum() > 0

    resumed = Trainer(_config(tmp_path / "b", 2, train={"steps": 4}, **common), resume=first.run_dir)
    assert resumed.step == 2
    resumed.fit()
    final = _flat_lora(resumed)
    resumed.close()
    assert (final - start).abs().max() > 1e-5
    torch.testing.assert_close(final, _flat_lora(straight), rtol=0, atol=0)


def test_bitsandbytes_with_zero_is_refused(tmp_path):
    from fastvader.config import ConfigError

    with pytest.raises(ConfigError, match="bitsandbytes optimizer cannot run under DeepSpeed ZeRO"):
        tiny_toy_config(tmp_path, optim={"name": "adamw8bit"}, memory={"zero_stage": 2, "zero_offload": "optimizer"})
    with pytest.raises(ConfigError, match="needs memory.zero_stage=3"):
        tiny_toy_config(tmp_path, memory={"zero_stage": 2, "zero_offload": "optimizer+params"})
    with pytest.raises(ConfigError, match="offload is a ZeRO feature"):
        tiny_toy_config(tmp_path, memory={"zero_offload": "optimizer"})
    assert tiny_toy_config(tmp_path, optim={"name": "adamw8bit"}).optim.name == "adamw8bit"  # alone it is fine


def test_zero3_is_refused_by_name(tmp_path):
    from fastvader.config import ConfigError
    from fastvader.training.trainer import Trainer

    with pytest.raises(ConfigError, match="memory.zero_stage=3 is not supported yet.*use memory.zero_stage=2"):
        Trainer(_config(tmp_path, 3))


@pytest.mark.parametrize("launched_since", [False, True])
def test_single_process_variables_are_forgotten_unless_a_launcher_set_its_own(monkeypatch, launched_since):
    """A Trainer without ZeRO drops the launcher variables a single-process ZeRO Trainer set; a
    child process started by torchrun inherits the marker, and keeps torchrun's variables."""
    from fastvader.memory import zero

    monkeypatch.setenv(zero._SINGLE_PROCESS, "41000")
    monkeypatch.setenv("MASTER_PORT", "29500" if launched_since else "41000")
    monkeypatch.setenv("RANK", "1" if launched_since else "0")
    monkeypatch.setenv("WORLD_SIZE", "2" if launched_since else "1")
    zero.forget_single_process_env()
    assert zero._SINGLE_PROCESS not in os.environ
    kept = {key: os.environ.get(key) for key in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    expected = {"MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2"} if launched_since else dict.fromkeys(kept)
    assert kept == expected
