"""The CPU targets every new backbone meets on its tiny configuration (issue 17): a training step
changes only LoRA weights, resume continues exactly, a saved pipeline folder loads back strictly
(and a wrong one is refused naming the key), the loop's decode has the gradients of a plain
decode, and fastvader.apply / revert restore the models exactly."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from fastvader.backbones import build_backbone
from fastvader.backbones.diffusers_common import CheckpointMismatchError, MissingWeightsError
from fastvader.config import BackboneConfig, load_config
from tests.helpers.snapshot import assert_restored, model_state

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all small ops: a second intra-op thread only adds synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pytorch_kernel_paths(monkeypatch):
    """Under test is the patching: the ops take their PyTorch path (the Triton interpreter would
    compute the same, slowly; tests/kernels covers the kernels)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


_TINY: dict[str, object] = {}


def tiny_backbone(name: str):
    """A fresh tiny backbone (built once per family, then deep-copied)."""
    if name not in _TINY:
        _TINY[name] = build_backbone(BackboneConfig(name=name, random_init=True, dtype="fp32", options={"tiny": True}))
    return copy.deepcopy(_TINY[name])


def tiny_config(name: str, tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / f"tiny_{name}.yaml",
                       [f"train.output_dir={tmp_path}", "train.run_name=run", *overrides])


def _lora(trainer) -> dict[str, torch.Tensor]:
    """The LoRA weights by their names in the backbone."""
    return {n: p.detach().clone() for n, p in trainer.backbone.named_parameters() if "lora_" in n}


def check_step_changes_only_lora(name: str, tmp_path: Path) -> None:
    from fastvader.training.trainer import Trainer

    trainer = Trainer(tiny_config(name, tmp_path))
    base = {n: p.detach().clone() for n, p in trainer.backbone.named_parameters() if "lora_" not in n}
    lora = _lora(trainer)
    result = trainer.train_step().as_dict()
    assert torch.isfinite(torch.tensor(result["loss"])) and result["grad_norm"] > 0
    after = dict(trainer.backbone.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "a base weight changed"
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "no LoRA weight changed"
    assert {n for n, p in trainer.backbone.named_parameters() if p.requires_grad} == set(lora)
    frozen = [e for e in (trainer.backbone.text_encoder, trainer.backbone.image_encoder) if e is not None]
    assert all(not p.requires_grad and p.grad is None for e in frozen for p in e.parameters())
    trainer.close()


def check_resume_continues_exactly(name: str, tmp_path: Path) -> None:
    from fastvader.training.trainer import Trainer

    common = ["sampler.truncation=rand", "validation.save_videos=false"]
    straight = Trainer(tiny_config(name, tmp_path / "a", "train.steps=4", *common))
    straight.fit()
    first = Trainer(tiny_config(name, tmp_path / "b", "train.steps=2", "train.checkpoint_every=2", *common))
    first.fit()
    resumed = Trainer(tiny_config(name, tmp_path / "b", "train.steps=4", *common), resume=tmp_path / "b" / "run")
    assert resumed.step == 2
    resumed.fit()
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_strict_round_trip(backbone, name: str, tmp_path: Path, encode: Callable) -> None:
    """save_pretrained -> the pipeline folder loads back with equal weights and conditioning; a
    key missing from a checkpoint, or its weights gone, is refused naming it."""
    from safetensors.torch import load_file, save_file

    backbone.save_pretrained(tmp_path)
    loaded = build_backbone(BackboneConfig(name=name, pretrained=str(tmp_path), dtype="fp32", options={"seed": 0}))
    parts = [(backbone.denoiser, loaded.denoiser), (backbone.vae, loaded.vae)]
    parts += [(a, b) for a, b in ((backbone.text_encoder, loaded.text_encoder),
                                  (backbone.image_encoder, loaded.image_encoder)) if a is not None]
    for a, b in parts:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for got, want in zip(encode(loaded), encode(backbone)):
        torch.testing.assert_close(got, want)
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text()) == backbone.scheduler_config

    weights = tmp_path / backbone.denoiser_subfolder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights))
    with pytest.raises(CheckpointMismatchError, match="missing") as err:
        build_backbone(BackboneConfig(name=name, pretrained=str(tmp_path), dtype="fp32"))
    assert dropped in str(err.value)
    weights.unlink()
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors") as err:
        build_backbone(BackboneConfig(name=name, pretrained=str(tmp_path), dtype="fp32"))
    assert str(tmp_path / backbone.denoiser_subfolder) in str(err.value)


def check_decode_gradients(backbone, num_frames: int, frames: list[int], grad_frames: list[int], chunk: int) -> None:
    """The loop's decode (chunked, checkpointed; frames outside grad_frames without gradients) of
    random latents of a 32x32 video of ``num_frames`` frames against the plain decode of every
    frame: same pixels, same gradients through the grad frames."""
    latents = torch.randn(1, *backbone.latent_shape(num_frames, 32, 32), generator=torch.Generator().manual_seed(0))
    x = latents.clone().requires_grad_(True)
    ours = backbone.decode_frames(x, frames, grad_frames, chunk=chunk)
    weights = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1))
    pick = torch.tensor([f in grad_frames for f in frames], dtype=torch.float32).view(1, -1, 1, 1, 1)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    y = latents.clone().requires_grad_(True)
    plain = backbone.decode_latents(y, frames)
    (grad_plain,) = torch.autograd.grad((plain * weights * pick).sum(), y)
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-5, atol=1e-5)
    assert grad_plain.abs().sum() > 0
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-4, atol=1e-6)


def _same_or_fresh_cache(now, before) -> bool:
    """The same object, or an equal list of plain values: the per-call caches diffusers' causal
    VAEs reset on every decode (Wan's ``_conv_idx``, ``_feat_map``)."""
    if now is before:
        return True
    plain = type(now) is list and type(before) is list and not any(isinstance(v, torch.Tensor) for v in now + before)
    return plain and now == before


def check_apply_revert(backbone, emb, num_frames: int, timestep: float, expect: dict[str, dict[str, int]]):
    """fastvader.apply on the denoiser and the VAE patches ``expect`` ({part: {op: sites}}), the
    patched models compute what they computed (a no-grad denoise of a 32x32 video of
    ``num_frames`` frames with the conditioning ``emb``, and its decode), and revert leaves them
    exactly as found."""
    import fastvader

    x = torch.randn(1, *backbone.latent_shape(num_frames, 32, 32), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return backbone.denoise(x, torch.tensor(timestep), emb.cond, **emb.extra), backbone.decode_latents(x)

    snapshot, want = model_state(backbone), run()
    reports = {"denoiser": fastvader.apply(backbone.denoiser), "vae": fastvader.apply(backbone.vae)}
    for part, counts in expect.items():
        for op, sites in counts.items():
            assert reports[part].counts[op] == sites, (part, op, reports[part].counts)
    for got, ref in zip(run(), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert fastvader.revert(backbone.denoiser) == reports["denoiser"].total
    assert fastvader.revert(backbone.vae) == reports["vae"].total
    assert_restored(backbone, snapshot, same=_same_or_fresh_cache)
    assert all(torch.equal(got, ref) for got, ref in zip(run(), want))
