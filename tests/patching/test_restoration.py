"""A model handed to fastvader comes back as it was found: the trainer's patches (kernels,
checkpoint wrappers, self-check hooks) come off at close(), and fastvader.apply / revert and the
checkpoint wrappers undo exactly whatever the order."""
from __future__ import annotations

from tests.helpers.trust import single_thread, tiny_config  # noqa: F401  (first: fixes sys.path)
from tests.helpers.snapshot import assert_restored, model_state

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

import fastvader  # noqa: E402
from fastvader.backbones import build_backbone  # noqa: E402
from fastvader.memory.checkpointing import enable_checkpointing  # noqa: E402
from fastvader.patching import is_patched  # noqa: E402
from fastvader.patching.checkpoint import CheckpointedForward  # noqa: E402
from fastvader.patching.group_norm import _fused_resnet_forward  # noqa: E402
from fastvader.patching.temporal_attention import TemporalAttentionProcessor  # noqa: E402
from fastvader.training.trainer import Trainer  # noqa: E402


@pytest.fixture(autouse=True)
def pytorch_kernel_paths(monkeypatch):
    """What is under test is the patching; the ops take their PyTorch path (the Triton
    interpreter would compute the same, slowly)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _inputs(backbone, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *backbone.latent_shape(3, 16, 16), generator=g).requires_grad_(requires_grad)
    text = torch.randn(1, backbone.world.max_length, backbone.world.text_dim, generator=g)
    return latents, torch.tensor([500]), text


def _outputs(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    latents, t, text = _inputs(backbone)
    with torch.no_grad():
        return backbone.denoise(latents, t, text), backbone.vae.decode(latents[:, :, 0]).sample


def _same_or_lora_around(now, before) -> bool:
    """The trainer's LoRA stays: a peft layer may stand where the original module stood, wrapping it."""
    return now is before or (isinstance(now, BaseTunerLayer) and now.get_base_layer() is before)


def _lora_layers(model) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_a_closed_trainer_leaves_a_passed_in_backbone_as_it_found_it(tmp_path):
    cfg = tiny_config(tmp_path, kernels={"enabled": "on"}, memory={"checkpointing": "sub_block"})
    backbone = build_backbone(cfg.backbone)
    snapshot, want = model_state(backbone), _outputs(backbone)

    trainer = Trainer(cfg, backbone=backbone)
    assert trainer.kernel_report["denoiser"].total > 0 and trainer.kernel_report["vae"].total > 0
    for _ in range(2):
        trainer.train_step()
    assert trainer.selfcheck.report["checkpointing"]["hit"] > 0  # the wrappers were on the fused blocks
    trainer.close()

    assert not is_patched(backbone.denoiser) and not is_patched(backbone.vae)
    # The trained adapters stay in the denoiser (Trainer.close says so): peft layers around the
    # original modules, and peft's config on the denoiser, set aside while the rest is compared.
    lora = _lora_layers(backbone.denoiser)
    assert lora and list(backbone.denoiser.peft_config) == ["default"]
    peft_config = backbone.denoiser.__dict__.pop("peft_config")
    # same module objects at the same paths, same instance dicts (forwards, processors, hooks)
    assert_restored(backbone, snapshot, same=_same_or_lora_around)
    backbone.denoiser.peft_config = peft_config
    for layer in lora:
        layer.enable_adapters(False)
    got = _outputs(backbone)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for layer in lora:
        layer.enable_adapters(True)
    assert not torch.equal(_outputs(backbone)[0], want[0])  # ... and they hold what was learned

    report = fastvader.apply(backbone.denoiser)  # the model is no longer marked as patched
    assert report.counts["group_norm"] > 0 and report.counts["temporal_attention"] > 0
    assert fastvader.revert(backbone.denoiser) == report.total
    trainer.close()  # a second close changes nothing
    backbone.denoiser.__dict__.pop("peft_config")
    assert_restored(backbone, snapshot, same=_same_or_lora_around)


def test_a_trainer_closed_before_any_step_takes_the_self_check_hooks_off(tmp_path):
    cfg = tiny_config(tmp_path, kernels={"enabled": "on"})
    backbone = build_backbone(cfg.backbone)
    trainer = Trainer(cfg, backbone=backbone)
    assert any(m._forward_hooks for m in backbone.modules())  # the self-check watches the patched modules
    trainer.close()
    assert not any(m._forward_hooks for m in backbone.modules())


def _grad_call(unet, backbone) -> torch.Tensor:
    latents, t, text = _inputs(backbone, requires_grad=True)
    out = unet(latents, t, encoder_hidden_states=text).sample
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("checkpoint_first", [False, True], ids=["apply_then_checkpoint", "checkpoint_then_apply"])
@pytest.mark.parametrize("undo_checkpoint_first", [True, False], ids=["close_then_revert", "revert_then_close"])
def test_kernels_and_checkpoint_wrappers_undo_exactly_in_any_order(tmp_path, checkpoint_first, undo_checkpoint_first):
    backbone = build_backbone(tiny_config(tmp_path).backbone)
    unet = backbone.denoiser
    snapshot, want = model_state(unet), _outputs(backbone)[0]
    wrappers = enable_checkpointing(unet, "sub_block") if checkpoint_first else None
    report = fastvader.apply(unet)
    wrappers = wrappers or enable_checkpointing(unet, "sub_block")
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    # whichever came first, each resnet runs its fused forward inside its checkpoint wrapper
    assert blocks and report.counts["group_norm"] > 0 and report.counts["group_norm_conv"] == 0
    for block in blocks:
        assert isinstance(block.forward, CheckpointedForward)
        assert block.forward.below().__func__ is _fused_resnet_forward
    torch.testing.assert_close(_grad_call(unet, backbone), want)
    assert all(h > 0 for h in wrappers.hits())

    if undo_checkpoint_first:  # Trainer.close, then fastvader.revert: the kernels stay until reverted
        wrappers.revert()
        assert all(block.forward.__func__ is _fused_resnet_forward for block in blocks)
        assert any(isinstance(m.processor, TemporalAttentionProcessor) for m in unet.modules() if hasattr(m, "processor"))
        fastvader.revert(unet)
    else:  # fastvader.revert, then Trainer.close: the wrappers stay and now run the class forward
        fastvader.revert(unet)
        assert all(block.forward.below().__func__ is ResnetBlock2D.forward for block in blocks)
        hits = wrappers.hits()
        torch.testing.assert_close(_grad_call(unet, backbone), want)
        assert all(h > h0 for h, h0 in zip(wrappers.hits(), hits))
        wrappers.revert()
    assert_restored(unet, snapshot)
    assert torch.equal(_outputs(backbone)[0], want)
