"""CogVideoX (THUDM): diffusers CogVideoXTransformer3DModel (one DiT over the text and video
tokens, v-prediction on a zero-terminal-SNR schedule), the causal 3D AutoencoderKLCogVideoX (8x
spatial, 4x temporal compression) and a 4.8B T5 v1.1 XXL text encoder (226 tokens).

- ``cogvideox``: text-to-video, ``options.variant`` 5b (the default: 3D rotary positions,
  released in bf16) or 2b (sin-cos positions; released in fp16, also run in bf16 here, as
  fastvader's guards refuse fp16 for this family);
- ``cogvideox_i2v``: CogVideoX-5B-I2V, as ``CogVideoXImageToVideoPipeline``: the conditioning
  image is encoded by the VAE as one latent frame (a sample of its posterior, drawn from a
  generator seeded with ``options.seed``, times the VAE scaling factor), zero-padded to the
  video's latent frames and concatenated with the noisy latents on channels. Its learned
  position table fixes the size: 49 frames at 480x720.

Samplers: ``ddim`` is CogVideoXDDIMScheduler and ``dpm++`` CogVideoXDPMScheduler, the two the
pipelines use; the DPM one needs the previous step's prediction, which :class:`DPMSolverSteps`
keeps. The text encoder lives on the CPU and visits the compute device per encode, as Wan's.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fastvader.backbones.diffusers_common import (BYTE_TOKENIZER_VOCAB, DiffusersBackbone, MissingWeightsError,
                                                  byte_level_clip_tokenizer, check_causal_frames, check_patch_grid,
                                                  count_params_on_meta, find_config_file, frame_indices,
                                                  load_pretrained, load_scheduler_config, load_tokenizer,
                                                  packaged_json, read_json)
from fastvader.memory.decode import to_unit_range


class Variant(NamedTuple):
    """Where a CogVideoX model's packaged configs are, and its published weights."""

    transformer: str
    vae: str
    scheduler: str
    hub_id: str


TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                        text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4, sample_frames=5,
                        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
                        use_rotary_positional_embeddings=True)
TINY_VAE = dict(block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=2,
                temporal_compression_ratio=4, down_block_types=["CogVideoXDownBlock3D"] * 4,
                up_block_types=["CogVideoXUpBlock3D"] * 4)
TINY_TEXT = dict(vocab_size=BYTE_TOKENIZER_VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)


class DPMSolverSteps:
    """CogVideoXDPMScheduler behind the ``step(model_output, t, sample)`` the sampler calls: its
    multistep update needs the previous step's predicted sample and timestep, which the pipelines
    pass in and this keeps (reset by ``set_timesteps``). Everything else is the scheduler's."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._previous: tuple = (None, None)

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def set_timesteps(self, *args, **kwargs):
        self._previous = (None, None)
        return self.scheduler.set_timesteps(*args, **kwargs)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **kwargs):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        old_prediction, previous_t = self._previous
        prev_sample, prediction = self.scheduler.step(model_output, old_prediction, timestep, previous_t, sample,
                                                      generator=generator, return_dict=False, **kwargs)
        self._previous = (prediction, timestep)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)


class CogVideoXBackbone(DiffusersBackbone):
    family = "cogvideox"
    prediction_type = "v_prediction"
    # the joint text-video attention's projections in every block
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    spatial_multiple = 16  # VAE 8x times the transformer's 2x2 patches
    temporal_factor = 4
    denoiser_subfolder = "transformer"
    max_text_length = 226
    # CogVideoXPipeline's settings: 49 frames (6 s at 8 fps) at 480x720, 50 steps, CFG 6
    defaults = dict(frames=49, height=480, width=720, fps=8, sampler="ddim", steps=50, eta=0.0, guidance_scale=6.0)
    samplers = ("ddim", "dpm++")
    variants = {"2b": Variant("cogvideox_2b", "cogvideox_2b", "cogvideox_2b", "THUDM/CogVideoX-2b"),
                "5b": Variant("cogvideox_5b", "cogvideox_5b", "cogvideox_5b", "THUDM/CogVideoX-5b")}
    default_variant = "5b"
    hub_id = "THUDM/CogVideoX-5b"
    #: input channels of the tiny transformer: the noisy latents only
    tiny_in_channels = 4

    def __init__(self, **parts):
        super().__init__(**parts)
        # The loop's decode checkpoints a unit of two latent frames (eight video frames) and
        # recomputes it in backward; with diffusers' per-block checkpointing inside the decoder
        # that recompute keeps one block's activations, not the unit's: at 49x480x720 the planner
        # measures 16.9 GiB instead of 67.9 GiB. Calls without gradients are unaffected.
        self.vae.enable_gradient_checkpointing()

    @classmethod
    def variant(cls, options: dict) -> Variant:
        name = str(options.get("variant", cls.default_variant)).lower()
        if name not in cls.variants:
            raise ValueError(f"backbone.options.variant={name!r} is not a {cls.family} model; "
                             f"choose one of {sorted(cls.variants)}")
        return cls.variants[name]

    @classmethod
    def default_pretrained(cls, options):
        return cls.variant(options).hub_id

    @classmethod
    def family_scheduler(cls, options: dict) -> dict:
        return packaged_json(f"{cls.variant(options).scheduler}/scheduler_config.json")

    @classmethod
    def check_video_size(cls, num_frames, height, width):
        super().check_video_size(num_frames, height, width)
        check_causal_frames(cls.family, num_frames, cls.temporal_factor)

    def latent_shape(self, num_frames, height, width):
        self.check_video_size(num_frames, height, width)
        vae, transformer = self.vae.config, self.denoiser.config
        if transformer.patch_size_t is not None:
            raise ValueError("this transformer patches time (CogVideoX 1.5, patch_size_t); fastvader supports "
                             "CogVideoX 1.0 (2b, 5b, 5b-I2V)")
        s, tf = 2 ** (len(vae.block_out_channels) - 1), vae.temporal_compression_ratio
        check_patch_grid(self.family, height, width, s, transformer.patch_size)
        check_causal_frames(self.family, num_frames, tf)
        return (vae.latent_channels, (num_frames - 1) // tf + 1, height // s, width // s)

    def num_video_frames(self, latent_frames: int) -> int:
        return self.vae.config.temporal_compression_ratio * (latent_frames - 1) + 1

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def _config_files(cls, config_dir: Path | None, variant: Variant) -> dict[str, Path]:
        return {
            "transformer": find_config_file("transformer", config_dir, f"{variant.transformer}/transformer_config.json"),
            "vae": find_config_file("vae", config_dir, f"{variant.vae}/vae_config.json"),
            "text_encoder": find_config_file("text_encoder", config_dir, "text_encoders/t5-v1_1-xxl_config.json"),
        }

    @classmethod
    def component_builders(cls, config_dir=None, variant: Variant | None = None):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import T5Config, T5EncoderModel

        files = cls._config_files(config_dir, variant or cls.variants[cls.default_variant])
        return {
            "transformer": lambda: CogVideoXTransformer3DModel.from_config(read_json(files["transformer"])),
            "vae": lambda: AutoencoderKLCogVideoX.from_config(read_json(files["vae"])),
            "text_encoder": lambda: T5EncoderModel(T5Config(**read_json(files["text_encoder"]))),
        }

    @classmethod
    def describe(cls):
        """The default variant's counts as ``params``, every variant's in ``params_by_variant``."""
        info = super().describe()
        info["variant"] = cls.default_variant
        try:
            info["params_by_variant"] = {name: count_params_on_meta(cls.component_builders(variant=v))
                                         for name, v in cls.variants.items()}
        except MissingWeightsError:
            info["params_by_variant"] = None
        return info

    @classmethod
    def build_random(cls, config_dir, options, dtype):
        parts = {k: build().to(dtype) for k, build in cls.component_builders(config_dir, cls.variant(options)).items()}
        sched = cls.family_scheduler(options)
        if config_dir is not None and (config_dir / "scheduler_config.json").is_file():
            sched = read_json(config_dir / "scheduler_config.json")
        return cls(denoiser=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                   tokenizer=byte_level_clip_tokenizer(cls.max_text_length), scheduler_config=sched, options=options)

    @classmethod
    def build_tiny(cls, options, dtype):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import T5Config, T5EncoderModel

        learned = cls.conditioning != "text"  # the I2V model's learned positions, at the tiny sample size
        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            transformer = CogVideoXTransformer3DModel(**{**TINY_TRANSFORMER, "in_channels": cls.tiny_in_channels,
                                                         "use_learned_positional_embeddings": learned}).to(dtype)
            vae = AutoencoderKLCogVideoX(**TINY_VAE).to(dtype)
            text = T5EncoderModel(T5Config(**TINY_TEXT)).to(dtype)
        return cls(denoiser=transformer, vae=vae, text_encoder=text,
                   tokenizer=byte_level_clip_tokenizer(TINY_TRANSFORMER["max_text_seq_length"]),
                   scheduler_config=cls.family_scheduler(options), options=options)

    @classmethod
    def load_pretrained(cls, pretrained, options, dtype):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import T5EncoderModel

        transformer = load_pretrained(CogVideoXTransformer3DModel, pretrained, "transformer", kind="diffusers",
                                      dtype=dtype, what="transformer")
        vae = load_pretrained(AutoencoderKLCogVideoX, pretrained, "vae", kind="diffusers", dtype=dtype, what="VAE")
        text = load_pretrained(T5EncoderModel, pretrained, "text_encoder", kind="transformers", dtype=dtype,
                               what="T5 text encoder")
        return cls(denoiser=transformer, vae=vae, text_encoder=text, tokenizer=load_tokenizer(pretrained),
                   scheduler_config=load_scheduler_config(pretrained, cls.family_scheduler(options)), options=options)

    # -- sampling ----------------------------------------------------------------------------------
    def make_scheduler(self, name: str):
        """CogVideoX's own schedulers: their alphas carry the SNR shift (``snr_shift_scale``) the
        plain DDIM/DPM schedulers would drop."""
        from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

        if name not in self.samplers:
            raise ValueError(f"sampler.name={name!r} does not fit {self.family}; use one of {list(self.samplers)}")
        if name == "ddim":
            return CogVideoXDDIMScheduler.from_config(self.scheduler_config)
        return DPMSolverSteps(CogVideoXDPMScheduler.from_config(self.scheduler_config))

    # -- the step ----------------------------------------------------------------------------------
    def denoise(self, latents, timestep, encoder_hidden_states, **extra):
        """Predicts v for (B, C, f, h, w) latents (the transformer takes them frame-major)."""
        dtype = self.denoiser_dtype
        frames, h, w = latents.shape[2:]
        t = self._batched_timestep(timestep, latents.shape[0], latents.device)
        out = self.denoiser(hidden_states=self.model_input(latents, extra).transpose(1, 2).to(dtype),
                            encoder_hidden_states=encoder_hidden_states.to(dtype), timestep=t,
                            image_rotary_emb=self.rotary_embeddings(frames, h, w, latents.device),
                            return_dict=False)[0]
        return out.transpose(1, 2).to(latents.dtype)

    def model_input(self, latents: torch.Tensor, extra: dict) -> torch.Tensor:
        """What the patch embedding takes, (B, C', f, h, w): the latents (text-to-video)."""
        return latents

    def rotary_embeddings(self, frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D rotary position embedding of a latent video (5B models), as the pipelines build
        it: the token grid's crop of the sample-size grid."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        cfg = self.denoiser.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p = cfg.patch_size
        grid = (h // p, w // p)
        crops = get_resize_crop_region_for_grid(grid, cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=frames, device=device)

    # -- decoding ---------------------------------------------------------------------------------
    def decode_latents(self, latents, frames=None):
        """The whole video through the VAE (every activation kept when gradients are on), then
        the chosen frames: the plain decode ``decode_frames`` is checked against."""
        idx = frame_indices(frames, self.num_video_frames(latents.shape[2]))
        vae_dtype = next(self.vae.parameters()).dtype
        video = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype), return_dict=False)[0]
        return to_unit_range(video.float())[:, :, idx].permute(0, 2, 1, 3, 4)


class CogVideoXI2VBackbone(CogVideoXBackbone):
    """CogVideoX-5B-I2V (``CogVideoXImageToVideoPipeline``)."""

    family = "cogvideox_i2v"
    conditioning = "text+image"
    variants = {"5b": Variant("cogvideox_5b_i2v", "cogvideox_5b", "cogvideox_5b", "THUDM/CogVideoX-5b-I2V")}
    hub_id = "THUDM/CogVideoX-5b-I2V"
    tiny_in_channels = 8  # noisy latents + image latents

    def latent_shape(self, num_frames, height, width):
        shape = super().latent_shape(num_frames, height, width)
        cfg = self.denoiser.config
        s = height // shape[2]
        size = (cfg.sample_frames, cfg.sample_height * s, cfg.sample_width * s)
        if cfg.use_learned_positional_embeddings and (num_frames, height, width) != size:
            raise ValueError(f"video {num_frames}x{height}x{width} does not fit {self.family}: its learned position "
                             f"embeddings cover {size[0]} frames at {size[1]}x{size[2]} only; set video.frames, "
                             "video.height and video.width to that")
        return shape

    def encode_prompts(self, prompts, images=None, num_frames=None):
        if images is None:
            raise ValueError("cogvideox_i2v conditions every video on an image: give prompts with images "
                             "({text: ..., image: path})")
        emb = self.encode_text(prompts)
        emb.extra["image_latents"] = self.image_latents(images)
        return emb

    @torch.no_grad()
    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Each image (N, 3, H, W) in [0, 1] as the pipeline encodes it: one latent frame
        (N, C, 1, h, w), a posterior sample drawn from a generator seeded with ``options.seed``
        (per image, so a prompt's latents do not depend on its batch), scaled."""
        cfg = self.vae.config
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        scale = 1 / cfg.scaling_factor if cfg.invert_scale_latents else cfg.scaling_factor
        seed = int(self.options.get("seed", 0))
        out = []
        for image in images:
            x = (image * 2 - 1)[None, :, None].to(device, dtype)  # (1, 3, 1, H, W)
            posterior = self.vae.encode(x).latent_dist
            out.append(posterior.sample(torch.Generator().manual_seed(seed)).float().cpu() * scale)
        return torch.cat(out)

    def placeholder_conditioning(self, batch, dtype, latent_shape):
        emb = self.placeholder_embeddings(batch, dtype)
        channels, _, h, w = latent_shape
        emb.extra["image_latents"] = torch.empty(batch, channels, 1, h, w, device=self.device, dtype=dtype)
        return emb

    def model_input(self, latents, extra):
        """The latents and the image latents (first latent frame, zeros after) on channels."""
        image = extra["image_latents"].to(latents.dtype)
        padding = image.new_zeros(image.shape[0], image.shape[1], latents.shape[2] - 1, *image.shape[3:])
        return torch.cat([latents, torch.cat([image, padding], dim=2)], dim=1)
