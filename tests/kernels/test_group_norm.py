"""Fused GroupNorm(+SiLU): the Triton kernels (under TRITON_INTERPRET=1 without a GPU) against
a float64 reference on both paths (resident groups, split slices), what forward keeps for
backward, the inference op, the v1 kernels, and the diffusers drop-in."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.kernels._group_norm_layout import Layout
from fastvader.kernels.modules import FusedGroupNormAct
from fastvader.kernels.ops import group_norm as gn_mod
from fastvader.kernels.ops.group_norm import group_norm, group_norm_triton
from fastvader.kernels.reference import group_norm_reference

needs_kernel = pytest.mark.skipif(gn_mod.group_norm_backend("cpu") == "reference" and not torch.cuda.is_available(),
                                  reason="needs triton (CUDA, or the interpreter via TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Pairwise cover of N {1,2} x C {32,96,128} x groups {8,32} x spatial {7x5, 16x16, 3x9x11} x
# {fp32, bf16} x {contiguous, channels_last} x {with, without parameter gradients}: every value
# of every axis, most pairs, few programs. Contiguous inputs take the resident path (its backward
# when no parameter needs a gradient), channels-last ones the split path.
CASES = [
    (1, 32, 8, (7, 5), torch.float32, False, "silu", False),
    (2, 32, 8, (16, 16), torch.bfloat16, True, "silu", True),
    (2, 96, 8, (3, 9, 11), torch.float32, True, "silu", False),
    (1, 96, 32, (7, 5), torch.bfloat16, False, None, True),
    (2, 128, 8, (16, 16), torch.float32, False, "silu", True),
    (1, 128, 32, (3, 9, 11), torch.bfloat16, False, "silu", False),
    (1, 96, 32, (16, 16), torch.float32, True, None, True),
    (1, 128, 8, (7, 5), torch.bfloat16, True, "silu", False),
    (1, 32, 8, (3, 9, 11), torch.float32, False, None, False),
]
CASE_NAMES = "N,C,G,spatial,dtype,channels_last,act,param_grads"


def _inputs(N, C, spatial, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((N, C) + spatial, generator=g) * 1.5 + 0.7).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = (torch.randn(C, generator=g) * 0.5 + 1.0)
    b = torch.randn(C, generator=g) * 0.3
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _against_float64(x, w, b, G, act, fn, tol, param_grads=True, dy=None):
    """y and the gradients of ``fn`` against the float64 oracle; the weight and bias require
    grad only with ``param_grads``. ``dy`` defaults to a contiguous random tensor."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(param_grads)
    b = b.clone().requires_grad_(param_grads)
    y = fn(x, G, w, b, 1e-5, act)
    assert y.dtype == x.dtype and y.shape == x.shape
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    inputs = (x, w, b) if param_grads else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = group_norm_reference(x64, G, w64, b64, 1e-5, act)
    want = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    for name, got, ref in zip(("y", "dx", "dweight", "dbias"), (y, *grads), (y64, *want)):
        err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        assert err < tol, f"{name}: max error {err:.2e} relative to max |ref| (tolerance {tol:.0e})"
    return y, grads[0]


@needs_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_kernel_matches_float64_reference(N, C, G, spatial, dtype, channels_last, act, param_grads):
    x, w, b = _inputs(N, C, spatial, dtype, channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    y, gx = _against_float64(x, w, b, G, act, group_norm_triton, tol, param_grads)
    assert y.stride() == x.stride() and gx.stride() == x.stride()  # memory format kept, no copy


@needs_kernel
@pytest.mark.parametrize("shape,G,tile,split,channels_last", [
    ((1, 8, 16, 16), 2, 64, 2, False),  # spatial tiles looped within each of 2 slices
    ((2, 128, 7, 5), 1, 1024, 1, False),  # a 128-channel group: the merge loops over channel chunks
    ((1, 32, 5, 3), 16, 256, 1, False),  # one tile spans 8 groups of 2 channels
    ((1, 32, 16, 16), 8, 128, 3, True),  # channels-last tiles across groups, looped, 3 slices
], ids=["looped-slices", "wide-group", "tile-spans-groups", "channels-last"])
@pytest.mark.parametrize("param_grads", [True, False], ids=["param-grads", "no-param-grads"])
def test_split_path(shape, G, tile, split, channels_last, param_grads):
    """The split path at small scale (forced, with small tiles): per-channel partials merged
    across tiles, slices and channels (the GPU path for VAE-size groups)."""
    x, w, b = _inputs(shape[0], shape[1], shape[2:], torch.float32, channels_last)
    _against_float64(x, w, b, G, "silu", lambda *a: group_norm_triton(*a, tile=tile, split=split), 2e-5,
                     param_grads)


def test_plans_pick_resident_groups_for_the_unet_and_split_for_the_vae():
    """UNet-size groups (up to 10 channels x 48 x 48 on a GPU) stay on chip; VAE decoder groups and
    channels-last inputs take the split path; plans are cached."""
    def plan(shape, memory_format=torch.contiguous_format, sms=132):
        x = torch.empty(shape, device="meta").to(memory_format=memory_format)
        return gn_mod._cached_plan(tuple(x.shape), tuple(x.stride()), 32, sms, None, None)

    assert plan((32, 320, 48, 48)).resident_block == 32768  # 10 x 2304 = 23,040 elements
    assert plan((32, 1280, 6, 6)).resident_block == 2048
    assert plan((2, 320, 16, 48, 48)).resident_block == 0  # the 3-D temporal norm's group: 368,640
    vae = plan((16, 512, 48, 48))
    assert vae.resident_block == 0 and vae.split >= 1 and not vae.layout.c_fast
    cl = plan((32, 320, 48, 48), torch.channels_last)
    assert cl.resident_block == 0 and cl.layout.c_fast and cl.block_c == 64
    assert plan((16, 512, 48, 48)) is vae  # cached


def _formatted(shape, fmt, generator):
    """A random tensor of ``shape`` in memory format ``fmt``."""
    if fmt == "frame_major":  # a (B, C, F, H, W) view of (B, F, C, H, W) memory (TemporalConvLayer)
        b, c, f, h, w = shape
        return torch.randn(b, f, c, h, w, generator=generator).to(DEVICE).permute(0, 2, 1, 3, 4)
    if fmt == "transposed":  # the last two dims swapped in memory: they do not chain
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).to(DEVICE).transpose(-1, -2)
    t = torch.randn(shape, generator=generator).to(DEVICE)
    return t.to(memory_format=torch.channels_last) if fmt == "channels_last" else t


@needs_kernel
@pytest.mark.parametrize("shape,x_format,dy_format,read_in_place", [
    ((2, 16, 5, 4), "channels_last", "contiguous", True),
    ((1, 16, 3, 5, 4), "frame_major", "contiguous", True),
    ((2, 16, 5, 4), "contiguous", "channels_last", True),
    ((2, 16, 5, 4), "contiguous", "transposed", False),
])
def test_dy_with_other_strides(shape, x_format, dy_format, read_in_place):
    """dy whose strides differ from x's is read through its own strides (the layout addresses
    it: no copy); only a dy the layout cannot address is made contiguous first. Both backward
    paths (resident, split) give the float64 reference's gradients either way."""
    g = torch.Generator().manual_seed(4)
    x, dy = _formatted(shape, x_format, g), _formatted(shape, dy_format, g)
    assert dy.stride() != x.stride()
    layout = Layout(x)
    assert (layout.strides_of(dy) is not None) == read_in_place
    w, b = torch.randn(16).to(DEVICE), torch.randn(16).to(DEVICE)
    for param_grads in (False, True):
        _against_float64(x, w, b, 4, "silu", group_norm_triton, 2e-5, param_grads, dy=dy)


@needs_kernel
def test_inference_op_stores_no_statistics(monkeypatch):
    """With nothing requiring grad (or under no_grad) the inference op runs: the same output,
    no statistics written."""
    calls = []
    launch = gn_mod._forward_launch
    monkeypatch.setattr(gn_mod, "_forward_launch", lambda *a, **k: calls.append(k.get("store_stats", True)) or launch(*a, **k))
    for split in (None, 2):  # resident and split paths
        x, w, b = _inputs(2, 32, (7, 5), torch.float32, False)
        want = group_norm_reference(x.double(), 8, w.double(), b.double(), 1e-5, "silu")
        y = group_norm_triton(x, 8, w, b, 1e-5, "silu", split=split)
        with torch.no_grad():
            y_no_grad = group_norm_triton(x.requires_grad_(), 8, w, b, 1e-5, "silu", split=split)
        for got in (y, y_no_grad):
            assert (got.double() - want).abs().max() < 1e-5
    assert calls == [False, False, False, False]
    group_norm_triton(x, 8, w, b, 1e-5, "silu")  # x requires grad: the training op, statistics kept
    assert calls[-1] is True


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_v1_kernels_stay_reachable(channels_last, monkeypatch):
    """FASTVADER_KERNEL_IMPL=v1 runs the H200-validated kernels (the v2 launchers are not reached)."""
    monkeypatch.setenv("FASTVADER_KERNEL_IMPL", "v1")
    monkeypatch.setattr(gn_mod, "_forward_launch", None)
    monkeypatch.setattr(gn_mod, "_backward_launch", None)
    x, w, b = _inputs(2, 32, (6, 5), torch.float32, channels_last)
    for param_grads in (True, False):
        _against_float64(x, w, b, 8, "silu", group_norm_triton, 2e-5, param_grads)
    with torch.no_grad():
        group_norm_triton(x, 8, w, b, 1e-5, "silu")
    monkeypatch.setenv("FASTVADER_KERNEL_IMPL", "v3")
    with pytest.raises(ValueError, match="FASTVADER_KERNEL_IMPL='v3' is invalid"):
        group_norm_triton(x, 8, w, b, 1e-5, "silu")


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


@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_pytorch_path_matches_float64_reference(N, C, G, spatial, dtype, channels_last, act, param_grads,
                                                monkeypatch):
    """Without Triton the op runs reference.group_norm_forward / group_norm_backward: the same
    outputs, strides and gradients (its backward is written out, not autograd's)."""
    monkeypatch.setattr(gn_mod, "group_norm_backend", lambda device: "reference")
    x, w, b = _inputs(N, C, spatial, dtype, channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    y, gx = _against_float64(x, w, b, G, act, group_norm, tol, param_grads)
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
