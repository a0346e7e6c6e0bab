"""``torch.compile(fullgraph=True)`` of models patched by ``fastvader.apply``: a tiny diffusers
UNet3DConditionModel (forward and input gradients) and a tiny AutoencoderKL decoder (forward)
compile with no graph break (fullgraph raises on one) and match the same patched model run
eagerly. The fused ops stay single graph nodes (torch custom ops) and their kernels run inside
the compiled code; on CPU that is the inductor C++ backend and the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import fastvader
from fastvader.kernels.ops import group_norm as gn_mod
from fastvader.kernels.ops import temporal_attention as ta_mod

diffusers = pytest.importorskip("diffusers")

# Compiling even a tiny UNet takes about a minute of CPU inductor.
pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts launches of the Triton forward kernels (none when the ops take the PyTorch path)."""
    counts = {"group_norm": 0, "temporal_attention": 0}

    def counting(name, launch):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return launch(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gn_mod, "_forward_launch", counting("group_norm", gn_mod._forward_launch))
    monkeypatch.setattr(ta_mod, "_launch_forward", counting("temporal_attention", ta_mod._launch_forward))
    return counts


def _compiled(model, backend="inductor"):
    torch._dynamo.reset()  # no cached graphs from other tests
    return torch.compile(model, fullgraph=True, backend=backend)


def test_patched_unet3d_compiles_whole_and_matches_eager(kernel_launches):
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(
        block_out_channels=(16,), down_block_types=("CrossAttnDownBlock3D",),
        up_block_types=("CrossAttnUpBlock3D",), layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4).to(DEVICE)
    unet.requires_grad_(False)
    report = fastvader.apply(unet)
    assert report.counts["temporal_attention"] > 0 and report.counts["group_norm"] > 0, report
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 3, 4, 4, generator=g).to(DEVICE).requires_grad_()
    text = torch.randn(1, 5, 16, generator=g).to(DEVICE).requires_grad_()
    weights = torch.randn(1, 4, 3, 4, 4, generator=g).to(DEVICE)

    def run(model):
        out = model(sample, 10, text).sample
        return (out.detach(), *torch.autograd.grad((out * weights).sum(), (sample, text)))

    eager = run(unet)
    eager_launches = dict(kernel_launches)
    # aot_eager: one whole graph through dynamo and AOT autograd (the custom ops' fake kernels and
    # registered backward), without inductor's CPU code generation, which takes two minutes on a
    # cold cache here; inductor lowers the same ops in the decoder test below
    compiled = run(_compiled(unet, backend="aot_eager"))
    for name, got, want in zip(("output", "d sample", "d text"), compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    if gn_mod.group_norm_backend(DEVICE) != "reference":
        # the compiled model ran the kernels as often as the eager one
        assert eager_launches["group_norm"] > 0 and eager_launches["temporal_attention"] > 0
        assert kernel_launches == {name: 2 * n for name, n in eager_launches.items()}
    fastvader.revert(unet)


def test_patched_vae_decoder_compiles_whole_and_matches_eager(kernel_launches):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4).to(DEVICE)
    report = fastvader.apply(vae)
    assert report.counts["group_norm"] > 0, report
    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        eager = vae.decoder(latents)
        eager_launches = kernel_launches["group_norm"]
        compiled = _compiled(vae.decoder)(latents)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    if gn_mod.group_norm_backend(DEVICE) != "reference":
        assert eager_launches > 0 and kernel_launches["group_norm"] == 2 * eager_launches
    fastvader.revert(vae)
