"""fp8 storage of frozen weights: the e4m3 error bound, the layer's forward and backward against
float64 references, peft's LoRA over fp8 layers (converted before or after injection), exact
undo, dtype casts that keep the storage, and which layers the rule keeps."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fastvader.memory.fp8 import (Fp8Linear, Fp8Storage, dequantize_e4m3, e4m3_error_bound,  # noqa: E402
                                  fp8_candidates, quantize_e4m3)
from fastvader.patching.core import Patches  # noqa: E402

torch.set_num_threads(1)


def _weights(out_features=37, in_features=53, dtype=torch.float32):
    """Rows spanning 8 orders of magnitude, a zero row and a row with one outlier (most of it then
    falls into e4m3's subnormal range)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * torch.logspace(-6, 2, out_features)[:, None]
    w[3] = 0.0
    w[5, 7] = 1e3
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantisation_error_is_within_the_e4m3_bound(dtype):
    w = _weights(dtype=dtype).float()
    bits, scale = quantize_e4m3(w)
    assert bits.dtype == torch.uint8 and scale.shape == (w.shape[0], 1) and scale.dtype == torch.float32
    err = (dequantize_e4m3(bits, scale, torch.float32) - w).abs()
    bound = e4m3_error_bound(w, scale)
    assert bool((err <= bound * (1 + 1e-6)).all()), float((err / bound).max())
    # the bound is tight: a format with one mantissa bit fewer (e5m2) would break it
    assert float((err / bound.clamp_min(1e-30)).max()) > 0.5
    e5m2 = (w / scale * (57344 / 448)).to(torch.float8_e5m2).float() * scale / (57344 / 448)
    assert bool(((e5m2 - w).abs() > bound * 1.01).any())
    assert float(dequantize_e4m3(bits, scale, torch.float32)[3].abs().max()) == 0.0  # a zero row stays zero


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fp8_linear_forward_and_backward_match_float64(dtype, tol):
    """y = x W^T + b with W the dequantised weight, and dL/dx, against float64 on odd shapes."""
    torch.manual_seed(0)
    linear = nn.Linear(53, 37).to(dtype)
    layer = Fp8Linear(53, 37, dtype=dtype)
    layer.load_weight(linear.weight)
    layer.bias.data = linear.bias.detach().clone()
    w64 = layer.dequantized_weight(torch.float64)
    x = torch.randn(3, 7, 53, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T + linear.bias.double()
    y64.backward(grad_out.double())
    assert y.dtype == dtype and x.grad.dtype == dtype
    for got, want in ((y.detach(), y64.detach()), (x.grad, x64.grad)):
        assert float((got.double() - want).norm() / want.norm()) < tol
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_fp8_linear_keeps_its_storage_through_dtype_casts():
    layer = Fp8Linear(16, 8)
    layer.load_weight(torch.randn(8, 16))
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 16)).dtype == torch.bfloat16


def _tiny_wan(seed=0):
    from diffusers import WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TRANSFORMER

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_TRANSFORMER).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 16, generator=g))


def _run(model):
    x, t, context = _inputs()
    return model(x, t, context, return_dict=False)[0]


def test_the_rule_keeps_layers_outside_the_blocks_and_named_patterns():
    model = _tiny_wan()
    every = dict(fp8_candidates(model))
    assert every and all(name.startswith("blocks.") for name in every)
    kept = dict(fp8_candidates(model, ["*.ffn.*"]))
    assert set(every) - set(kept) == {n for n in every if ".ffn." in n} != set()
    Fp8Storage(("*.ffn.*",)).convert(model)
    assert type(model.blocks[0].ffn.net[2]) is nn.Linear and type(model.proj_out) is nn.Linear
    assert isinstance(model.blocks[0].attn1.to_q, Fp8Linear)


@pytest.mark.parametrize("lora_first", [False, True])
def test_lora_over_fp8_layers_trains_and_the_conversion_reverts_exactly(lora_first):
    from fastvader.lora import add_lora

    model = _tiny_wan()
    reference = _run(model)
    patches = Patches()
    if lora_first:
        lora = add_lora(model, 4, 4.0, target_modules=["to_q", "to_v"], init_weights=False)
        lora_out = _run(model)
    originals = {n: m.weight for n, m in fp8_candidates(model)}
    count = Fp8Storage().convert(model, patches)
    if not lora_first:
        lora = add_lora(model, 4, 4.0, target_modules=["to_q", "to_v"], init_weights=False)
    assert count == len(originals) > 0
    assert isinstance(model.blocks[0].attn1.to_q.base_layer, Fp8Linear)
    assert all(p.dtype == torch.float32 for p in lora)
    out = _run(model)
    out.square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)
    if lora_first:  # same LoRA, fp8 base: close to the full-precision base
        assert float((out - lora_out).norm() / lora_out.norm()) < 0.05
    patches.revert()
    after = dict(fp8_candidates(model))
    assert all(type(m) is nn.Linear and m.weight is originals[n] for n, m in after.items())
    if lora_first:
        assert torch.equal(_run(model), lora_out)
    else:
        for p in lora:
            p.data.zero_()  # adapters off: exactly the model as it was
        assert torch.equal(_run(model), reference)
