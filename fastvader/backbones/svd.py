"""Stable Video Diffusion img2vid-xt: diffusers UNetSpatioTemporalConditionModel (v-prediction,
EDM-style continuous timesteps), the AutoencoderKLTemporalDecoder (the SD encoder, a decoder
with temporal layers) and an OpenCLIP ViT-H/14 image encoder. There is no text: the image
conditions everything (``conditioning = "image"``; a prompt's text is only its name).

As ``StableVideoDiffusionPipeline``, per conditioning image:

- its CLIP image embedding (the image resized to 224x224 with antialiasing, CLIP-normalised) is
  the cross-attention context, and zeros are the unconditional one;
- the image plus ``noise_aug_strength`` x Gaussian noise is encoded by the VAE (the posterior's
  mode, not scaled), repeated over the frames and concatenated with the noisy latents on
  channels; the unconditional branch gets zeros;
- the added time ids are (fps - 1, motion bucket, noise augmentation);
- guidance ramps linearly over the frames from ``min_guidance_scale`` to sampler.guidance_scale.

``options``: fps (7: the conditioning fps, apart from video.fps, which only sets the written
files' rate), motion_bucket_id (127), noise_aug_strength (0.02), min_guidance_scale (1.0),
seed (0: the augmentation noise, drawn per image so that a prompt's conditioning does not depend
on its batch). The image encoder lives on the CPU and visits the compute device per encode.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastvader.backbones.base import PromptEmbeddings
from fastvader.backbones.diffusers_common import (DiffusersBackbone, find_config_file, frame_indices,
                                                  load_image_encoder, load_pretrained, load_scheduler_config,
                                                  packaged_json, read_json)
from fastvader.memory.decode import to_unit_range

_CONFIG_DIR = "svd_img2vid_xt"
_IMAGE_ENCODER_CONFIG = "clip_hf/laion_CLIP-ViT-H-14-laion2B-s32B-b79K_vision_config.json"
#: the pipeline's conditioning defaults
CONDITIONING_DEFAULTS = dict(fps=7, motion_bucket_id=127, noise_aug_strength=0.02, min_guidance_scale=1.0)

# The same classes at a size that runs a training step on a CPU in about a second. Their norms
# have 32 groups, so every width is a multiple of 32; the VAE keeps four blocks (8x, as SVD's).
TINY_UNET = dict(sample_size=4, in_channels=8, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
                 up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"], cross_attention_dim=16,
                 num_attention_heads=[2, 4], addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                 num_frames=4)
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=1,
                latent_channels=4)
TINY_IMAGE_ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=224, patch_size=56, projection_dim=16)


def pipeline_resize():
    """The SVD pipeline's antialiased resize for the CLIP input. Its module imports transformers'
    CLIPImageProcessor, which warns about a missing torchvision it does not need here: quietly."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
    finally:
        transformers_logging.set_verbosity(level)
    return _resize_with_antialiasing


class SVDBackbone(DiffusersBackbone):
    family = "svd"
    prediction_type = "v_prediction"
    conditioning = "image"
    # every attention: the spatial and temporal transformers' self- and cross-attention
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 8  # the VAE's; the UNet upsamples to odd latent sizes itself
    hub_id = "stabilityai/stable-video-diffusion-img2vid-xt"
    # StableVideoDiffusionPipeline's settings for xt: 25 frames at 576x1024, 25 Euler steps, CFG
    # ramped to 3, decoded files at 7 fps
    defaults = dict(frames=25, height=576, width=1024, fps=7, sampler="euler", steps=25, eta=0.0,
                    guidance_scale=3.0)
    samplers = ("euler",)

    @classmethod
    def family_scheduler(cls) -> dict:
        return packaged_json(f"{_CONFIG_DIR}/scheduler_config.json")

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        s = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for name, v in (("video.height", height), ("video.width", width)):
            if v % s:
                raise ValueError(f"{name}={v} does not fit svd: it must be a multiple of the VAE's {s}")
        return (self.vae.config.latent_channels, num_frames, height // s, width // s)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def _config_files(cls, config_dir: Path | None) -> dict[str, Path]:
        return {"unet": find_config_file("unet", config_dir, f"{_CONFIG_DIR}/unet_config.json"),
                "vae": find_config_file("vae", config_dir, f"{_CONFIG_DIR}/vae_config.json"),
                "image_encoder": find_config_file("image_encoder", config_dir, _IMAGE_ENCODER_CONFIG)}

    @classmethod
    def component_builders(cls, config_dir=None):
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        files = cls._config_files(config_dir)
        return {
            "unet": lambda: UNetSpatioTemporalConditionModel.from_config(read_json(files["unet"])),
            "vae": lambda: AutoencoderKLTemporalDecoder.from_config(read_json(files["vae"])),
            "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**read_json(files["image_encoder"]))),
        }

    @classmethod
    def _assemble(cls, unet, vae, image_encoder, scheduler_config: dict, options: dict) -> "SVDBackbone":
        return cls(denoiser=unet, vae=vae, text_encoder=None, tokenizer=None, image_encoder=image_encoder,
                   scheduler_config=scheduler_config, options=options)

    @classmethod
    def build_random(cls, config_dir, options, dtype):
        parts = {k: build().to(dtype) for k, build in cls.component_builders(config_dir).items()}
        return cls._assemble(parts["unet"], parts["vae"], parts["image_encoder"], cls.family_scheduler(), options)

    @classmethod
    def build_tiny(cls, options, dtype):
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            unet = UNetSpatioTemporalConditionModel(**TINY_UNET).to(dtype)
            vae = AutoencoderKLTemporalDecoder(**TINY_VAE).to(dtype)
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).to(dtype)
        return cls._assemble(unet, vae, image_encoder, cls.family_scheduler(), options)

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype):
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

        unet = load_pretrained(UNetSpatioTemporalConditionModel, pretrained, "unet", kind="diffusers", dtype=dtype,
                               what="UNet")
        vae = load_pretrained(AutoencoderKLTemporalDecoder, pretrained, "vae", kind="diffusers", dtype=dtype,
                              what="VAE")
        return cls._assemble(unet, vae, load_image_encoder(pretrained, dtype),
                             load_scheduler_config(pretrained, cls.family_scheduler()), options)

    def option(self, name: str) -> float:
        return float(self.options.get(name, CONDITIONING_DEFAULTS[name]))

    # -- conditioning ------------------------------------------------------------------------------
    def encode_prompts(self, prompts, images=None, num_frames=None):
        """The images' conditioning (the texts are not used)."""
        if images is None:
            raise ValueError("svd conditions every video on an image and reads no text: give prompts with "
                             "images ({text: ..., image: path})")
        embeds = self.image_embeddings(images)
        latents = self.image_latents(images)
        time_ids = torch.tensor([[self.option("fps") - 1, self.option("motion_bucket_id"),
                                  self.option("noise_aug_strength")]]).repeat(len(images), 1)
        return PromptEmbeddings(embeds, torch.zeros_like(embeds), {"image_latents": latents, "added_time_ids": time_ids},
                                {"image_latents": torch.zeros_like(latents)})

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (N, 1, D) of images (N, 3, H, W) in [0, 1], preprocessed as the
        pipeline does a PIL image: resized to the encoder's size in [-1, 1] with antialiasing,
        then CLIP-normalised."""
        from fastvader.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize

        encoder = self.image_encoder
        size = encoder.config.image_size
        with self.borrowed(encoder) as device:
            x = pipeline_resize()(images.float().to(device) * 2 - 1, (size, size))
            x = normalize((x + 1) / 2, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            return encoder(x.to(next(encoder.parameters()).dtype)).image_embeds.unsqueeze(1).cpu()

    @torch.no_grad()
    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The noise-augmented images through the VAE encoder: (N, C, 1, h, w), the posterior's
        mode, unscaled (SVD conditions on unscaled latents)."""
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        seed, strength = int(self.options.get("seed", 0)), self.option("noise_aug_strength")
        out = []
        for image in images:
            noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
            x = (image.float() * 2 - 1 + strength * noise)[None].to(device, dtype)
            out.append(self.vae.encode(x).latent_dist.mode().float().cpu())
        return torch.cat(out).unsqueeze(2)

    def placeholder_embeddings(self, batch, dtype):
        width = self.image_encoder.config.projection_dim
        cond = torch.empty(batch, 1, width, device=self.device, dtype=dtype)
        return PromptEmbeddings(cond, torch.empty_like(cond))

    def placeholder_conditioning(self, batch, dtype, latent_shape):
        emb = self.placeholder_embeddings(batch, dtype)
        channels, _, h, w = latent_shape
        emb.extra["image_latents"] = torch.empty(batch, channels, 1, h, w, device=self.device, dtype=dtype)
        emb.extra["added_time_ids"] = torch.empty(batch, 3, device=self.device, dtype=dtype)
        return emb

    def guidance_scales(self, guidance_scale, latent_frames):
        """The pipeline's ramp: min_guidance_scale on the first frame to guidance_scale on the last."""
        return torch.linspace(self.option("min_guidance_scale"), guidance_scale, latent_frames).view(1, 1, -1, 1, 1)

    # -- the step ----------------------------------------------------------------------------------
    def make_scheduler(self, name: str):
        if name not in self.samplers:
            raise ValueError(f"sampler.name={name!r} does not fit svd (EDM sigmas, continuous timesteps); "
                             f"use one of {list(self.samplers)}")
        from fastvader.training.sampling import make_scheduler

        return make_scheduler(name, self.scheduler_config)

    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        """Predicts v for (B, C, f, h, w) latents (already scaled by the scheduler); the UNet takes
        them frame-major with the image latents on channels."""
        dtype = self.denoiser_dtype
        image = extra["image_latents"].to(latents.dtype).expand(-1, -1, latents.shape[2], -1, -1)
        x = torch.cat([latents, image], dim=1).transpose(1, 2)
        t = self._batched_timestep(timestep, latents.shape[0], latents.device)
        out = self.denoiser(x.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype),
                            added_time_ids=extra["added_time_ids"].to(dtype), return_dict=False)[0]
        return out.transpose(1, 2).to(latents.dtype)

    # -- decoding ---------------------------------------------------------------------------------
    def decode_latents(self, latents, frames=None):
        """Every frame through the temporal decoder in one clip (the pipeline's default
        decode_chunk_size), then the chosen frames."""
        b, c, f, h, w = latents.shape
        idx = frame_indices(frames, f)
        vae_dtype = next(self.vae.parameters()).dtype
        z = (latents / self.vae.config.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)
        pixels = to_unit_range(self.vae.decode(z.to(vae_dtype), num_frames=f).sample.float())
        return pixels.view(b, f, *pixels.shape[1:])[:, idx]
