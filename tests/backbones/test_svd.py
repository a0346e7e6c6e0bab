"""Stable Video Diffusion img2vid-xt: the real architecture from the packaged configs on the meta
device, sampling that reproduces diffusers' StableVideoDiffusionPipeline step for step, and the
CPU targets of issue 17 on the tiny configuration."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvader.backbones import backbone_class
from fastvader.config import ConfigError, load_config
from fastvader.io.images import prepare_image
from fastvader.training.sampling import Sampler
from tests.backbones.test_diffusers import last_step_sensitivity
from tests.helpers.backbone_targets import (check_apply_revert, check_decode_gradients, check_resume_continues_exactly,
                                            check_step_changes_only_lora, check_strict_round_trip, one_thread,  # noqa: F401
                                            pytorch_kernel_paths, tiny_backbone)  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def first_frame(tmp_path: Path, size: int = 32) -> Path:
    from PIL import Image

    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path / "first.png"
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_real_config_builds_on_meta_with_its_counts():
    info = backbone_class("svd").describe()
    assert info["params"] == {"unet": 1_524_623_082, "vae": 97_742_847, "image_encoder": 632_076_800}
    assert info["hub_id"] == "stabilityai/stable-video-diffusion-img2vid-xt" and info["prediction_type"] == "v_prediction"


def test_preset_holds_the_pipeline_settings():
    cfg = load_config(REPO / "configs" / "svd.yaml")
    assert (cfg.video.frames, cfg.video.height, cfg.video.width, cfg.video.fps) == (25, 576, 1024, 7)
    assert (cfg.sampler.name, cfg.sampler.steps, cfg.sampler.guidance_scale) == ("euler", 25, 3.0)
    assert cfg.backbone.options == {"fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02,
                                    "min_guidance_scale": 1.0, "seed": 0}
    assert load_config(REPO / "configs" / "tiny_svd.yaml").backbone.options["tiny"] is True
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(REPO / "configs" / "svd.yaml", ["video.height=572"])


def test_the_euler_schedule_is_svd_edm_one():
    bb = tiny_backbone("svd")
    sched = bb.make_scheduler("euler")
    assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.use_karras_sigmas
    assert (sched.config.prediction_type, sched.config.timestep_type) == ("v_prediction", "continuous")
    sampler = Sampler(bb, "euler", 25, 3.0)
    noise = sampler.initial_noise(1, (1,), torch.Generator().manual_seed(0), "cpu")
    # the first sigma is the schedule's 700, not the training betas' 14.6
    assert sampler.scheduler.sigmas[0] == pytest.approx(700.0)
    assert noise.abs().item() == pytest.approx(abs(torch.randn(1, generator=torch.Generator().manual_seed(0)).item())
                                               * (700.0 ** 2 + 1) ** 0.5, rel=1e-5)
    torch.testing.assert_close(sampler.scheduler.timesteps[0], 0.25 * torch.log(torch.tensor(700.0)))
    for steps in (2, 25):
        assert last_step_sensitivity(bb.make_scheduler("euler"), steps) > 1e-3
    with pytest.raises(ValueError, match="euler"):
        bb.make_scheduler("ddim")


def test_guidance_ramps_over_the_frames():
    ramp = tiny_backbone("svd").guidance_scales(3.0, 5)
    assert ramp.shape == (1, 1, 5, 1, 1)
    torch.testing.assert_close(ramp.flatten(), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))


def test_sampling_reproduces_the_svd_pipeline(tmp_path):
    """The image's CLIP embedding and noise-augmented latents, the time ids, the zero
    unconditional branch, the guidance ramp, the EDM Euler steps and the frame-major UNet input,
    all at once: the pipeline's latents."""
    from PIL import Image
    from diffusers import StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as transformers_logging

    bb = tiny_backbone("svd")
    path = first_frame(tmp_path)
    sampler = Sampler(bb, "euler", 3, 3.0)
    noise = torch.randn(1, *bb.latent_shape(3, 32, 32), generator=torch.Generator().manual_seed(1))
    transformers_logging.set_verbosity_error()  # CLIPImageProcessor's note about torchvision
    pipe = StableVideoDiffusionPipeline(vae=bb.vae, image_encoder=bb.image_encoder, unet=bb.denoiser,
                                        scheduler=bb.make_scheduler("euler"), feature_extractor=CLIPImageProcessor())
    with torch.no_grad():
        emb = bb.encode_prompts(["first frame"], images=prepare_image(path, 32, 32, "stretch")[None], num_frames=3)
        ours = sampler.sample(emb, sampler.initial_noise(1, noise.shape[1:], torch.Generator().manual_seed(1), "cpu"))
        theirs = pipe(image=Image.open(path), height=32, width=32, num_frames=3, num_inference_steps=3,
                      min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7, motion_bucket_id=127,
                      noise_aug_strength=0.02, generator=torch.Generator().manual_seed(0),
                      latents=noise.transpose(1, 2), output_type="latent", return_dict=False)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_conditioning_is_per_image_and_needs_one():
    bb = tiny_backbone("svd")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = bb.encode_prompts(["a", "b"], images=pixels)
    assert emb.cond.shape == (2, 1, 16) and emb.uncond.abs().sum() == 0
    torch.testing.assert_close(emb.extra["added_time_ids"], torch.tensor([[6.0, 127.0, 0.02]] * 2))
    assert emb.uncond_extra["image_latents"].abs().sum() == 0
    torch.testing.assert_close(bb.encode_prompts(["b"], images=pixels[1:]).extra["image_latents"],
                               emb.extra["image_latents"][1:])
    with pytest.raises(ValueError, match="reads no text"):
        bb.encode_prompts(["text only"])


# ---------------------------------------------------------------------------------------------
# the CPU targets
# ---------------------------------------------------------------------------------------------
def test_a_training_step_changes_only_lora(tmp_path):
    check_step_changes_only_lora("svd", tmp_path)


def test_resume_continues_exactly(tmp_path):
    check_resume_continues_exactly("svd", tmp_path)


def test_saved_pipeline_folder_loads_back_strictly(tmp_path):
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def encode(bb):
        emb = bb.encode_prompts(["a"], images=pixels)
        return emb.cond, emb.extra["image_latents"]

    check_strict_round_trip(tiny_backbone("svd"), "svd", tmp_path, encode)


def test_decode_path_gradients_equal_a_plain_decode():
    """One clip of every frame (memory.decode_chunk = frames) is the pipeline's decode."""
    bb = tiny_backbone("svd")
    check_decode_gradients(bb, 3, frames=[0, 1, 2], grad_frames=[1, 2], chunk=3)


@pytest.mark.usefixtures("pytorch_kernel_paths")
def test_apply_patches_temporal_attention_and_norms_and_revert_restores_exactly():
    bb = tiny_backbone("svd")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = bb.encode_prompts(["a"], images=pixels)
    # the UNet: attn1 of its 4 temporal blocks; 8 ResnetBlock2D + 8 TemporalResnetBlock + conv_norm_out.
    # The VAE: the encoder's 9 resnets, mid attention and conv_norm_out; the temporal decoder's
    # 8 spatial and 8 temporal resnets, mid attention and conv_norm_out
    check_apply_revert(bb, emb, 3, 1.0, {"denoiser": {"temporal_attention": 4, "group_norm": 17}, "vae": {"group_norm": 28}})
