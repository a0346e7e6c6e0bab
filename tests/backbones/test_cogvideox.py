"""CogVideoX 2B/5B text-to-video and 5B-I2V: the real architectures from the packaged configs on
the meta device, sampling that reproduces diffusers' CogVideoX pipelines step for step, and the
CPU targets of issue 17 on tiny configurations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvader.backbones import backbone_class, build_backbone
from fastvader.config import BackboneConfig, ConfigError, load_config
from fastvader.training.sampling import Sampler
from tests.backbones.test_diffusers import last_step_sensitivity
from tests.helpers.backbone_targets import (check_apply_revert, check_decode_gradients, check_resume_continues_exactly,
                                            check_step_changes_only_lora, check_strict_round_trip, one_thread,  # noqa: F401
                                            pytorch_kernel_paths, tiny_backbone)  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
NAMES = ["cogvideox", "cogvideox_i2v"]
T5_XXL_ENCODER = 4_762_310_656
VAE = 215_583_907


def images(n: int = 1, seed: int = 0) -> torch.Tensor:
    """Conditioning images as the prompt cache hands them over: (n, 3, 32, 32) in [0, 1], 8-bit levels."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) / 255.0


def encode(bb, prompts, pixels=None):
    return bb.encode_prompts(prompts) if pixels is None else bb.encode_prompts(prompts, images=pixels, num_frames=5)


# ---------------------------------------------------------------------------------------------
# the real architectures, presets, sizes
# ---------------------------------------------------------------------------------------------
def test_real_configs_build_on_meta_with_their_counts():
    info = backbone_class("cogvideox").describe()
    assert info["variant"] == "5b" and info["hub_id"] == "THUDM/CogVideoX-5b"
    assert info["params_by_variant"] == {
        "2b": {"transformer": 1_693_783_872, "vae": VAE, "text_encoder": T5_XXL_ENCODER},
        "5b": {"transformer": 5_570_283_072, "vae": VAE, "text_encoder": T5_XXL_ENCODER}}
    assert info["params"] == info["params_by_variant"]["5b"]
    i2v = backbone_class("cogvideox_i2v").describe()
    assert i2v["params"] == {"transformer": 5_570_479_680, "vae": VAE, "text_encoder": T5_XXL_ENCODER}
    # `fastvader models` shows both variants' counts; a single-variant family gets no variant lines
    from fastvader.cli.models import _format_entry

    listing = _format_entry({"name": "cogvideox", **info})
    assert "options.variant 2b: transformer 1,693,783,872" in listing
    assert "options.variant 5b (default): transformer 5,570,283,072" in listing
    assert "options.variant" not in _format_entry({"name": "cogvideox_i2v", **i2v})


@pytest.mark.parametrize("preset,name,variant", [("cogvideox", "cogvideox", "5b"), ("cogvideox_2b", "cogvideox", "2b"),
                                                 ("cogvideox_i2v", "cogvideox_i2v", None)])
def test_presets_hold_the_pipeline_settings(preset, name, variant):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    d = backbone_class(name).defaults
    assert cfg.backbone.name == name and cfg.backbone.options.get("variant") == variant
    assert (cfg.video.frames, cfg.video.height, cfg.video.width, cfg.video.fps) == (49, 480, 720, 8) == (
        d["frames"], d["height"], d["width"], d["fps"])
    assert (cfg.sampler.name, cfg.sampler.steps, cfg.sampler.guidance_scale) == ("ddim", 50, 6.0)
    tiny = load_config(REPO / "configs" / f"tiny_{name}.yaml")
    assert tiny.backbone.options["tiny"] is True and tiny.sampler.steps == 2


def test_video_sizes_the_models_cannot_take_are_named():
    with pytest.raises(ConfigError, match=r"frames must be 4k\+1 \(try 49\)"):
        load_config(REPO / "configs" / "cogvideox.yaml", ["video.frames=48"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_config(REPO / "configs" / "cogvideox.yaml", ["video.height=472"])
    bb = tiny_backbone("cogvideox")
    assert bb.latent_shape(49, 480, 720) == (4, 13, 60, 90) and bb.num_video_frames(13) == 49
    with pytest.raises(ValueError, match="learned position embeddings cover 5 frames at 32x32 only"):
        tiny_backbone("cogvideox_i2v").latent_shape(9, 32, 32)
    with pytest.raises(ValueError, match="variant='3b'"):
        build_backbone(BackboneConfig(name="cogvideox", random_init=True, options={"tiny": True, "variant": "3b"}))


def test_schedulers_are_cogvideox_own_and_the_last_step_carries_gradient():
    from diffusers import CogVideoXDDIMScheduler, DDIMScheduler

    bb = build_backbone(BackboneConfig(name="cogvideox", random_init=True, dtype="fp32",
                                       options={"tiny": True, "variant": "2b"}))
    ddim = bb.make_scheduler("ddim")
    assert isinstance(ddim, CogVideoXDDIMScheduler) and ddim.config.snr_shift_scale == 3.0
    plain = DDIMScheduler.from_config(bb.scheduler_config).alphas_cumprod
    assert (ddim.alphas_cumprod - plain).abs().max() > 1e-3  # the SNR shift a plain DDIM would drop
    assert tiny_backbone("cogvideox").make_scheduler("ddim").config.snr_shift_scale == 1.0  # 5b
    for name in ("ddim", "dpm++"):
        for steps in (2, 50):
            assert last_step_sensitivity(bb.make_scheduler(name), steps) > 1e-3, (name, steps)
    with pytest.raises(ValueError, match="euler_flow"):
        bb.make_scheduler("euler_flow")


# ---------------------------------------------------------------------------------------------
# the step, against diffusers' pipelines
# ---------------------------------------------------------------------------------------------
def _pipeline_latents(bb, sampler: str, noise: torch.Tensor, prompt: str, image=None) -> torch.Tensor:
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    scheduler = bb.make_scheduler(sampler)
    parts = dict(tokenizer=bb.tokenizer, text_encoder=bb.text_encoder, vae=bb.vae, transformer=bb.denoiser,
                 scheduler=getattr(scheduler, "scheduler", scheduler))  # the pipeline steps DPM itself
    kwargs = dict(prompt=prompt, negative_prompt="", num_frames=5, height=32, width=32, num_inference_steps=3,
                  guidance_scale=6.0, latents=noise.transpose(1, 2), max_sequence_length=16, output_type="latent",
                  return_dict=False)
    if image is None:
        out = CogVideoXPipeline(**parts)(**kwargs)[0]
    else:  # the generator draws the image latents' posterior sample
        out = CogVideoXImageToVideoPipeline(**parts)(image=image, generator=torch.Generator().manual_seed(0),
                                                     **kwargs)[0]
    return out.transpose(1, 2)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_sampling_reproduces_cogvideox_pipeline(sampler, monkeypatch):
    """Text embeddings, the 3D rotary positions, CFG, the scheduler (DPM's two-step memory
    included) and the latent layout, all at once: the pipeline's latents. CogVideoX's DPM step
    adds noise, drawn in the pipeline's (B, F, C, h, w) layout there and in fastvader's
    (B, C, F, h, w) one here (same distribution, other draws): it is zeroed in both."""
    import diffusers.schedulers.scheduling_dpm_cogvideox as dpm

    monkeypatch.setattr(dpm, "randn_tensor", lambda shape, **kwargs: torch.zeros(shape))
    bb = tiny_backbone("cogvideox")
    noise = torch.randn(1, *bb.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = Sampler(bb, sampler, 3, 6.0).sample(encode(bb, ["a red ball"]), noise.clone())
        theirs = _pipeline_latents(bb, sampler, noise, "a red ball")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_image_to_video_sampling_reproduces_its_pipeline(tmp_path):
    """The image prepared as the pipeline prepares it, encoded and padded as it does."""
    from PIL import Image

    from fastvader.io.images import prepare_image

    bb = tiny_backbone("cogvideox_i2v")
    path = tmp_path / "first.png"
    Image.fromarray((images()[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    noise = torch.randn(1, *bb.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = encode(bb, ["a red ball"], prepare_image(path, 32, 32, "stretch")[None])
        ours = Sampler(bb, "ddim", 3, 6.0).sample(emb, noise.clone())
        theirs = _pipeline_latents(bb, "ddim", noise, "a red ball", image=Image.open(path))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_each_video_sees_its_own_text_and_image():
    bb = tiny_backbone("cogvideox_i2v")
    pixels = images(2)
    emb = encode(bb, ["a red ball", "a blue sky"], pixels)
    assert emb.extra["image_latents"].shape == (2, 4, 1, 4, 4)
    torch.testing.assert_close(encode(bb, ["a blue sky"], pixels[1:]).extra["image_latents"],
                               emb.extra["image_latents"][1:])  # a prompt's latents do not depend on its batch
    x = torch.randn(2, *bb.latent_shape(5, 32, 32))
    with torch.no_grad():
        both = bb.denoise(x, torch.tensor([500, 500]), emb.cond, **emb.extra)
        second = bb.denoise(x[1:], torch.tensor(500), emb.cond[1:], **emb.select([1]).extra)
        other_image = bb.denoise(x[1:], torch.tensor(500), emb.cond[1:], image_latents=emb.extra["image_latents"][:1])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(second, other_image)
    with pytest.raises(ValueError, match="conditions every video on an image"):
        bb.encode_prompts(["no image"])
    with pytest.raises(ValueError, match="text-to-video"):
        tiny_backbone("cogvideox").encode_prompts(["x"], images=pixels[:1])


# ---------------------------------------------------------------------------------------------
# the CPU targets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_changes_only_lora(name, tmp_path):
    check_step_changes_only_lora(name, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_resume_continues_exactly(name, tmp_path):
    check_resume_continues_exactly(name, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_saved_pipeline_folder_loads_back_strictly(name, tmp_path):
    pixels = images() if name == "cogvideox_i2v" else None
    check_strict_round_trip(tiny_backbone(name), name, tmp_path,
                            lambda bb: (encode(bb, ["a cat"], pixels).cond,
                                        *encode(bb, ["a cat"], pixels).extra.values()))


def test_decode_path_gradients_equal_a_plain_decode():
    bb = tiny_backbone("cogvideox")
    check_decode_gradients(bb, 5, frames=[0, 2, 4], grad_frames=[2, 4], chunk=1)


@pytest.mark.usefixtures("pytorch_kernel_paths")
def test_apply_patches_the_vae_norms_and_revert_restores_exactly():
    bb = tiny_backbone("cogvideox")
    emb = encode(bb, ["a cat"])
    # every norm of the decoder (CogVideoXSpatialNorm3D: 2 per resnet, 10 resnets, and norm_out);
    # the transformer has none, and no temporal attention
    check_apply_revert(bb, emb, 5, 500, {"denoiser": {"group_norm": 0, "temporal_attention": 0},
                                 "vae": {"group_norm": 21}})
