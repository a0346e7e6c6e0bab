"""ModelScope text-to-video 1.7B and ZeroScope v2 (diffusers UNet3DConditionModel + the SD
AutoencoderKL applied per frame + a 23-layer OpenCLIP-H text tower as CLIPTextModel).

ZeroScope v2 576w is a fine-tune of the same architecture; only its defaults and hub id differ.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastvader.backbones.diffusers_common import (BYTE_TOKENIZER_VOCAB, TINY_SD_VAE, PerFrameVaeBackbone, byte_level_clip_tokenizer,
                               find_config_file, load_pretrained, load_scheduler_config, load_tokenizer,
                               read_json)

_CONFIG_DIR = "modelscope_t2v_1.7b"

# ModelScope's training schedule (SD-style scaled-linear betas, epsilon prediction). No published
# scheduler file could be checked; betas are the values diffusers' own tests used, steps_offset 1
# as in SD-derived pipelines. steps_offset 0 with "leading" spacing would end DDIM on t=0, an
# identity update (set_alpha_to_one=False) that passes no gradient from the last step.
MODELSCOPE_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                            steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")

# The same classes at a size that runs a training step on a CPU in well under a second. The VAE
# keeps four blocks so its spatial factor (8) is the real one.
TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
                 up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
                 block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=8)
TINY_TEXT = dict(vocab_size=BYTE_TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu", projection_dim=32,
                 bos_token_id=512, eos_token_id=513, pad_token_id=513)  # the byte-level tokenizer's ids


class ModelScopeBackbone(PerFrameVaeBackbone):
    family = "modelscope"
    prediction_type = "epsilon"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 8  # the VAE's downsampling; the UNet interpolates odd latent sizes itself
    hub_id = "ali-vilab/text-to-video-ms-1.7b"
    # VADER's ModelScope settings
    defaults = dict(frames=16, height=384, width=384, fps=8, sampler="ddim", steps=25, eta=0.0,
                    guidance_scale=9.0)
    scheduler_defaults = MODELSCOPE_SCHEDULER
    samplers = ("ddim", "dpm++")

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def _config_files(cls, config_dir: Path | None) -> dict[str, Path]:
        return {name: find_config_file(name, config_dir, f"{_CONFIG_DIR}/{name}_config.json")
                for name in ("unet", "vae", "text_encoder")}

    @classmethod
    def component_builders(cls, config_dir=None):
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        files = cls._config_files(config_dir)
        return {
            "unet": lambda: UNet3DConditionModel.from_config(read_json(files["unet"])),
            "vae": lambda: AutoencoderKL.from_config(read_json(files["vae"])),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**read_json(files["text_encoder"]))),
        }

    @classmethod
    def build_random(cls, config_dir, options, dtype):
        parts = {k: build().to(dtype) for k, build in cls.component_builders(config_dir).items()}
        # A user's config folder may carry its own schedule; the published one was never found
        # (the shared reconstruction has steps_offset 0, see above), so none is packaged and the
        # family schedule is used instead.
        sched = cls.scheduler_defaults
        if config_dir is not None and (config_dir / "scheduler_config.json").is_file():
            sched = read_json(config_dir / "scheduler_config.json")
        max_len = parts["text_encoder"].config.max_position_embeddings
        return cls(denoiser=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                   tokenizer=byte_level_clip_tokenizer(max_len), scheduler_config=sched, options=options)

    @classmethod
    def build_tiny(cls, options, dtype):
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            unet = UNet3DConditionModel(**TINY_UNET).to(dtype)
            vae = AutoencoderKL(**TINY_SD_VAE).to(dtype)
            text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).to(dtype)
        return cls(denoiser=unet, vae=vae, text_encoder=text,
                       tokenizer=byte_level_clip_tokenizer(TINY_TEXT["max_position_embeddings"]),
                       scheduler_config=cls.scheduler_defaults, options=options)

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype):
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextModel

        unet = load_pretrained(UNet3DConditionModel, pretrained, "unet", kind="diffusers", dtype=dtype, what="UNet")
        vae = load_pretrained(AutoencoderKL, pretrained, "vae", kind="diffusers", dtype=dtype, what="VAE")
        text = load_pretrained(CLIPTextModel, pretrained, "text_encoder", kind="transformers", dtype=dtype,
                               what="text encoder")
        return cls(denoiser=unet, vae=vae, text_encoder=text, tokenizer=load_tokenizer(pretrained),
                   scheduler_config=load_scheduler_config(pretrained, cls.scheduler_defaults), options=options)

    # -- the step ----------------------------------------------------------------------------------
    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        """UNet3DConditionModel takes (B, C, f, h, w) latents and per-video text as they are."""
        dtype = self.denoiser_dtype
        t = self._batched_timestep(timestep, latents.shape[0], latents.device)
        out = self.denoiser(latents.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype),
                            return_dict=False)[0]
        return out.to(latents.dtype)


class ZeroScopeBackbone(ModelScopeBackbone):
    """ZeroScope v2 576w: ModelScope's architecture fine-tuned at 576x320, 24 frames."""

    family = "zeroscope"
    hub_id = "cerspense/zeroscope_v2_576w"
    defaults = dict(frames=24, height=320, width=576, fps=8, sampler="ddim", steps=25, eta=0.0,
                    guidance_scale=9.0)
