"""AnimateDiff: diffusers UNetMotionModel (an SD1.5 UNet with MotionAdapter v1-5-2's temporal
modules), the SD AutoencoderKL per frame and SD1.5's CLIP ViT-L/14 text encoder.

Weights come either from a pipeline whose ``unet/`` already is a UNetMotionModel, or from an SD1.5
pipeline (``backbone.pretrained``) plus a motion adapter (``options.motion_adapter``), merged with
``UNetMotionModel.from_unet2d``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastvader.backbones.diffusers_common import (BYTE_TOKENIZER_VOCAB, TINY_SD_VAE, MissingWeightsError, PerFrameVaeBackbone,
                               byte_level_clip_tokenizer, find_config_file, is_local, load_pretrained,
                               load_scheduler_config, load_tokenizer, read_json)

DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"

# AnimateDiff's training schedule (configs/inference/inference-v2.yaml: linear betas, not SD's
# scaled_linear; steps_offset 1 and diffusers' default "leading" spacing, as its own inference
# script). Not "linspace", which diffusers' docs suggest: it ends DDIM on t=0, where the update
# with set_alpha_to_one=False is the identity, and the one step that carries gradients in
# VADER (truncation "last") would pass none to the denoiser.
ANIMATEDIFF_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                             steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                             timestep_spacing="leading", prediction_type="epsilon")

TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlockMotion", "DownBlockMotion"],
                 up_block_types=["UpBlockMotion", "CrossAttnUpBlockMotion"],
                 block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                 num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32,
                 use_motion_mid_block=True)
TINY_TEXT = dict(vocab_size=BYTE_TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=32,
                 bos_token_id=512, eos_token_id=513, pad_token_id=513)  # the byte-level tokenizer's ids


class AnimateDiffBackbone(PerFrameVaeBackbone):
    family = "animatediff"
    prediction_type = "epsilon"
    # to_q/k/v/out of every attention: spatial self/cross attention and the motion modules'
    # temporal attention alike
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 8
    #: the SD1.5 base; the motion adapter comes from options.motion_adapter
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    #: frames the v1-5-2 motion modules have position encodings for
    max_frames = 32
    defaults = dict(frames=16, height=512, width=512, fps=8, sampler="ddim", steps=25, eta=0.0,
                    guidance_scale=7.5)
    scheduler_defaults = ANIMATEDIFF_SCHEDULER
    samplers = ("ddim", "dpm++")

    @classmethod
    def check_video_size(cls, num_frames, height, width):
        super().check_video_size(num_frames, height, width)
        if num_frames > cls.max_frames:
            raise ValueError(f"video.frames={num_frames} does not fit animatediff: its motion modules encode at "
                             f"most {cls.max_frames} frames (use 16, VADER-style, or up to {cls.max_frames})")

    def latent_shape(self, num_frames, height, width):
        limit = self.denoiser.config.motion_max_seq_length
        if num_frames > limit:
            raise ValueError(f"video.frames={num_frames} does not fit this motion adapter "
                             f"(motion_max_seq_length={limit}); use at most {limit} frames")
        return super().latent_shape(num_frames, height, width)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def _config_files(cls, config_dir: Path | None) -> dict[str, Path]:
        return {
            "unet": find_config_file("unet", config_dir, "animatediff_v1-5-2/unet_motion_model_config.json"),
            "vae": find_config_file("vae", config_dir, "sd15/vae_config.json"),
            "text_encoder": find_config_file("text_encoder", config_dir, "sd15/text_encoder_config.json"),
        }

    @classmethod
    def component_builders(cls, config_dir=None):
        from diffusers import AutoencoderKL, UNetMotionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        files = cls._config_files(config_dir)
        return {
            "unet": lambda: UNetMotionModel.from_config(read_json(files["unet"])),
            "vae": lambda: AutoencoderKL.from_config(read_json(files["vae"])),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**read_json(files["text_encoder"]))),
        }

    @classmethod
    def build_random(cls, config_dir, options, dtype):
        parts = {k: build().to(dtype) for k, build in cls.component_builders(config_dir).items()}
        max_len = parts["text_encoder"].config.max_position_embeddings
        return cls(denoiser=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                   tokenizer=byte_level_clip_tokenizer(max_len), scheduler_config=cls.scheduler_defaults,
                   options=options)

    @classmethod
    def build_tiny(cls, options, dtype):
        from diffusers import AutoencoderKL, UNetMotionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            unet = UNetMotionModel(**TINY_UNET).to(dtype)
            vae = AutoencoderKL(**TINY_SD_VAE).to(dtype)
            text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).to(dtype)
        return cls(denoiser=unet, vae=vae, text_encoder=text,
                       tokenizer=byte_level_clip_tokenizer(TINY_TEXT["max_position_embeddings"]),
                       scheduler_config=cls.scheduler_defaults, options=options)

    @classmethod
    def _unet_class_name(cls, pretrained: str) -> str | None:
        """The ``_class_name`` of the pipeline's unet/config.json (None if it cannot be read)."""
        from diffusers import UNet2DConditionModel

        try:
            if is_local(pretrained):
                p = Path(os.path.expanduser(pretrained)) / "unet" / "config.json"
                return read_json(p).get("_class_name") if p.is_file() else None
            return UNet2DConditionModel.load_config(pretrained, subfolder="unet").get("_class_name")
        except Exception:
            return None

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype):
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel

        if cls._unet_class_name(pretrained) == "UNetMotionModel":
            unet = load_pretrained(UNetMotionModel, pretrained, "unet", kind="diffusers", dtype=dtype,
                                   what="motion UNet")
        else:
            adapter_id = str(options.get("motion_adapter", DEFAULT_MOTION_ADAPTER))
            base = load_pretrained(UNet2DConditionModel, pretrained, "unet", kind="diffusers", dtype=dtype,
                                   what="SD1.5 UNet")
            adapter = load_pretrained(MotionAdapter, adapter_id, None, kind="diffusers", dtype=dtype,
                                      what="motion adapter (options.motion_adapter)")
            try:
                unet = UNetMotionModel.from_unet2d(base, adapter).to(dtype)
            except ValueError as e:
                raise MissingWeightsError(f"motion adapter {adapter_id} does not fit the UNet of {pretrained}: {e}") from e
            del base, adapter
        vae = load_pretrained(AutoencoderKL, pretrained, "vae", kind="diffusers", dtype=dtype, what="VAE")
        text = load_pretrained(CLIPTextModel, pretrained, "text_encoder", kind="transformers", dtype=dtype,
                               what="text encoder")
        # An SD1.5 pipeline ships SD's scheduler (scaled_linear PNDM); AnimateDiff's motion modules
        # were trained on linear betas, so its schedule wins over whatever the folder says.
        sched = {**load_scheduler_config(pretrained, {}), **cls.scheduler_defaults}
        return cls(denoiser=unet, vae=vae, text_encoder=text, tokenizer=load_tokenizer(pretrained),
                   scheduler_config=sched, options=options)

    # -- the step ----------------------------------------------------------------------------------
    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        """UNetMotionModel folds frames into the batch ((B*f, C, h, w)) itself but expects the text
        conditioning already repeated per frame, frame-major within each video."""
        dtype = self.denoiser_dtype
        B, _, F = latents.shape[:3]
        t = self._batched_timestep(timestep, B, latents.device)
        context = encoder_hidden_states.to(dtype).repeat_interleave(F, dim=0)
        out = self.denoiser(latents.to(dtype), t, encoder_hidden_states=context, return_dict=False)[0]
        return out.to(latents.dtype)
