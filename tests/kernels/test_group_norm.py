"""Fused GroupNorm(+SiLU): the Triton kernels (under TRITON_INTERPRET=1 without a GPU) against
a float64 reference, what forward keeps for backward, and the diffusers drop-in."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.kernels.modules import FusedGroupNormAct
from fastvader.kernels.ops import group_norm as gn_mod
from fastvader.kernels.ops.group_norm import group_norm, group_norm_triton
from fastvader.kernels.reference import group_norm_reference

needs_kernel = pytest.mark.skipif(gn_mod.group_norm_backend("cpu") == "reference" and not torch.cuda.is_available(),
                                  reason="needs triton (CUDA, or the interpreter via TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Pairwise cover of N {1,2} x C {32,96,128} x groups {8,32} x spatial {7x5, 16x16, 3x9x11} x
# {fp32, bf16} x {contiguous, channels_last}: every value of every axis, most pairs, few programs.
CASES = [
    (1, 32, 8, (7, 5), torch.float32, False, "silu"),
    (2, 32, 8, (16, 16), torch.bfloat16, True, "silu"),
    (2, 96, 8, (3, 9, 11), torch.float32, True, "silu"),
    (1, 96, 32, (7, 5), torch.bfloat16, False, None),
    (2, 128, 8, (16, 16), torch.float32, False, "silu"),
    (1, 128, 32, (3, 9, 11), torch.bfloat16, False, "silu"),
    (1, 96, 32, (16, 16), torch.float32, True, None),
    (1, 128, 8, (7, 5), torch.bfloat16, True, "silu"),
    (1, 32, 8, (3, 9, 11), torch.float32, False, None),
]


def _inputs(N, C, spatial, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((N, C) + spatial, generator=g) * 1.5 + 0.7).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = (torch.randn(C, generator=g) * 0.5 + 1.0)
    b = torch.randn(C, generator=g) * 0.3
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _against_float64(x, w, b, G, act, fn, tol):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = fn(x, G, w, b, 1e-5, act)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = group_norm_reference(x64, G, w64, b64, 1e-5, act)
    rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    for name, got, ref in (("y", y, y64), ("dx", gx, rx), ("dweight", gw, rw), ("dbias", gb, rb)):
        err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        assert err < tol, f"{name}: max error {err:.2e} relative to max |ref| (tolerance {tol:.0e})"
    return y, gx


@needs_kernel
@pytest.mark.parametrize("N,C,G,spatial,dtype,channels_last,act", CASES)
def test_kernel_matches_float64_reference(N, C, G, spatial, dtype, channels_last, act):
    x, w, b = _inputs(N, C, spatial, dtype, channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    y, gx = _against_float64(x, w, b, G, act, group_norm_triton, tol)
    assert y.stride() == x.stride() and gx.stride() == x.stride()  # memory format kept, no copy


@needs_kernel
@pytest.mark.parametrize("tile,split,C,G", [(128, 3, 32, 8), (64, 1, 128, 1)])
def test_looped_and_split_groups(tile, split, C, G):
    """Groups bigger than one tile: loops over channel and spatial blocks, and groups cut into
    slices whose partial sums are combined (the GPU path's configuration, at small scale)."""
    x, w, b = _inputs(1, C, (7, 5) if G == 1 else (16, 16), torch.float32, False)
    _against_float64(x, w, b, G, "silu",
                     lambda *a: group_norm_triton(*a, tile=tile, split=split), 2e-5)


@needs_kernel
def test_strided_views_without_copy():
    """The frame-major view diffusers' TemporalConvLayer feeds its norms, and the transposed
    (N, C, L) input of Attention.group_norm, are addressed in place."""
    base = torch.randn(1, 3, 32, 5, 4).to(DEVICE)  # (B, F, C, H, W) memory
    x = base.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) view
    w, b = torch.randn(32).to(DEVICE), torch.randn(32).to(DEVICE)
    y, gx = _against_float64(x, w, b, 8, "silu", group_norm_triton, 2e-5)
    assert y.stride() == x.stride()
    seq = torch.randn(2, 20, 32).to(DEVICE).transpose(1, 2)  # (N, C, L) with C contiguous
    _against_float64(seq, w, b, 8, None, group_norm_triton, 2e-5)


@needs_kernel
def test_without_affine_and_large_mean():
    """No weight/bias; inputs whose mean is 1000x their spread: the shifted sums keep the
    variance from cancelling, so the error stays within torch's own fp32 GroupNorm's."""
    x = (torch.randn(2, 32, 6, 6) * 0.01 + 10.0).to(DEVICE).requires_grad_(True)
    y = group_norm_triton(x, 8, None, None, 1e-6, "silu")
    x64 = x.detach().double().requires_grad_(True)
    ref = group_norm_reference(x64, 8, None, None, 1e-6, "silu")
    eager = F.silu(F.group_norm(x.detach(), 8, eps=1e-6))
    err, err_eager = ((t.double() - ref).abs().max().item() for t in (y, eager))
    assert err <= max(2 * err_eager, 1e-4), (err, err_eager)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (rx,) = torch.autograd.grad(ref.sum(), x64)
    assert (gx.double() - rx).abs().max() / rx.abs().max() < 1e-2


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_for_backward_is_input_plus_stats(dtype):
    N, C, G = 2, 64, 8
    x = torch.randn(N, C, 8, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    norm = nn.GroupNorm(G, C).to(DEVICE)
    fused_bytes, _ = _saved_bytes(lambda: group_norm_triton(x, G, norm.weight, norm.bias, 1e-5, "silu"))
    x_bytes = x.numel() * x.element_size()
    stats = 2 * N * G * 4  # fp32 mean and rstd
    params = 2 * C * 4  # weight and bias: parameters, already resident
    assert fused_bytes == x_bytes + stats + params
    # CUDA's native GroupNorm wants its parameters in the input's dtype (CPU accepts fp32 ones)
    eager_norm = norm if DEVICE == "cpu" else nn.GroupNorm(G, C).to(DEVICE, dtype)
    eager_bytes, _ = _saved_bytes(lambda: F.silu(F.group_norm(x, G, eager_norm.weight, eager_norm.bias)))
    # eager keeps x, its stats and weight for the norm, and the norm output for the SiLU:
    # a whole input-sized tensor more (the fused op's extra bias is a resident parameter)
    w_bytes = C * eager_norm.weight.element_size()
    if DEVICE == "cpu":
        assert eager_bytes == 2 * x_bytes + stats + w_bytes
    assert eager_bytes >= 2 * x_bytes + w_bytes  # on CUDA the stats may be kept in the input dtype


@pytest.mark.parametrize("N,C,G,spatial,dtype,channels_last,act", CASES)
def test_pytorch_path_matches_float64_reference(N, C, G, spatial, dtype, channels_last, act, monkeypatch):
    """Without Triton the op runs reference.group_norm_forward / group_norm_backward: the same
    outputs, strides and gradients (its backward is written out, not autograd's)."""
    monkeypatch.setattr(gn_mod, "group_norm_backend", lambda device: "reference")
    x, w, b = _inputs(N, C, spatial, dtype, channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    y, gx = _against_float64(x, w, b, G, act, group_norm, tol)
    assert y.stride() == x.stride() and gx.stride() == x.stride()


def test_pytorch_path_saves_input_plus_stats(monkeypatch):
    monkeypatch.setattr(gn_mod, "group_norm_backend", lambda device: "reference")
    x = torch.randn(2, 64, 8, 8, device=DEVICE, requires_grad=True)
    norm = nn.GroupNorm(8, 64).to(DEVICE)
    saved, _ = _saved_bytes(lambda: group_norm(x, 8, norm.weight, norm.bias, 1e-5, "silu"))
    assert saved == x.numel() * 4 + 2 * 2 * 8 * 4 + 2 * 64 * 4  # x, fp32 mean and rstd, weight and bias


def test_module_matches_groupnorm_silu_and_validates():
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 32)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    fused = FusedGroupNormAct.from_group_norm(norm, "silu")
    assert fused.weight is norm.weight and fused.bias is norm.bias
    x = torch.randn(1, 32, 5, 3).to(DEVICE)
    torch.testing.assert_close(fused.to(DEVICE)(x), F.silu(norm.to(DEVICE)(x)), rtol=1e-4, atol=1e-5)
    assert set(fused.state_dict()) == set(norm.state_dict())
    with pytest.raises(ValueError, match="divide"):
        group_norm(x, 5)
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, 8, activation="gelu")
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 8, weight=torch.ones(16))


# ------------------------------------------------------------------------------------------
# the diffusers drop-in
# ------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")


def _module_snapshot(model):
    return {name: (m, dict(m.__dict__).get("forward")) for name, m in model.named_modules()}


def _assert_restored(model, snapshot, state):
    now = _module_snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, (module, fwd) in snapshot.items():
        assert now[name][0] is module, name
        assert now[name][1] is fwd, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _lora(model, targets):
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(cfg, model)
    model.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _compare_patched(model, run, lora, expect_min):
    import fastvader

    torch.manual_seed(3)
    out_ref = run()
    g_ref = torch.autograd.grad(out_ref.pow(2).mean(), list(lora.values()))
    snapshot = _module_snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fastvader.apply(model, ops=["group_norm"])
    assert report.counts["group_norm"] >= expect_min, report
    assert list(model.state_dict()) == list(state)  # same keys: checkpoints load either way
    torch.manual_seed(3)
    out = run()
    g = torch.autograd.grad(out.pow(2).mean(), list(lora.values()))
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=2e-5)
    for a, b_ in zip(g, g_ref):
        torch.testing.assert_close(a, b_, rtol=2e-3, atol=1e-6)
    assert fastvader.revert(model) == report.counts["group_norm"]
    _assert_restored(model, snapshot, state)


def _use_backend(monkeypatch, backend):
    """'kernel': the Triton path (interpreter on CPU); 'reference': the patch logic alone."""
    if backend == "reference":
        monkeypatch.setattr(gn_mod, "group_norm_backend", lambda device: "reference")
    elif gn_mod.group_norm_backend(DEVICE) == "reference":
        pytest.skip("needs triton (CUDA, or the interpreter via TRITON_INTERPRET=1)")


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=pytest.mark.slow)])
def test_patched_autoencoder_kl_matches_and_reverts(backend, monkeypatch):
    _use_backend(monkeypatch, backend)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4).to(DEVICE)
    lora = _lora(vae, ["conv1", "conv2"])
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    # encoder: 2 resnets, mid: 2 resnets + attention norm, conv_norm_out; decoder: 2 mid
    # resnets + attention, 4 up resnets, conv_norm_out
    _compare_patched(vae, lambda: vae(x).sample, lora, expect_min=14)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=pytest.mark.slow)])
def test_patched_unet3d_matches_and_reverts(backend, monkeypatch):
    _use_backend(monkeypatch, backend)
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(
        block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4, sample_size=8,
        in_channels=4, out_channels=4).to(DEVICE)
    lora = _lora(unet, ["to_q", "to_k", "to_v"])
    sample = torch.randn(1, 4, 2, 4, 4, device=DEVICE)
    text = torch.randn(1, 3, 16, device=DEVICE)
    # resnets + their temporal conv layers (4 pairs each) + conv_norm_out
    _compare_patched(unet, lambda: unet(sample, 10, text).sample, lora, expect_min=20)


def test_group_norm_conv_keeps_only_block_inputs(monkeypatch):
    """The 'group_norm_conv' op (norm-SiLU-conv runs keep only their input): same decode and
    gradients as unpatched, and far fewer bytes alive between forward and backward."""
    import fastvader
    from tests.helpers.memtrack import LiveBytes

    _use_backend(monkeypatch, "reference")  # the memory effect does not depend on the GN backend
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4).requires_grad_(False)
    z = torch.randn(1, 4, 8, 8)

    def run():
        zz = z.clone().requires_grad_(True)
        track = LiveBytes()
        with track:
            out = vae.decode(zz).sample
            kept = track.live
            out.pow(2).sum().backward()
        return out.detach(), zz.grad, kept

    out_ref, g_ref, kept_ref = run()
    snapshot = _module_snapshot(vae)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    report = fastvader.apply(vae, ops=["group_norm_conv"])
    assert report.counts["group_norm_conv"] == 14  # encoder and decoder: as for group_norm
    out, g, kept = run()
    fastvader.revert(vae)
    _assert_restored(vae, snapshot, state)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert kept < 0.7 * kept_ref, (kept, kept_ref)
