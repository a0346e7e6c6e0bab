"""fastvader.accelerate_pipeline on tiny diffusers pipelines (TextToVideoSDPipeline, AnimateDiffPipeline,
WanPipeline, built from the tiny configurations the backbones use): the frames match the
unaccelerated pipeline's, and revert_pipeline leaves every module exactly as it was."""
from __future__ import annotations

from tests.helpers.trust import single_thread  # noqa: F401  (first: fixes sys.path)
from tests.helpers.snapshot import assert_restored, model_state

import pytest  # noqa: E402
import torch  # noqa: E402

import fastvader  # noqa: E402
from fastvader.backbones import build_backbone  # noqa: E402
from fastvader.config import BackboneConfig, ConfigError  # noqa: E402
from fastvader.patching.pipelines import is_accelerated  # noqa: E402

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def pytorch_kernel_paths(monkeypatch):
    """The kernels take their PyTorch path (the Triton interpreter computes the same, slowly)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def tiny_pipeline(family: str):
    """The family's diffusers pipeline around the tiny random models of its backbone."""
    bb = build_backbone(BackboneConfig(name=family, random_init=True, dtype="fp32", options={"tiny": True}))
    scheduler = bb.make_scheduler("euler_flow" if family == "wan" else "ddim")
    parts = dict(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, scheduler=scheduler)
    if family == "modelscope":
        return diffusers.TextToVideoSDPipeline(unet=bb.denoiser, **parts)
    if family == "animatediff":
        return diffusers.AnimateDiffPipeline(unet=bb.denoiser, motion_adapter=None, feature_extractor=None,
                                             image_encoder=None, **parts)
    return diffusers.WanPipeline(transformer=bb.denoiser, **parts)


def frames(pipe, family: str) -> torch.Tensor:
    size = dict(height=32, width=32, num_frames=5 if family == "wan" else 2)
    out = pipe("a red ball", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0), **size)
    return out.frames if isinstance(out.frames, torch.Tensor) else torch.as_tensor(out.frames)


def snapshots(pipe) -> dict:
    return {name: model_state(getattr(pipe, name)) for name in ("vae", "unet", "transformer")
            if isinstance(getattr(pipe, name, None), torch.nn.Module)}


def same_or_fresh_cache_list(now, before) -> bool:
    """The Wan VAE replaces its decode-cache lists ([0], [None] * n) at every decode."""
    return now is before or (type(now) is list and type(before) is list and now == before)


@pytest.mark.parametrize("family", ["modelscope", "animatediff", "wan"])
def test_accelerated_pipeline_gives_the_same_frames_and_reverts_exactly(family):
    pipe = tiny_pipeline(family)
    plain = frames(pipe, family)  # first: the Wan VAE sets up its decode cache attributes on first use
    before = snapshots(pipe)
    weights = {k: (v.clone(), v.stride()) for k, v in pipe.components[
        "unet" if family != "wan" else "transformer"].state_dict().items()}
    # on the CPU "auto" engages nothing: kernels, channels_last and compile are asked for by name
    # (the eager backend traces with dynamo and runs what it traced, without inductor's C++ compile)
    report = fastvader.accelerate_pipeline(pipe, kernels="on", compile="regional", compile_backend="eager",
                                           channels_last="on", compile_cache=False)
    assert is_accelerated(pipe)
    speed = next(iter(report.speed.values())).summary()
    assert speed["compile"]["engaged"] and speed["channels_last"]["engaged"]
    assert not speed["cuda_graphs"]["engaged"] and "auto: off on cpu" in speed["cuda_graphs"]["detail"]
    fast = frames(pipe, family)
    assert speed["compile"]["error"] is None
    assert next(iter(report.speed.values())).summary()["compile"]["compiled_calls"] > 0
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)

    assert fastvader.revert_pipeline(pipe) and not is_accelerated(pipe)
    for name, snapshot in before.items():
        assert_restored(getattr(pipe, name), snapshot, same_or_fresh_cache_list)
    denoiser = pipe.components["unet" if family != "wan" else "transformer"]
    for key, value in denoiser.state_dict().items():
        assert value.stride() == weights[key][1] and torch.equal(value, weights[key][0]), key
    torch.testing.assert_close(frames(pipe, family), plain, rtol=0, atol=0)


def test_accelerate_refuses_twice_and_unknown_settings():
    pipe = tiny_pipeline("wan")
    with pytest.raises(TypeError, match="speed settings are"):
        fastvader.accelerate_pipeline(pipe, compile_mode="regional")
    with pytest.raises(ConfigError, match="speed.compile='fast' is invalid"):
        fastvader.accelerate_pipeline(pipe, compile="fast")
    assert not is_accelerated(pipe)
    fastvader.accelerate_pipeline(pipe)
    with pytest.raises(RuntimeError, match="already accelerated"):
        fastvader.accelerate_pipeline(pipe)
    assert fastvader.revert_pipeline(pipe) and not fastvader.revert_pipeline(pipe)
