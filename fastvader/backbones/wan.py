"""Wan 2.1 T2V 1.3B and 14B: diffusers WanTransformer3DModel (flow matching, patch 1x2x2), the
causal 3D AutoencoderKLWan (8x spatial, 4x temporal compression) and a 5.7B UMT5-XXL text encoder.

``backbone.options.variant``: ``1.3b`` (default) or ``14b`` (14.29B transformer, 40 blocks; read
from a ``pretrained`` hub id naming 14B when not given). With fp8 frozen weights
(``memory.fp8_weights``) the transformer is built straight into fp8, tensor by tensor
(:mod:`fastvader.backbones.streaming`): from the checkpoint's safetensors shards, or with
random weights module by module, never whole in bf16 or fp32 in host memory.

The text encoder is the biggest part of the model. It lives on the CPU; ``encode_prompts``
moves it to the compute device for the call and back (``options.text_encoder_device: cpu``
keeps it on the CPU throughout), and ``free_text_encoder()`` drops it once the loop has cached
every prompt's embedding.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from fastvader.backbones.diffusers_common import (BYTE_TOKENIZER_VOCAB, DiffusersBackbone, MissingWeightsError,
                               byte_level_clip_tokenizer, find_config_file, is_local, load_pretrained,
                               load_scheduler_config, load_tokenizer, quiet_diffusers_config_warnings,
                               read_json, resolve_dtype)

#: variant -> (hub id, packaged config folder)
VARIANTS = {
    "1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1_t2v_1.3b"),
    "14b": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan2.1_t2v_14b"),
}
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


class WanBackbone(DiffusersBackbone):
    family = "wan"
    prediction_type = "flow"
    # self- and cross-attention projections of every block (attn1/attn2)
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 16  # VAE 8x times the transformer's 2x2 patches
    temporal_factor = 4
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
        if num_frames % cls.temporal_factor != 1:
            k = max(0, round((num_frames - 1) / cls.temporal_factor))
            raise ValueError(f"video.frames={num_frames} does not fit wan: its VAE compresses time 4x causally, so "
                             f"frames must be 4k+1 (try {cls.temporal_factor * k + 1})")

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        vae = self.vae.config
        patch = self.denoiser.config.patch_size
        s, tf = vae.scale_factor_spatial, vae.scale_factor_temporal
        for name, v, p in (("video.height", height, patch[1]), ("video.width", width, patch[2])):
            if v % (s * p):
                raise ValueError(f"{name}={v} does not fit wan: the latent ({v}/{s}) must divide into {p}x{p} "
                                 f"patches, so it must be a multiple of {s * p}")
        if num_frames % tf != 1:
            raise ValueError(f"video.frames={num_frames} must be {tf}k+1 for this VAE")
        return (vae.z_dim, (num_frames - 1) // tf + 1, height // s, width // s)

    def num_video_frames(self, latent_frames: int) -> int:
        return self.vae.config.scale_factor_temporal * (latent_frames - 1) + 1

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def variant(cls, options: dict, pretrained: str | None = None) -> str:
        """``options.variant``, else the one a ``pretrained`` hub id names, else 1.3b."""
        named = next((v for v, (hub, _) in VARIANTS.items() if pretrained == hub), None)
        variant = str(options.get("variant", named or "1.3b")).lower()
        if variant not in VARIANTS:
            raise ValueError(f"backbone.options.variant={options.get('variant')!r} is not a wan variant; "
                             f"choose one of {list(VARIANTS)}")
        if named is not None and named != variant:
            raise ValueError(f"backbone.options.variant={variant!r} does not match backbone.pretrained={pretrained!r} "
                             f"(the {named} weights); set one of them to match the other")
        return variant

    @classmethod
    def _config_files(cls, config_dir: Path | None, variant: str = "1.3b") -> dict[str, Path]:
        folder = VARIANTS[variant][1]
        return {
            "transformer": find_config_file("transformer", config_dir, f"{folder}/transformer_config.json"),
            "vae": find_config_file("vae", config_dir, f"{folder}/vae_config.json"),
            "text_encoder": find_config_file("text_encoder", config_dir, "text_encoders/umt5-xxl_config.json"),
        }

    @classmethod
    def component_builders(cls, config_dir=None, variant: str = "1.3b"):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        files = cls._config_files(config_dir, variant)
        return {
            "transformer": lambda: WanTransformer3DModel.from_config(read_json(files["transformer"])),
            "vae": lambda: AutoencoderKLWan.from_config(read_json(files["vae"])),
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**read_json(files["text_encoder"]))),
        }

    @classmethod
    def build_random(cls, config_dir, options, dtype, storage=None):
        """Random weights. With ``storage`` (fp8) the transformer and the text encoder are filled
        module by module from skeletons: a 14B model never exists whole in fp32 or bf16."""
        builders = cls.component_builders(config_dir, cls.variant(options))
        if storage is None:
            parts = {k: build().to(dtype) for k, build in builders.items()}
        else:
            from fastvader.backbones.streaming import streamed_from_random

            seed = int(options.get("seed", 0))
            parts = {"vae": builders["vae"]().to(dtype),
                     "transformer": streamed_from_random(builders["transformer"], dtype, storage, seed=seed,
                                                         what="wan transformer"),
                     "text_encoder": streamed_from_random(builders["text_encoder"], dtype, None, seed=seed,
                                                          what="UMT5 text encoder")}
        return cls(denoiser=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                   tokenizer=byte_level_clip_tokenizer(cls.max_text_length),
                   scheduler_config=cls.scheduler_defaults, options=options)

    @classmethod
    def from_config(cls, cfg, storage=None):
        """As every diffusers family (the variant's hub id when ``pretrained`` is not given);
        ``storage`` (fp8 frozen weights) builds the transformer straight into fp8 (tiny models
        are built, then converted)."""
        options = dict(cfg.options or {})
        variant = cls.variant(options, cfg.pretrained)
        if not (cfg.pretrained or cfg.random_init or options.get("tiny")):
            cfg = dataclasses.replace(cfg, pretrained=VARIANTS[variant][0])
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
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            transformer = WanTransformer3DModel(**TINY_TRANSFORMER).to(dtype)
            vae = AutoencoderKLWan(**TINY_VAE).to(dtype)
            text = UMT5EncoderModel(UMT5Config(**TINY_TEXT)).to(dtype)
        return cls(denoiser=transformer, vae=vae, text_encoder=text,
                       tokenizer=byte_level_clip_tokenizer(TINY_TEXT_LENGTH),
                       scheduler_config=cls.scheduler_defaults, options=options)

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype, storage=None):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        if storage is None:
            transformer = load_pretrained(WanTransformer3DModel, pretrained, "transformer", kind="diffusers",
                                          dtype=dtype, what="transformer")
        else:
            transformer = cls._stream_transformer(pretrained, options, dtype, storage)
        vae = load_pretrained(AutoencoderKLWan, pretrained, "vae", kind="diffusers", dtype=dtype, what="VAE")
        text = load_pretrained(UMT5EncoderModel, pretrained, "text_encoder", kind="transformers", dtype=dtype,
                               what="UMT5 text encoder")
        published = load_scheduler_config(pretrained, cls.scheduler_defaults)
        sched = {**published, "shift": published.get("flow_shift", cls.scheduler_defaults["shift"])}
        return cls(denoiser=transformer, vae=vae, text_encoder=text, tokenizer=load_tokenizer(pretrained),
                   scheduler_config=sched, options=options)

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
                                   what="wan transformer")

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
        out = self.denoiser(latents.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype),
                            return_dict=False)[0]
        return out.to(latents.dtype)

    # -- decoding ---------------------------------------------------------------------------------
    def decode_latents(self, latents, frames=None):
        """The Wan VAE decodes causally: video frame i needs latent frames 0..ceil(i/4), so we
        decode the shortest prefix holding every requested frame and pick the frames from it.
        Its decoder has no gradient checkpointing; backprop memory grows with that prefix."""
        B, C, f = latents.shape[:3]
        total = self.num_video_frames(f)
        idx = list(range(total)) if frames is None else list(frames)
        bad = [i for i in idx if not 0 <= i < total]
        if bad:
            raise ValueError(f"frames {bad} are outside a video of {total} frames")
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

