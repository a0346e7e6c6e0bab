"""The speed section and what engages on a CPU: defaults stay off quietly, a setting asked for
by name that cannot engage says so once and the run goes on without it; channels_last and the
fp8 routing (through a stand-in quantizer: torchao's fp8 needs an sm_89+ GPU) give the eager
result and revert exactly; the repeated blocks regional compilation picks."""
from __future__ import annotations

from tests.helpers.trust import single_thread  # noqa: F401  (first: fixes sys.path)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fastvader.backbones import build_backbone  # noqa: E402
from fastvader.config import BackboneConfig, ConfigError, SpeedConfig, load_config  # noqa: E402
from fastvader.lora import add_lora  # noqa: E402
from fastvader.speed import SpeedPath  # noqa: E402
from fastvader.speed.fp8 import NoGradFp8, fp8_unavailable  # noqa: E402
from fastvader.speed.layout import ChannelsLast  # noqa: E402
from fastvader.speed.regions import repeated_block_classes, repeated_blocks  # noqa: E402

BASE = ["prompts.items=[a red ball]"]


def tiny(family: str):
    return build_backbone(BackboneConfig(name=family, random_init=True, dtype="fp32", options={"tiny": True})).freeze()


# ---------------------------------------------------------------------------------------------
# the config section
# ---------------------------------------------------------------------------------------------
def test_defaults_and_yaml_words():
    cfg = load_config(None, BASE + ["speed.compile=off", "speed.cuda_graphs=no"])
    assert cfg.speed.compile == "off" and cfg.speed.cuda_graphs == "off"
    assert load_config(None, BASE).speed == SpeedConfig()


@pytest.mark.parametrize("overrides, needle", [
    (["speed.compile=fast"], "speed.compile='fast' is invalid: choose one of ['auto', 'off', 'regional', 'full']"),
    (["speed.cuda_graphs=sometimes"], "speed.cuda_graphs='sometimes' is invalid"),
    (["speed.compile=off", "speed.compile_grad_steps=true"], "speed.compile_grad_steps=True is invalid: needs"),
    (["speed.compile=full", "speed.compile_grad_steps=true", "memory.checkpointing=sub_block"],
     "a full compile cannot trace the grad steps through memory.checkpointing='sub_block'"),
    (["speed.compile_backend=''"], "speed.compile_backend='' is invalid"),
])
def test_bad_values_are_refused_by_name(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + overrides)
    assert needle in str(err.value)


# ---------------------------------------------------------------------------------------------
# what engages on a CPU
# ---------------------------------------------------------------------------------------------
def test_auto_stays_off_on_the_cpu_without_a_word():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = SpeedPath(SpeedConfig(), model, "cpu")
    assert not caught and path.engaged == []
    summary = path.summary()
    assert all("auto: off on cpu" in summary[name]["detail"] for name in ("compile", "cuda_graphs", "channels_last"))
    assert summary["fp8_rollout"] == {"requested": "False", "engaged": False, "detail": "off"}
    assert path.wrap(lambda x: 2 * x)(torch.ones(2)).tolist() == [2.0, 2.0]


def test_a_setting_that_cannot_engage_says_so_once_and_runs_without():
    model = nn.Sequential(nn.Linear(16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = SpeedPath(SpeedConfig(cuda_graphs="on", fp8_rollout=True), model, "cpu")
        call = path.wrap(model)
        path.activate()
        with torch.no_grad():
            out = [call(torch.ones(1, 16)) for _ in range(3)]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages
    assert "speed.cuda_graphs=on cannot engage: needs a CUDA device; this run is on cpu" in messages[0]
    assert "speed.fp8_rollout=True cannot engage: fp8 matmuls need a CUDA GPU" in messages[1]
    assert path.engaged == [] and path.graphed == []
    torch.testing.assert_close(out[-1], model(torch.ones(1, 16)), rtol=0, atol=0)
    assert "running without it" in messages[0] and str(path).startswith("fastvader speed: channels_last: off")


def test_fp8_reasons_name_the_device():
    assert "this run is on cpu" in fp8_unavailable(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# channels_last and the fp8 routing give the eager result and revert exactly
# ---------------------------------------------------------------------------------------------
def _denoise_with_grads(bb, lora):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *bb.latent_shape(2, 32, 32), generator=g)
    t, ctx = torch.tensor([500, 500]), torch.randn(2, bb.max_text_length, 32, generator=g)
    with torch.no_grad():
        plain = bb.denoise(x, t, ctx)
    out = bb.denoise(x, t, ctx)
    return plain, torch.autograd.grad(out.square().sum(), lora)


def test_channels_last_gives_the_eager_result_and_reverts():
    bb = tiny("modelscope")
    lora = add_lora(bb.denoiser, 4, 4.0, 0.0, bb.default_lora_targets, init_weights=False)
    convs = [m.weight for m in bb.denoiser.modules() if isinstance(m, nn.Conv2d)]
    before = [(w, w.detach().clone(), w.stride()) for w in convs]
    want = _denoise_with_grads(bb, lora)
    layout = ChannelsLast(bb.denoiser)
    assert len(layout.weights) == len(convs) > 0
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    got = _denoise_with_grads(bb, lora)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert layout.revert() == len(convs)
    now = [m.weight for m in bb.denoiser.modules() if isinstance(m, nn.Conv2d)]
    for w, (obj, value, stride) in zip(now, before):
        assert w is obj and w.stride() == stride and torch.equal(w, value)


def _plus_one(linear: nn.Linear) -> nn.Module:
    """A stand-in for torchao's fp8 shadow that is easy to tell apart: weight + 1."""
    shadow = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    shadow.load_state_dict({"weight": linear.weight + 1, **({"bias": linear.bias} if linear.bias is not None else {})})
    return shadow.requires_grad_(False)


def test_fp8_shadows_serve_no_grad_calls_only_and_revert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.Linear(32, 16)).requires_grad_(False)
    add_lora(model, 4, 4.0, 0.0, ["0"], init_weights=False)
    x = torch.randn(3, 16)
    eager = model[0](x)
    fp8 = NoGradFp8(model, quantize=_plus_one)
    # the base Linear of the LoRA layer and the 32->16 Linear; not 32->8 (8 is no multiple of 16),
    # not the LoRA factors
    assert len(fp8.shadows) == 2
    with torch.no_grad():
        shadowed = model[0](x)
    torch.testing.assert_close(shadowed - eager, x.sum(-1, keepdim=True).expand_as(eager), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0](x), eager, rtol=0, atol=0)  # with gradients: the original weight
    assert fp8.revert() == 2
    assert "forward" not in model[0].base_layer.__dict__ and "forward" not in model[3].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# which blocks regional compilation compiles
# ---------------------------------------------------------------------------------------------
def test_repeated_blocks_of_each_family():
    # the sub-block classes, outermost: BasicTransformerBlock is compiled inside Transformer2DModel
    assert repeated_block_classes(tiny("modelscope").denoiser) == (
        "TransformerTemporalModel", "ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel")
    assert repeated_block_classes(tiny("animatediff").denoiser) == (
        "Transformer2DModel", "ResnetBlock2D", "AnimateDiffTransformer3D")
    wan = tiny("wan").denoiser
    assert repeated_block_classes(wan) == ("WanTransformerBlock",)  # declared by diffusers
    assert repeated_blocks(wan) == list(wan.blocks)


def test_unknown_models_get_their_repeated_classes_outermost_first():
    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    model = nn.Sequential(nn.Linear(4, 4), Unit(), nn.Sequential(Unit(), Unit()))
    assert repeated_block_classes(model) == ("Unit",)
    assert repeated_blocks(model) == [model[1], model[2][0], model[2][1]]
