"""Wan 2.1 I2V 14B 480P (the ``wan`` adapter's code with WanImageToVideoPipeline's conditioning):
the real architecture from the packaged configs on the meta device, sampling that reproduces the
pipeline step for step, and the CPU targets of issue 17 on the tiny configuration."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvader.backbones import backbone_class
from fastvader.config import load_config
from fastvader.io.images import prepare_image
from fastvader.training.sampling import Sampler
from tests.backbones.test_svd import first_frame
from tests.helpers.backbone_targets import (check_apply_revert, check_decode_gradients, check_resume_continues_exactly,
                                            check_step_changes_only_lora, check_strict_round_trip, one_thread,  # noqa: F401
                                            pytorch_kernel_paths, tiny_backbone)  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def test_real_config_builds_on_meta_with_its_counts():
    info = backbone_class("wan_i2v").describe()
    assert info["params"] == {"transformer": 16_394_878_784, "vae": 126_892_531, "text_encoder": 5_680_910_336,
                              "image_encoder": 630_766_080}
    assert info["hub_id"] == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    cfg = load_config(REPO / "configs" / "wan_i2v.yaml")
    assert (cfg.video.frames, cfg.video.height, cfg.video.width, cfg.sampler.name, cfg.sampler.steps,
            cfg.sampler.guidance_scale) == (33, 480, 832, "euler_flow", 50, 5.0)  # 33 frames: one 24 GB card


def test_sampling_reproduces_the_wan_i2v_pipeline(tmp_path):
    """The first-frame video's latents behind the mask, the CLIP context, CFG and the flow steps:
    the pipeline's latents. The text embeddings go in ready-made (its prompt cleaning needs ftfy)."""
    from PIL import Image
    from diffusers import WanImageToVideoPipeline

    bb = tiny_backbone("wan_i2v")
    path = first_frame(tmp_path)
    noise = torch.randn(1, *bb.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = bb.encode_prompts(["a red ball"], images=prepare_image(path, 32, 32, "stretch")[None], num_frames=5)
        assert emb.extra["image_condition"][:, :4, 0].min() == 1 and emb.extra["image_condition"][:, :4, 1:].max() == 0
        ours = Sampler(bb, "euler_flow", 3, 5.0).sample(emb, noise.clone())
        pipe = WanImageToVideoPipeline(tokenizer=bb.tokenizer, text_encoder=bb.text_encoder, vae=bb.vae,
                                       scheduler=bb.make_scheduler("euler_flow"), image_encoder=bb.image_encoder,
                                       transformer=bb.denoiser)
        pipe.encode_image = lambda image, device=None: emb.extra["image_embeds"]  # the CLIP context: next test
        theirs = pipe(image=Image.open(path), prompt_embeds=emb.cond, negative_prompt_embeds=emb.uncond, height=32,
                      width=32, num_frames=5, num_inference_steps=3, guidance_scale=5.0, latents=noise.clone(),
                      output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_clip_context_is_the_penultimate_layer():
    bb = tiny_backbone("wan_i2v")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = bb.image_embeddings(pixels)
    assert embeds.shape == (2, 17, 16)  # (224 / 56)^2 patches + the class token, hidden width 16
    from fastvader.rewards.preprocess import CLIP_TRANSFORM

    with torch.no_grad():
        want = bb.image_encoder(pixel_values=CLIP_TRANSFORM(pixels), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(embeds, want)
    with pytest.raises(ValueError, match="conditions every video on an image"):
        bb.encode_prompts(["text only"])


# ---------------------------------------------------------------------------------------------
# the CPU targets
# ---------------------------------------------------------------------------------------------
def test_a_training_step_changes_only_lora(tmp_path):
    check_step_changes_only_lora("wan_i2v", tmp_path)


def test_resume_continues_exactly(tmp_path):
    check_resume_continues_exactly("wan_i2v", tmp_path)


def test_saved_pipeline_folder_loads_back_strictly(tmp_path):
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def encode(bb):
        emb = bb.encode_prompts(["a"], images=pixels, num_frames=5)
        return emb.cond, emb.extra["image_embeds"], emb.extra["image_condition"]

    check_strict_round_trip(tiny_backbone("wan_i2v"), "wan_i2v", tmp_path, encode)


def test_decode_path_gradients_equal_a_plain_decode():
    """Both latent frames in one decode unit: the causal cache stays inside it, gradients are exact."""
    bb = tiny_backbone("wan_i2v")
    check_decode_gradients(bb, 5, frames=[0, 2, 4], grad_frames=[2, 4], chunk=2)


@pytest.mark.usefixtures("pytorch_kernel_paths")
def test_apply_finds_nothing_to_patch_and_leaves_the_models_as_they_were():
    """Wan's DiT has no GroupNorm or temporal attention and its VAE normalises with RMS norms."""
    bb = tiny_backbone("wan_i2v")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = bb.encode_prompts(["a"], images=pixels, num_frames=5)
    check_apply_revert(bb, emb, 5, 500.0, {"denoiser": {"temporal_attention": 0, "group_norm": 0}, "vae": {"group_norm": 0}})
