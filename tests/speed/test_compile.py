"""torch.compile through fastvader.speed: compiled blocks compose with LoRA, the kernel patches
and checkpoint wrappers (dynamo's eager backend: tracing and guards without inductor's C++
compile), compile nothing new on later calls, say so once when compiling fails, and revert
exactly; with inductor on the CPU, regional and full compilation give the eager result in fp32
within 1e-5, gradients included, and save their artifacts for the next run."""
from __future__ import annotations

from tests.helpers.trust import single_thread  # noqa: F401  (first: fixes sys.path)
from tests.helpers.snapshot import assert_restored, model_state

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fastvader  # noqa: E402
from fastvader.backbones import build_backbone  # noqa: E402
from fastvader.config import BackboneConfig, SpeedConfig  # noqa: E402
from fastvader.lora import add_lora  # noqa: E402
from fastvader.memory.checkpointing import enable_checkpointing  # noqa: E402
from fastvader.speed import SpeedPath  # noqa: E402
from fastvader.speed.compile import load_compile_cache  # noqa: E402

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def pytorch_kernel_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def micro_unet3d():
    """UNet3DConditionModel with one resolution level: four block classes, few shapes."""
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(
        block_out_channels=(8,), down_block_types=("CrossAttnDownBlock3D",), up_block_types=("CrossAttnUpBlock3D",),
        layers_per_block=1, cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4, sample_size=4,
        in_channels=4, out_channels=4)
    return unet.requires_grad_(False)


def run_both(call, lora, inputs):
    """(no-grad output, gradients of a loss on the grad-enabled output w.r.t. ``lora``)."""
    with torch.no_grad():
        plain = call(*inputs)
    loss = call(*inputs).square().mean()
    return plain, torch.autograd.grad(loss, lora)


def assert_close_results(got, want, tol):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _same_or_lora_around(now, before) -> bool:
    return now is before or (isinstance(now, BaseTunerLayer) and now.get_base_layer() is before)


def test_compiled_blocks_compose_with_lora_kernels_and_checkpointing():
    unet = micro_unet3d()
    lora = add_lora(unet, 2, 2.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], init_weights=False)
    fastvader.apply(unet)
    wrappers = enable_checkpointing(unet, "sub_block")
    snapshot = model_state(unet)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([10, 10]), torch.randn(2, 3, 8, generator=g))
    call = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    want = run_both(call, lora, inputs)
    settings = SpeedConfig(compile="regional", compile_backend="eager", compile_grad_steps=True, compile_cache=False)
    path = SpeedPath(settings, unet, "cpu")
    assert path.regions is not None and len(path.regions.modules) == 19  # 5 temporal attention + 5 resnet + ...
    graphs = counters["stats"]["unique_graphs"]
    run_both(call, lora, inputs)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled before activate()

    path.activate()
    hits = sum(wrappers.hits())
    assert_close_results(run_both(call, lora, inputs), want, 1e-6)
    # the checkpoint wrappers stay outermost and eager: each grad call of a wrapped block is counted
    assert sum(wrappers.hits()) - hits == len(wrappers.modules)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > graphs and path.regions.state.calls > 0
    assert_close_results(run_both(call, lora, inputs), want, 1e-6)
    assert counters["stats"]["unique_graphs"] == compiled  # no recompilation on the next call

    path.revert()
    assert_restored(unet, snapshot, _same_or_lora_around)
    wrappers.revert()
    fastvader.revert(unet)


def test_a_failing_compiler_says_so_once_and_the_blocks_run_eagerly():
    from torch._dynamo import register_backend

    @register_backend(name="fastvader_test_failing")
    def failing(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    unet = micro_unet3d()
    inputs = (torch.randn(1, 4, 2, 4, 4), torch.tensor([10]), torch.randn(1, 3, 8))
    with torch.no_grad():
        want = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    path = SpeedPath(SpeedConfig(compile="regional", compile_backend="fastvader_test_failing", compile_cache=False),
                     unet, "cpu")
    path.activate()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample for _ in range(2)]
    messages = [str(w.message) for w in caught if "speed.compile failed" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages
    assert path.summary()["compile"]["error"].startswith("BackendCompilerFailed")
    for out in got:
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    path.revert()


# ---------------------------------------------------------------------------------------------
# inductor on the CPU (each compiles a few graphs: about a minute of CPU)
# ---------------------------------------------------------------------------------------------
def tiny_wan_with_lora():
    bb = build_backbone(BackboneConfig(name="wan", random_init=True, dtype="fp32", options={"tiny": True})).freeze()
    lora = add_lora(bb.denoiser, 2, 2.0, 0.0, bb.default_lora_targets, init_weights=False)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, *bb.latent_shape(5, 32, 32), generator=g), torch.tensor([300, 300]),
              torch.randn(2, 7, 16, generator=g))
    return bb, lora, inputs


@pytest.mark.slow
def test_regional_inductor_matches_eager_with_gradients_and_saves_its_artifacts(tmp_path):
    bb, lora, inputs = tiny_wan_with_lora()
    enable_checkpointing(bb.denoiser, "sub_block")
    want = run_both(bb.denoise, lora, inputs)
    settings = SpeedConfig(compile="regional", compile_grad_steps=True, compile_cache_dir=str(tmp_path))
    path = SpeedPath(settings, bb.denoiser, "cpu")
    fast = path.wrap(bb.denoise)  # the rollout's no-grad call: saves the cache after compiling
    path.activate()

    def call(*args):
        return fast(*args) if not torch.is_grad_enabled() else bb.denoise(*args)

    assert_close_results(run_both(call, lora, inputs), want, 1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert_close_results(run_both(call, lora, inputs), want, 1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    summary = path.summary()["compile"]
    assert summary["compile_seconds"] > 0 and summary["error"] is None
    assert "WanTransformerBlock x2" in summary["detail"] and "grad steps compiled too" in summary["detail"]
    assert path.cache_file.parent == tmp_path and path.cache_file.stat().st_size > 0
    assert load_compile_cache(path.cache_file) == path.cache_file.stat().st_size
    path.revert()


@pytest.mark.slow
def test_full_inductor_matches_eager_with_gradients():
    bb, lora, inputs = tiny_wan_with_lora()
    want = run_both(bb.denoise, lora, inputs)
    path = SpeedPath(SpeedConfig(compile="full", compile_grad_steps=True, compile_cache=False), bb.denoiser, "cpu")
    path.activate()
    assert path.regions.modules == [bb.denoiser]
    assert_close_results(run_both(bb.denoise, lora, inputs), want, 1e-5)
    path.revert()
    assert "forward" not in bb.denoiser.__dict__
