""""Did it learn?" signals and the startup self-check."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.trust import metrics, single_thread, tiny_config  # noqa: E402,F401
import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402

import fastvader.memory.checkpointing as checkpointing  # noqa: E402
from fastvader.patching import core as patching  # noqa: E402
from fastvader.training import trainer as train_loop  # noqa: E402
from fastvader.memory import offload as offload_module  # noqa: E402
from fastvader.monitoring.selfcheck import SelfCheckError  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402


def test_learn_signals_are_logged_every_step_and_summarised(tmp_path):
    summary = train(tiny_config(tmp_path, name="learns", optim={"lr": 1e-2}, train={"steps": 3}))
    rows = metrics(tmp_path / "learns")
    assert len(rows) == 3
    for key in ("lora_norm", "lora_change", "lora_delta", "grad_norm", "reward_change"):
        assert all(key in row for row in rows), key
    # the standard init has B = 0: the adapters add nothing until the first update
    assert rows[0]["lora_delta"] > 0 and rows[-1]["lora_change"] > rows[0]["lora_change"] > 0
    learn = summary["learn"]
    assert learn["warnings"] == []
    assert learn["lora_change"] == pytest.approx(rows[-1]["lora_change"])
    assert learn["mean_grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in rows) / 3)
    saved = json.loads((tmp_path / "learns" / "summary.json").read_text())
    assert saved["learn"]["steps_observed"] == 3 and saved["status"] == "completed"
    assert saved["self_check"]["gradient_reaches_lora"] is True


def _detach_latents(trainer):
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda *a, **k: sample(*a, **k).detach()  # the bug under test


def test_a_detached_latent_is_flagged(tmp_path):
    cfg = tiny_config(tmp_path, name="detached", optim={"lr": 1e-2}, train={"steps": 3},
                      guards={"require_gradient": False})
    trainer = Trainer(cfg)
    _detach_latents(trainer)
    with pytest.warns(UserWarning, match="did-it-learn"):
        summary = trainer.fit()
    trainer.close()
    warnings = " | ".join(summary["learn"]["warnings"])
    assert "gradient norm near zero" in warnings and "detached latent" in warnings
    assert "LoRA weights barely moved" in warnings
    assert summary["learn"]["lora_change"] == 0.0 and summary["self_check"]["gradient_reaches_lora"] is False

    # by default the startup self-check already refuses such a run at step 1
    trainer = Trainer(tiny_config(tmp_path, name="detached2"))
    _detach_latents(trainer)
    with pytest.raises(SelfCheckError, match="no gradient reached the LoRA"):
        trainer.train_step()
    trainer.close()


def test_self_check_confirms_checkpointing_engaged(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    report = trainer.selfcheck.report
    assert report["checkpointing"]["wrapped"] > 0
    assert report["checkpointing"]["hit"] == report["checkpointing"]["wrapped"]
    trainer.close()


def test_a_checkpointing_policy_that_matches_nothing_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "SUB_BLOCK_TYPES", ())  # a family whose block names the policy lacks
    trainer = Trainer(tiny_config(tmp_path))
    with pytest.raises(SelfCheckError, match="sub_block' wrapped no module"):
        trainer.train_step()
    trainer.close()


def test_checkpoint_wrappers_that_never_run_are_caught(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.checkpoint_wrappers.revert()  # e.g. other code took the wrappers off after set-up
    with pytest.raises(SelfCheckError, match="none ran checkpointed"):
        trainer.train_step()
    trainer.close()


def test_offload_that_never_engages_is_caught(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, memory={"offload_activations": True})
    trainer = Trainer(cfg)
    trainer.train_step()  # on a CPU run offload has nothing to move: reported, not an error
    assert "not applicable" in trainer.selfcheck.report["offload_activations"]
    trainer.close()

    trainer = Trainer(cfg)  # as on a GPU whose offload hooks never fire
    trainer.selfcheck.offload_devices = ("cpu",)
    with pytest.raises(SelfCheckError, match="offload_activations=true but no activation was offloaded"):
        trainer.train_step()
    trainer.close()

    # the real offloader, pointed at CPU tensors, reports what it moved: the check passes
    def cpu_offload_wrapper(checkpointing, offload, stats):
        def wrap(fn):
            def offloaded(x, t):
                with offload_module.ActivationOffloader(("cpu",), min_bytes=0, stats=stats):
                    return fn(x, t)
            return offloaded
        return wrap
    monkeypatch.setattr(train_loop, "grad_step_wrapper", cpu_offload_wrapper)
    trainer = Trainer(cfg)
    trainer.selfcheck.offload_devices = ("cpu",)
    trainer.train_step()
    assert trainer.selfcheck.report["offload_activations"] > 0
    trainer.close()


def _swap_norms(model: nn.Module, patches: patching.Patches, add_unused: bool) -> None:
    """A fake kernel patch: replaces each ResnetBlock2D's norm1 with an equal GroupNorm subclass
    (a real swap that runs), or, with ``add_unused``, installs the kernel module under a name the
    block's forward never calls (the bug the self-check exists for)."""
    class FusedNorm(nn.GroupNorm):
        pass

    for block in [m for m in model.modules() if type(m).__name__ == "ResnetBlock2D"]:
        old = block.norm1
        new = FusedNorm(old.num_groups, old.num_channels, old.eps)
        new.load_state_dict(old.state_dict())
        patches.replace(patching.ChildModule(block, "fused_norm1" if add_unused else "norm1"), new)


@pytest.mark.parametrize("unused", [False, True])
def test_self_check_verifies_patched_kernels_ran(tmp_path, monkeypatch, unused):
    fake = patching.Patch("fake_norm", lambda model, patches: _swap_norms(model, patches, unused))
    monkeypatch.setattr(patching, "PATCHES", {**patching.PATCHES, "fake_norm": fake})
    trainer = Trainer(tiny_config(tmp_path, kernels={"enabled": "on", "ops": ["fake_norm"]}))
    assert trainer.kernel_report["denoiser"].counts["fake_norm"] > 0
    if unused:
        with pytest.raises(SelfCheckError, match="patched by fastvader.apply never ran"):
            trainer.train_step()
    else:
        trainer.train_step()
        report = trainer.selfcheck.report
        # every swapped denoiser norm ran; in the VAE only the decoder's did (the encoder is unused)
        assert report["kernels_denoiser"]["ran"] == report["kernels_denoiser"]["changed_modules"] > 0
        assert 0 < report["kernels_vae"]["ran"] < report["kernels_vae"]["changed_modules"]
    trainer.close()
    assert not patching.is_patched(trainer.backbone.denoiser) and not patching.is_patched(trainer.backbone.vae)
