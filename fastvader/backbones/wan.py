"""Wan 2.1: diffusers WanTransformer3DModel (flow matching, patch 1x2x2), the causal 3D
AutoencoderKLWan (8x spatial, 4x temporal compression) and a 5.7B UMT5-XXL text encoder.

- ``wan``: T2V 1.3B, or 14B with ``backbone.options.variant: 14b`` (40 blocks; read from a
  ``pretrained`` hub id naming 14B when not given).
- ``wan_i2v``: I2V 14B 480P, the same code with the image conditioning of
  ``WanImageToVideoPipeline``: the conditioning image's CLIP ViT-H/14 penultimate hidden states
  (a second cross-attention context), and a video whose first frame is the image and the rest
  zeros, encoded by the VAE and stacked on the noisy latents' channels behind a first-frame mask.

The text encoder is the biggest part of the T2V model. It lives on the CPU; ``encode_prompts``
moves it to the compute device for the call and back (``options.text_encoder_device: cpu``
keeps it on the CPU throughout), and ``free_text_encoder()`` drops it once the loop has cached
every prompt's embedding. The image encoder of ``wan_i2v`` lives there too.

With fp8 frozen weights (``memory.fp8_weights``) the transformer is built straight into fp8,
tensor by tensor (:mod:`fastvader.backbones.streaming`): from the checkpoint's safetensors
shards, or with random weights module by module, never whole in bf16 or fp32 in host memory.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from fastvader.backbones.diffusers_common import (BYTE_TOKENIZER_VOCAB, DiffusersBackbone, MissingWeightsError,
                                                  byte_level_clip_tokenizer, check_causal_frames, check_patch_grid,
                                                  find_config_file, frame_indices, is_local, load_image_encoder,
                                                  load_pretrained, load_scheduler_config, load_tokenizer,
                                                  quiet_diffusers_config_warnings, read_json, resolve_dtype)

#: variant -> (hub id, packaged transformer config folder)
VARIANTS = {
    "1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1_t2v_1.3b"),
    "14b": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan2.1_t2v_14b"),
}
#: every Wan 2.1 model shares one VAE
VAE_CONFIG = "wan2.1_t2v_1.3b/vae_config.json"
#: the transformer's weight files in the diffusers layout, index first
TRANSFORMER_FILES = ["diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"]

# Wan's published schedule is UniPC over flow sigmas with shift 3.0 (480p). fastvader's flow
# sampler (FlowMatchEulerDiscreteScheduler) reads the same shift as ``shift``.
WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                     flow_shift=3.0, shift=3.0)

TINY_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                        qk_norm="rms_norm_across_heads", cross_attn_norm=True)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY_TEXT = dict(vocab_size=BYTE_TOKENIZER_VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
TINY_TEXT_LENGTH = 16
# the image-to-video transformer at the same tiny size: 4 noise + 4 mask + 4 image-condition channels,
# a 16-wide image context (TINY_IMAGE_ENCODER's hidden states) with its own key/value projections
TINY_I2V_TRANSFORMER = dict(TINY_TRANSFORMER, in_channels=12, image_dim=16, added_kv_proj_dim=24)
TINY_IMAGE_ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=224, patch_size=56, projection_dim=16)
#: channels of the first-frame mask: the VAE's 4 frames per latent frame
MASK_CHANNELS = 4


class WanBackbone(DiffusersBackbone):
    family = "wan"
    prediction_type = "flow"
    # self- and cross-attention projections of every block (attn1/attn2)
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 16  # VAE 8x times the transformer's 2x2 patches
    temporal_factor = 4
    variants = VARIANTS
    default_variant = "1.3b"
    hub_id = VARIANTS["1.3b"][0]
    streams_weights = True
    denoiser_subfolder = "transformer"
    max_text_length = 512
    # Wan's own 480p settings (832x480, 81 frames = 5 s at 16 fps, 50 flow steps, CFG 5)
    defaults = dict(frames=81, height=480, width=832, fps=16, sampler="euler_flow", steps=50, eta=0.0,
                    guidance_scale=5.0)
    scheduler_defaults = WAN_SCHEDULER
    samplers = ("euler_flow",)

    @classmethod
    def check_video_size(cls, num_frames, height, width):
        super().check_video_size(num_frames, height, width)
        check_causal_frames(cls.family, num_frames, cls.temporal_factor)

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        vae = self.vae.config
        s, tf = vae.scale_factor_spatial, vae.scale_factor_temporal
        check_patch_grid(self.family, height, width, s, self.denoiser.config.patch_size[1])
        check_causal_frames(self.family, num_frames, tf)
        return (vae.z_dim, (num_frames - 1) // tf + 1, height // s, width // s)

    def num_video_frames(self, latent_frames: int) -> int:
        return self.vae.config.scale_factor_temporal * (latent_frames - 1) + 1

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def variant(cls, options: dict, pretrained: str | None = None) -> str:
        """``options.variant``, else the one a ``pretrained`` hub id names, else the default."""
        named = next((v for v, (hub, _) in cls.variants.items() if pretrained == hub), None)
        variant = str(options.get("variant", named or cls.default_variant)).lower()
        if variant not in cls.variants:
            raise ValueError(f"backbone.options.variant={options.get('variant')!r} is not a {cls.family} variant; "
                             f"choose one of {list(cls.variants)}")
        if named is not None and named != variant:
            raise ValueError(f"backbone.options.variant={variant!r} does not match backbone.pretrained={pretrained!r} "
                             f"(the {named} weights); set one of them to match the other")
        return variant

    @classmethod
    def _config_files(cls, config_dir: Path | None, variant: str | None = None) -> dict[str, Path]:
        folder = cls.variants[variant or cls.default_variant][1]
        return {
            "transformer": find_config_file("transformer", config_dir, f"{folder}/transformer_config.json"),
            "vae": find_config_file("vae", config_dir, VAE_CONFIG),
            "text_encoder": find_config_file("text_encoder", config_dir, "text_encoders/umt5-xxl_config.json"),
        }

    @classmethod
    def component_builders(cls, config_dir=None, variant: str | None = None):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        files = cls._config_files(config_dir, variant)
        return {
            "transformer": lambda: WanTransformer3DModel.from_config(read_json(files["transformer"])),
            "vae": lambda: AutoencoderKLWan.from_config(read_json(files["vae"])),
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**read_json(files["text_encoder"]))),
        }

    @classmethod
    def _assemble(cls, parts: dict, tokenizer, scheduler_config: dict, options: dict) -> "WanBackbone":
        return cls(denoiser=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                   image_encoder=parts.get("image_encoder"), tokenizer=tokenizer, scheduler_config=scheduler_config,
                   options=options)

    @classmethod
    def build_random(cls, config_dir, options, dtype, storage=None):
        """Random weights. With ``storage`` (fp8) the transformer and the text encoder are filled
        module by module from skeletons: a 14B model never exists whole in fp32 or bf16."""
        builders = cls.component_builders(config_dir, cls.variant(options))
        streamed = ("transformer", "text_encoder") if storage is not None else ()
        parts = {k: build().to(dtype) for k, build in builders.items() if k not in streamed}
        if storage is not None:
            from fastvader.backbones.streaming import streamed_from_random

            seed = int(options.get("seed", 0))
            parts["transformer"] = streamed_from_random(builders["transformer"], dtype, storage, seed=seed,
                                                        what=f"{cls.family} transformer")
            parts["text_encoder"] = streamed_from_random(builders["text_encoder"], dtype, None, seed=seed,
                                                         what="UMT5 text encoder")
        return cls._assemble(parts, byte_level_clip_tokenizer(cls.max_text_length), cls.scheduler_defaults, options)

    @classmethod
    def from_config(cls, cfg, storage=None):
        """As every diffusers family (the variant's hub id when ``pretrained`` is not given);
        ``storage`` (fp8 frozen weights) builds the transformer straight into fp8 (tiny models
        are built, then converted)."""
        options = dict(cfg.options or {})
        variant = cls.variant(options, cfg.pretrained)
        if not (cfg.pretrained or cfg.random_init or options.get("tiny")):
            cfg = dataclasses.replace(cfg, pretrained=cls.variants[variant][0])
        if storage is None or options.get("tiny"):
            backbone = super().from_config(cfg)
            if storage is not None:
                storage.convert(backbone.denoiser)
            return backbone
        quiet_diffusers_config_warnings()
        dtype = resolve_dtype(cfg.dtype)
        if cfg.random_init:
            config_dir = Path(os.path.expanduser(cfg.config_path)) if cfg.config_path else None
            return cls.build_random(config_dir, options, dtype, storage)
        return cls.load_pretrained(cfg.pretrained, options, dtype, storage)

    @classmethod
    def build_tiny(cls, options, dtype):
        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            parts = {k: build().to(dtype) for k, build in cls.tiny_builders().items()}
        return cls._assemble(parts, byte_level_clip_tokenizer(cls.tiny_text_length), cls.scheduler_defaults, options)

    #: tokens per prompt of the tiny model
    tiny_text_length = TINY_TEXT_LENGTH

    @classmethod
    def tiny_builders(cls) -> dict:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        return {"transformer": lambda: WanTransformer3DModel(**TINY_TRANSFORMER),
                "vae": lambda: AutoencoderKLWan(**TINY_VAE),
                "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**TINY_TEXT))}

    @classmethod
    def load_parts(cls, pretrained: str, dtype: torch.dtype, options: dict, storage=None) -> dict:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        if storage is None:
            transformer = load_pretrained(WanTransformer3DModel, pretrained, "transformer", kind="diffusers",
                                          dtype=dtype, what="transformer")
        else:
            transformer = cls._stream_transformer(pretrained, options, dtype, storage)
        return {"transformer": transformer,
                "vae": load_pretrained(AutoencoderKLWan, pretrained, "vae", kind="diffusers", dtype=dtype, what="VAE"),
                "text_encoder": load_pretrained(UMT5EncoderModel, pretrained, "text_encoder", kind="transformers",
                                                dtype=dtype, what="UMT5 text encoder")}

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype, storage=None):
        published = load_scheduler_config(pretrained, cls.scheduler_defaults)
        sched = {**published, "shift": published.get("flow_shift", cls.scheduler_defaults["shift"])}
        parts = cls.load_parts(pretrained, dtype, options, storage)
        return cls._assemble(parts, load_tokenizer(pretrained), sched, options)

    @classmethod
    def _stream_transformer(cls, pretrained, options, dtype, storage):
        """The transformer read tensor by tensor from its safetensors shards into fp8 layers."""
        from diffusers import WanTransformer3DModel

        from fastvader.backbones.streaming import checkpoint_files, hub_checkpoint_files, streamed_from_files

        if is_local(pretrained):
            config_file = Path(os.path.expanduser(pretrained)) / "transformer" / "config.json"
            if not config_file.is_file():
                raise MissingWeightsError(f"the transformer: {config_file} is missing (expected the diffusers layout "
                                          "with transformer/config.json and its safetensors)")
            files = checkpoint_files(config_file.parent, TRANSFORMER_FILES)
        else:
            from huggingface_hub import hf_hub_download

            local_only = bool(options.get("local_files_only", False))
            config_file = Path(hf_hub_download(pretrained, "config.json", subfolder="transformer",
                                               local_files_only=local_only))
            files = hub_checkpoint_files(pretrained, "transformer", TRANSFORMER_FILES, local_only)
        config = read_json(config_file)
        return streamed_from_files(lambda: WanTransformer3DModel.from_config(config), files, dtype, storage,
                                   what=f"{cls.family} transformer")

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, prompts):
        return super().tokenize([" ".join(p.split()) for p in prompts])

    def run_text_encoder(self, encoder, ids, mask):
        """As Wan's pipeline: the encoder sees the attention mask and every position past a
        prompt's length is zeroed (the transformer takes no mask)."""
        hidden = encoder(ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    # -- the step ----------------------------------------------------------------------------------
    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        """Predicts the flow velocity for (B, C, f, h, w) latents; timesteps are sigma x 1000."""
        dtype = self.denoiser_dtype
        t = self._batched_timestep(timestep, latents.shape[0], latents.device)
        out = self.denoiser(self.model_input(latents, extra).to(dtype), t,
                            encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False,
                            **self.image_context(extra, dtype))[0]
        return out.to(latents.dtype)

    def model_input(self, latents: torch.Tensor, extra: dict) -> torch.Tensor:
        """What the transformer's patch embedding takes: the latents (T2V)."""
        return latents

    def image_context(self, extra: dict, dtype: torch.dtype) -> dict:
        """The transformer's image cross-attention input: none (T2V)."""
        return {}

    # -- decoding ---------------------------------------------------------------------------------
    def decode_latents(self, latents, frames=None):
        """The Wan VAE decodes causally: video frame i needs latent frames 0..ceil(i/4), so we
        decode the shortest prefix holding every requested frame and pick the frames from it.
        Its decoder has no gradient checkpointing; backprop memory grows with that prefix."""
        B, C, f = latents.shape[:3]
        idx = frame_indices(frames, self.num_video_frames(f))
        tf = self.vae.config.scale_factor_temporal
        prefix = (max(idx) + tf - 1) // tf + 1
        vae_dtype = next(self.vae.parameters()).dtype
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, C, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device).view(1, C, 1, 1, 1)
        z = latents[:, :, :prefix].float() * std + mean
        video = self.vae.decode(z.to(vae_dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        return video[:, :, idx].permute(0, 2, 1, 3, 4)



class WanI2VBackbone(WanBackbone):
    """Wan 2.1 I2V 14B 480P (``WanImageToVideoPipeline``)."""

    family = "wan_i2v"
    conditioning = "text+image"
    variants = {"14b": ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "wan2.1_i2v_14b_480p")}
    default_variant = "14b"
    hub_id = variants["14b"][0]
    #: diffusers' WanAttnProcessor takes the context's last 512 tokens as the text: always 512
    tiny_text_length = 512

    @classmethod
    def component_builders(cls, config_dir=None, variant=None):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        image_file = find_config_file("image_encoder", config_dir,
                                      "clip_hf/laion_CLIP-ViT-H-14-laion2B-s32B-b79K_vision_config.json")
        return {**super().component_builders(config_dir, variant),
                "image_encoder": lambda: CLIPVisionModel(CLIPVisionConfig(**read_json(image_file)))}

    @classmethod
    def tiny_builders(cls):
        from diffusers import WanTransformer3DModel
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return {**super().tiny_builders(), "transformer": lambda: WanTransformer3DModel(**TINY_I2V_TRANSFORMER),
                "image_encoder": lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_IMAGE_ENCODER))}

    @classmethod
    def load_parts(cls, pretrained, dtype, options, storage=None):
        return {**super().load_parts(pretrained, dtype, options, storage),
                "image_encoder": load_image_encoder(pretrained, dtype)}

    # -- conditioning ------------------------------------------------------------------------------
    def encode_prompts(self, prompts, images=None, num_frames=None):
        if images is None or num_frames is None:
            raise ValueError("wan_i2v conditions every video on an image: give prompts with images "
                             "({text: ..., image: path}) and the video's frame count")
        emb = self.encode_text(prompts)
        emb.extra["image_embeds"] = self.image_embeddings(images)
        emb.extra["image_condition"] = self.image_condition(images, num_frames)
        return emb

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states of each image after CLIPImageProcessor's resize, centre
        crop and normalisation (done in torch on the prepared image; the pipeline gives it the
        original one): (N, tokens, width)."""
        from dataclasses import replace

        from fastvader.rewards.preprocess import CLIP_TRANSFORM

        encoder = self.image_encoder
        size = encoder.config.image_size
        transform = replace(CLIP_TRANSFORM, shortest_edge=size, crop=(size, size))
        with self.borrowed(encoder) as device:
            pixels = transform(images.float()).to(device, next(encoder.parameters()).dtype)
            return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].cpu()

    @torch.no_grad()
    def image_condition(self, images: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Per image, the pipeline's condition: a mask marking the first frame as given, and the
        latents (mode, normalised) of a video whose first frame is the image and the rest zeros:
        (N, 4 + C, latent frames, h, w)."""
        cfg = self.vae.config
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        out = []
        for image in images:  # one video at a time: the encoder's activations span every frame
            first = (image * 2 - 1)[None, :, None]
            video = torch.cat([first, first.new_zeros(1, 3, num_frames - 1, *first.shape[3:])], dim=2)
            z = self.vae.encode(video.to(device, dtype)).latent_dist.mode().float().cpu()
            mask = torch.zeros(1, MASK_CHANNELS, *z.shape[2:])
            mask[:, :, 0] = 1.0
            out.append(torch.cat([mask, (z - mean) / std], dim=1))
        return torch.cat(out)

    def placeholder_conditioning(self, batch, dtype, latent_shape):
        emb = self.placeholder_embeddings(batch, dtype)
        channels, frames, h, w = latent_shape
        vision = self.image_encoder.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        emb.extra["image_embeds"] = torch.empty(batch, tokens, vision.hidden_size, device=self.device, dtype=dtype)
        emb.extra["image_condition"] = torch.empty(batch, MASK_CHANNELS + channels, frames, h, w, device=self.device,
                                                   dtype=dtype)
        return emb

    def model_input(self, latents, extra):
        return torch.cat([latents, extra["image_condition"].to(latents.dtype)], dim=1)

    def image_context(self, extra, dtype):
        return {"encoder_hidden_states_image": extra["image_embeds"].to(dtype)}
