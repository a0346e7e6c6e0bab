"""Fused temporal attention: the kernel (under the Triton interpreter on CPU, compiled on a GPU)
against a float64 reference (with every launch configuration the autotuner may pick, the
inference op, and the v1 kernels), the diffusers processor against the stock one, apply/revert,
and what the autograd graph keeps for backward.

On a GPU machine run the same file compiled: ``python -m pytest tests/test_temporal_attention.py``
with TRITON_INTERPRET unset (tests/conftest.py only sets it when there is no GPU); the tensors
then live on CUDA (see ``DEVICE``).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from fastvader.kernels import _backend
from fastvader.kernels.ops import temporal_attention as ta
from fastvader.kernels.ops import temporal_attention_v1 as ta_v1
from fastvader.kernels.ops.temporal_attention import temporal_attention, temporal_attention_supports
from fastvader.kernels.reference import temporal_attention_reference


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKEND = _backend.active_backend(DEVICE)
needs_kernel = pytest.mark.skipif(
    KERNEL_BACKEND == "reference",
    reason="no Triton kernel path here (neither CUDA nor TRITON_INTERPRET=1 with triton installed)")

# Error relative to the largest reference magnitude. bf16 keeps 8 bits of mantissa: inputs are
# rounded to bf16 before the float64 oracle sees them, so what remains is output rounding (and,
# compiled, the bf16 probabilities fed to the second matmul).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _packed_qkv(n, f, heads, head_dim, dtype, seed=0):
    """q, k, v as strided views of one packed (N, F, 3C) tensor, like a fused qkv projection."""
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    qkv = torch.randn(n, f, 3 * c, generator=g).to(dtype=dtype, device=DEVICE).requires_grad_()
    return qkv, qkv.split(c, dim=-1)


def _check_against_float64(n, f, head_dim, heads, dtype, with_bias):
    qkv, (q, k, v) = _packed_qkv(n, f, heads, head_dim, dtype, seed=n * 1000 + f * 10 + heads)
    assert q.stride() == (f * 3 * heads * head_dim, 3 * heads * head_dim, 1)  # a view, not a copy
    bias = None
    if with_bias:
        bias = torch.randn(f, f, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()

    out = temporal_attention(q, k, v, heads, bias=bias)
    assert out.shape == (n, f, heads * head_dim) and out.dtype == dtype and out.is_contiguous()
    assert "fastvader_temporal_attention_fwd" in out.grad_fn.name()  # the op's autograd, not another path
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    out.backward(grad_out)

    qkv64 = qkv.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_() if with_bias else None
    want = temporal_attention_reference(*qkv64.split(heads * head_dim, dim=-1), heads, bias=bias64)
    want.backward(grad_out.double())

    tol = TOL[dtype]
    assert _rel_err(out, want) < tol, "forward"
    c = heads * head_dim
    for i, name in enumerate("qkv"):
        got_g = qkv.grad[..., i * c:(i + 1) * c]
        want_g = qkv64.grad[..., i * c:(i + 1) * c]
        assert _rel_err(got_g, want_g) < 2 * tol, f"d{name}"
    if with_bias:
        assert _rel_err(bias.grad, bias64.grad) < 2 * tol, "dbias"


# Every value of N {1, 7, 40}, F {1, 3, 12, 16, 24}, head_dim {8, 40, 64} and heads {1, 5}
# appears; every shape runs in fp32 and bf16, and each dtype meets the bias and no-bias paths on
# shapes of every N (four shapes each), which keeps the interpreter's bill small. N = 40 takes
# several row tiles with a short last one (the interpreter's tiles hold up to 128 rows).
ODD_SHAPES = [  # (N, F, head_dim, heads, with_bias)
    (1, 1, 8, 1, False),
    (7, 3, 40, 5, True),
    (7, 12, 64, 1, False),
    (40, 16, 8, 5, True),
    (40, 24, 40, 1, False),
    (1, 24, 64, 5, True),
    (40, 3, 64, 1, True),
    (7, 16, 40, 5, False),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-F{}-d{}-h{}-{}".format(
    *s[:4], "bias" if s[4] else "nobias"))
def test_forward_and_grads_match_float64(shape, dtype):
    _check_against_float64(*shape[:4], dtype, with_bias=shape[4])


@needs_kernel
@pytest.mark.slow
def test_largest_odd_shape():
    # every largest value at once; bf16, the dtype of training (fp32 runs on the shapes above)
    _check_against_float64(40, 24, 64, 5, torch.bfloat16, with_bias=True)


def _against_float64_with_bias(n, f, heads, hd, bias_shape, run=temporal_attention, tol=2e-5):
    """fp32 output and q/k/v/bias gradients of ``run`` against the float64 reference."""
    qkv, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    bias = torch.randn(bias_shape, device=DEVICE).requires_grad_()
    out = run(q, k, v, heads, bias)
    out.square().sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    want = temporal_attention_reference(*qkv64.split(heads * hd, -1), heads, bias=bias64)
    want.square().sum().backward()
    assert _rel_err(out, want) < tol
    assert _rel_err(qkv.grad, qkv64.grad) < 2.5 * tol
    assert _rel_err(bias.grad, bias64.grad) < 2.5 * tol


@needs_kernel
@pytest.mark.parametrize("f, hd", [(12, 40), (51, 160)], ids=["F12-d40", "F51-d160"])
def test_every_launch_configuration_the_autotuner_may_pick(f, hd):
    """Each compiled-path candidate (rows per tile, head_dim chunk) gives the reference's results,
    with several row tiles (a short last one), a per-clip bias gradient and one summed per tile."""
    heads, n = 2, 5
    candidates = ta._candidates(f, hd, n, interpreted=False)
    assert len({(c["BLOCK_R"], c["D_CHUNK"]) for c in candidates}) == len(candidates) >= 2

    def forced(cfg):
        def run(q, k, v, heads, bias):
            bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            return _ForcedConfig.apply(q, k, v, bias4, heads, cfg)
        return run

    for cfg in candidates:
        for bias_shape in ((f, f), (n, 1, f, f)):
            _against_float64_with_bias(n, f, heads, hd, bias_shape, run=forced(cfg))


class _ForcedConfig(torch.autograd.Function):
    """The v2 launchers with one given launch configuration (what the autotuner would run)."""

    @staticmethod
    def forward(ctx, q, k, v, bias4, heads, cfg):
        scale = (q.shape[-1] // heads) ** -0.5
        out, lse = ta._launch_forward(q, k, v, bias4, heads, scale, config=cfg)
        ctx.save_for_backward(q, k, v, bias4, out, lse)
        ctx.heads, ctx.scale, ctx.cfg = heads, scale, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias4, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = ta._launch_backward(q, k, v, bias4, out, lse, dout, ctx.heads, ctx.scale, True,
                                                config=ctx.cfg)
        return dq, dk, dv, dbias.sum_to_size(bias4.shape), None, None


@needs_kernel
def test_inference_op_stores_no_log_sum_exp(monkeypatch):
    """With nothing requiring grad (or under no_grad) the inference op runs: the same output,
    no log-sum-exp written."""
    calls = []
    launch = ta._launch_forward
    monkeypatch.setattr(ta, "_launch_forward", lambda *a, **k: calls.append(k.get("store_lse", True)) or launch(*a, **k))
    qkv, (q, k, v) = _packed_qkv(7, 12, 2, 40, torch.float32)
    want = temporal_attention_reference(q.double(), k.double(), v.double(), 2)
    with torch.no_grad():
        assert _rel_err(temporal_attention(q, k, v, 2), want) < 2e-5
    assert _rel_err(temporal_attention(q.detach(), k.detach(), v.detach(), 2), want) < 2e-5
    assert calls == [False, False]
    assert "fastvader_temporal_attention_fwd" in temporal_attention(q, k, v, 2).grad_fn.name()
    assert calls[-1] is True


@needs_kernel
@pytest.mark.parametrize("bias_shape", [(24, 24), (7, 1, 24, 24)], ids=["frame-bias", "per-row-bias"])
def test_v1_kernels_stay_reachable(monkeypatch, bias_shape):
    """FASTVADER_KERNEL_IMPL=v1 runs the H200-validated kernels (the v2 launchers are not
    reached), here on their blocked path: long clips walk the query frames in blocks of 16 (from
    64 padded frames on), forced on F = 24 (padded to 32: two blocks, the second one ragged)."""
    monkeypatch.setenv("FASTVADER_KERNEL_IMPL", "v1")
    monkeypatch.setattr(ta, "_launch_forward", None)
    monkeypatch.setattr(ta, "_launch_backward", None)
    monkeypatch.setattr(ta_v1, "_BLOCKED_FROM_F_PAD", 32)
    assert ta_v1._q_block(32) == 16
    _against_float64_with_bias(7, 24, 2, 40, bias_shape, run=lambda q, k, v, heads, bias: temporal_attention(
        q, k, v, heads, bias=bias))


@needs_kernel
def test_fp16_inputs():
    _check_against_float64(7, 12, 40, 5, torch.float16, with_bias=True)


@needs_kernel
@pytest.mark.parametrize("bias_shape", ["heads", "rows", "full", "row-vector", "expanded-view"])
def test_bias_broadcast_shapes_and_grads(bias_shape):
    n, f, heads, hd = 7, 5, 3, 8
    shapes = {"heads": (heads, f, f), "rows": (n, 1, f, f), "full": (n, heads, f, f),
              "row-vector": (1, f),  # the same additive bias on every query frame
              "expanded-view": (n, heads, f, f)}  # stride-0 view of one (f, f) bias
    if bias_shape == "expanded-view":
        bias = torch.randn(f, f, device=DEVICE).expand(n, heads, f, f).detach().requires_grad_()
    else:
        bias = torch.randn(shapes[bias_shape], device=DEVICE).requires_grad_()
    qkv, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    out = temporal_attention(q, k, v, heads, bias=bias)
    out.square().sum().backward()

    qkv64 = qkv.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    want = temporal_attention_reference(*qkv64.split(heads * hd, -1), heads, bias=bias64)
    want.square().sum().backward()
    assert _rel_err(out, want) < 2e-5
    assert _rel_err(qkv.grad, qkv64.grad) < 5e-5
    assert bias.grad.shape == bias.shape
    assert _rel_err(bias.grad, bias64.grad) < 5e-5


@needs_kernel
def test_bool_mask_and_custom_scale():
    n, f, heads, hd = 7, 6, 2, 16
    causal = torch.ones(f, f, dtype=torch.bool, device=DEVICE).tril()
    _, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    out = temporal_attention(q, k, v, heads, scale=0.3, bias=causal)
    additive = torch.zeros(f, f, dtype=torch.float64, device=DEVICE).masked_fill(~causal, float("-inf"))
    want = temporal_attention_reference(q.double(), k.double(), v.double(), heads, scale=0.3, bias=additive)
    assert _rel_err(out, want) < 2e-5
    # the first frame sees only itself: its output is its own value
    assert torch.allclose(out[:, 0], v[:, 0], atol=1e-5)


@needs_kernel
def test_fully_masked_rows_give_zeros_not_nan():
    n, f, heads, hd = 3, 4, 1, 8
    mask = torch.ones(f, f, dtype=torch.bool, device=DEVICE)
    mask[2] = False  # query frame 2 may attend to nothing
    _, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = temporal_attention(q, k, v, heads, bias=mask)
    out.sum().backward()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert q.grad[:, 2].abs().max() == 0


@needs_kernel
def test_arbitrary_strides_frame_major_and_channel_strided():
    n, f, heads, hd = 9, 5, 2, 8
    c = heads * hd
    g = torch.Generator().manual_seed(3)
    q = torch.randn(f, n, c, generator=g).to(DEVICE).transpose(0, 1)  # frame-major storage
    k = torch.randn(n, f, 2 * c, generator=g).to(DEVICE)[..., ::2]  # channel stride 2
    v = torch.randn(n, 2 * f, c, generator=g).to(DEVICE)[:, 1::2]  # frame stride 2C
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = temporal_attention(q, k, v, heads)
    want = temporal_attention_reference(q.double(), k.double(), v.double(), heads)
    assert _rel_err(out, want) < 2e-5


@needs_kernel
@pytest.mark.slow
def test_more_rows_than_a_grid_dimension_allows():
    # N > 65,535 (SDPA's efficient kernel refuses it): (row tiles x heads) programs on grid
    # axis 0 (limit 2^31 - 1). The interpreter checks the forward only (the backward shares the
    # indexing) to stay quick.
    n, f, heads, hd = 65_600, 2, 1, 8
    qkv, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    with_backward = KERNEL_BACKEND == "triton"
    out = temporal_attention(q, k, v, heads) if with_backward else temporal_attention(
        q.detach(), k.detach(), v.detach(), heads)
    qkv64 = qkv.detach().double().requires_grad_()
    want = temporal_attention_reference(*qkv64.split(heads * hd, -1), heads)
    assert _rel_err(out, want) < 2e-5
    assert _rel_err(out[-1], want[-1]) < 2e-5  # the last rows, past 65,535
    if with_backward:
        out.sum().backward()
        want.sum().backward()
        assert _rel_err(qkv.grad, qkv64.grad) < 5e-5


def _saved_bytes(fn) -> int:
    """Bytes of every tensor the autograd graph saves for backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@needs_kernel
def test_saved_for_backward_is_qkv_out_and_lse_only():
    n, f, heads, hd = 300, 16, 5, 8
    _, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    elem = q.element_size()
    bound = 4 * n * f * heads * hd * elem + n * heads * f * 4  # q + k + v + out, fp32 lse
    kernel_bytes = _saved_bytes(lambda: temporal_attention(q, k, v, heads))
    assert 0 < kernel_bytes <= bound
    # the check can fail: the eager reference keeps the N x heads x F x F probabilities
    reference_bytes = _saved_bytes(lambda: temporal_attention_reference(q, k, v, heads))
    assert reference_bytes > bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}-F{}-d{}-h{}-{}".format(
    *s[:4], "bias" if s[4] else "nobias"))
def test_pytorch_path_when_not_interpreting(shape, dtype, monkeypatch):
    """Without Triton the op runs reference.temporal_attention_forward / _backward: the same
    results and gradients (its backward is written out from the log-sum-exp, not autograd's)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors always take the Triton path")
    assert _backend.active_backend("cpu") == "reference"
    monkeypatch.setattr(ta, "_launch_forward", None)  # the kernel must not be reached
    _check_against_float64(*shape[:4], dtype, with_bias=shape[4])


def test_pytorch_path_saves_qkv_out_and_lse_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n, f, heads, hd = 300, 16, 5, 8
    _, (q, k, v) = _packed_qkv(n, f, heads, hd, torch.float32)
    assert _saved_bytes(lambda: temporal_attention(q, k, v, heads)) == 4 * q.numel() * 4 + n * heads * f * 4


def test_importable_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from fastvader.kernels import active_backend, group_norm, group_norm_reference, temporal_attention\n"
        "from fastvader.kernels import temporal_attention_reference\n"
        "assert active_backend('cpu') == 'reference'\n"
        "q = torch.randn(2, 3, 8, requires_grad=True)\n"
        "out = temporal_attention(q, q, q, 2)\n"
        "torch.testing.assert_close(out, temporal_attention_reference(q, q, q, 2))\n"
        "y = group_norm(q.transpose(1, 2), 4, activation='silu')\n"
        "torch.testing.assert_close(y, group_norm_reference(q.transpose(1, 2), 4, activation='silu'))\n"
        "(out.sum() + y.sum()).backward()\n"
        "assert q.grad is not None\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="divisible by heads"):
        temporal_attention(q, q, q, 3)
    with pytest.raises(ValueError, match="share one shape"):
        temporal_attention(q, q, torch.randn(4, 2, 8), 2)
    with pytest.raises(ValueError, match="share one dtype"):
        temporal_attention(q, q, q.double(), 2)
    with pytest.raises(ValueError, match=r"\(N, F, C\)"):
        temporal_attention(q[0], q[0], q[0], 2)
    with pytest.raises(ValueError, match="does not broadcast"):
        temporal_attention(q, q, q, 2, bias=torch.zeros(4, 4))


@needs_kernel
def test_kernel_path_refuses_what_it_cannot_take():
    q = torch.randn(1, 129, 16, device=DEVICE)
    with pytest.raises(ValueError, match="F=129"):
        temporal_attention(q, q, q, 1)
    q = torch.randn(1, 2, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        temporal_attention(q, q, q, 1)


# ------------------------------------------------------------------------------------------
# diffusers: the processor, apply / revert, tiny video UNets
# ------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")

import fastvader  # noqa: E402
import fastvader.patching.temporal_attention as patches  # noqa: E402
from fastvader.patching.temporal_attention import (  # noqa: E402
    TemporalAttentionProcessor,
    temporal_attention_modules,
)

FRAMES = 5


def _tiny_unet3d():
    torch.manual_seed(0)
    return diffusers.UNet3DConditionModel(
        sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=16, norm_num_groups=8).to(DEVICE)


def _tiny_unet_motion():
    torch.manual_seed(0)
    return diffusers.UNetMotionModel(
        sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
        norm_num_groups=8, motion_num_attention_heads=2, motion_max_seq_length=32,
        use_motion_mid_block=True).to(DEVICE)


def _unet_inputs(kind: str):
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, FRAMES, 4, 4, generator=g).to(DEVICE)
    # UNetMotionModel wants one text embedding per frame (batch x frames).
    text_batch = 1 if kind == "unet3d" else FRAMES
    text = torch.randn(text_batch, 7, 16, generator=g).to(DEVICE)
    return sample, torch.tensor([10], device=DEVICE), text


BUILDERS = {"unet3d": (_tiny_unet3d, 10), "motion": (_tiny_unet_motion, 14)}


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """Counts the calls the processor makes into the kernel entry point (so a patch that
    silently did nothing cannot pass)."""
    calls = []
    real = patches.temporal_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(patches, "temporal_attention", counting)
    return calls


def _forward_backward(model, kind):
    sample, t, text = _unet_inputs(kind)
    out = model(sample, t, encoder_hidden_states=text).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["unet3d", "motion"])
def test_tiny_video_unet_patched_matches_unpatched_with_lora(kind, count_kernel_calls):
    from peft import LoraConfig, inject_adapter_in_model

    build, n_temporal = BUILDERS[kind]
    model = build()
    model.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = inject_adapter_in_model(lora, model)  # LoRA factors are the only trainable weights
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    attn_modules = temporal_attention_modules(model)
    assert len(attn_modules) == n_temporal
    before = {id(m): m.processor for m in model.modules() if hasattr(m, "set_processor")}

    want_out, want_grads = _forward_backward(model, kind)
    assert not count_kernel_calls

    report = fastvader.apply(model, ops=["temporal_attention"])
    assert report.counts == {"temporal_attention": n_temporal}
    assert report.backends["temporal_attention"] == _backend.active_backend(None)
    assert all(isinstance(m.processor, TemporalAttentionProcessor) for m in attn_modules)
    # spatial self- and cross-attention keep their processors
    for m in model.modules():
        if hasattr(m, "set_processor") and not any(m is a for a in attn_modules):
            assert m.processor is before[id(m)]

    got_out, got_grads = _forward_backward(model, kind)
    assert len(count_kernel_calls) == n_temporal
    assert all(shape[1] == FRAMES for shape in count_kernel_calls)  # attention over frames

    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-4)
    assert set(got_grads) == set(want_grads) and want_grads
    assert all("lora_" in name for name in got_grads)
    for name, g in want_grads.items():
        assert _rel_err(got_grads[name], g) < 1e-4, name

    assert fastvader.revert(model) == n_temporal
    for m in model.modules():
        if hasattr(m, "set_processor"):
            assert m.processor is before[id(m)]


def test_apply_twice_needs_revert_and_revert_is_exact():
    model = _tiny_unet3d()
    originals = [m.processor for m in temporal_attention_modules(model)]
    fastvader.apply(model, ops=["temporal_attention"])
    with pytest.raises(RuntimeError, match="already patched"):
        fastvader.apply(model, ops=["temporal_attention"])
    fastvader.revert(model)
    assert [m.processor for m in temporal_attention_modules(model)] == originals
    assert all(a is b for a, b in zip((m.processor for m in temporal_attention_modules(model)), originals))
    assert "temporal_attention" in fastvader.patching.core.available_patches()


def test_processor_matches_stock_processor_with_all_module_options():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    # group norm, per-head q/k layer norm, residual, rescale and an additive mask over frames
    attn = Attention(query_dim=40, heads=5, dim_head=8, norm_num_groups=8, qk_norm="layer_norm",
                     residual_connection=True, rescale_output_factor=2.0, bias=True).to(DEVICE)
    x = torch.randn(6, 7, 40, device=DEVICE)
    mask = torch.randn(6, 1, 7, device=DEVICE)  # additive, per row, broadcast over query frames
    attn.set_processor(AttnProcessor2_0())
    want = attn(x, attention_mask=mask)
    attn.set_processor(TemporalAttentionProcessor(fallback=attn.processor))
    got = attn(x, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_processor_falls_back_for_cross_attention():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).to(DEVICE)
    stock = AttnProcessor2_0()
    attn.set_processor(stock)
    x, ctx = torch.randn(3, 4, 16, device=DEVICE), torch.randn(3, 9, 12, device=DEVICE)
    want = attn(x, encoder_hidden_states=ctx)
    attn.set_processor(TemporalAttentionProcessor(fallback=stock))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = attn(x, encoder_hidden_states=ctx)
    assert any("cross-attention" in str(w.message) for w in caught)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind, path, n_modules, head_shapes", [
    ("unet3d", "modelscope_t2v_1.7b/unet_config.json", 34, {(5, 64), (10, 64), (20, 64), (8, 64)}),
    ("motion", "animatediff_v1-5-2/unet_motion_model_config.json", 42, {(8, 40), (8, 80), (8, 160)}),
])
def test_full_size_architectures_are_found_and_fit_the_kernel(kind, path, n_modules, head_shapes):
    import json

    from tests.helpers.shared import require_shared

    config_file = require_shared(path)
    cls = diffusers.UNet3DConditionModel if kind == "unet3d" else diffusers.UNetMotionModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # the real architecture, no weights
            model = cls.from_config(json.loads(config_file.read_text()))
    found = temporal_attention_modules(model)
    assert len(found) == n_modules
    assert {(m.heads, m.to_q.out_features // m.heads) for m in found} == head_shapes
    for m in found:  # 16 frames of bf16, the training setting: the kernel takes every one
        probe = torch.empty(0, 16, m.to_q.out_features, dtype=torch.bfloat16)
        assert temporal_attention_supports(probe, m.heads) is None
