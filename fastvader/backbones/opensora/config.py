"""Open-Sora 1.2's hyperparameters as typed dataclasses.

Defaults are the released models (Open-Sora tag v1.2.0): STDiT3-XL/2 (``hpcai-tech/OpenSora-STDiT-v3``)
and ``OpenSoraVAE_V1_2`` (``hpcai-tech/OpenSora-VAE-v1.2``: the SDXL 2D VAE followed by a causal
temporal VAE), as in the JSON files packaged in fastvader/model_configs/opensora_v1.2/ (a test
pins the defaults to them). ``load_json_configs`` reads such files; :func:`tiny_config` is the
same architecture at test size.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastvader.model_configs import packaged_config


@dataclass
class STDiT3Config:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: list = field(default_factory=lambda: [1, 2, 2])
    in_channels: int = 4
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True
    #: the released model predicts 8 channels (velocity + a variance the sampler ignores)
    pred_sigma: bool = True
    class_dropout_prob: float = 0.1
    frequency_embedding_size: int = 256

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TemporalVAEConfig:
    """``VAE_Temporal_SD``: a MAGVIT-style causal 3D conv VAE over the 2D VAE's latents."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: list = field(default_factory=lambda: [1, 2, 2, 4])
    temporal_downsample: list = field(default_factory=lambda: [False, True, True])
    num_groups: int = 32

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


@dataclass
class VAEConfig:
    """``VideoAutoencoderPipeline``: spatial (SDXL AutoencoderKL) then temporal VAE, in chunks of
    ``micro_frame_size`` frames, latents normalised by ``(z - shift) / scale``."""

    #: diffusers AutoencoderKL arguments of the spatial VAE (the SDXL VAE)
    spatial: dict = field(default_factory=lambda: dict(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025, force_upcast=True))
    #: VideoAutoencoderKL multiplies by this constant, not by the config's scaling_factor
    spatial_scale: float = 0.18215
    spatial_micro_batch_size: int = 4
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17
    scale: list = field(default_factory=lambda: [3.85, 2.32, 2.33, 3.06])
    shift: list = field(default_factory=lambda: [-0.10, 0.34, 0.27, 0.98])

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.spatial["block_out_channels"]) - 1)


@dataclass
class TextConfig:
    """T5 v1.1 XXL encoder (``DeepFloyd/t5-v1_1-xxl``), 300 tokens."""

    source: str = "DeepFloyd/t5-v1_1-xxl"
    max_length: int = 300
    #: transformers T5Config fields; None = read from ``source``
    t5_config: dict | None = None

    def architecture(self) -> dict:
        """T5Config fields of the encoder: ``t5_config``, else the packaged T5 v1.1 XXL config
        (what ``describe`` counts on the meta device without a download)."""
        if self.t5_config is not None:
            return dict(self.t5_config)
        return json.loads(packaged_config("text_encoders/t5-v1_1-xxl_config.json").read_text())


@dataclass
class OpenSoraConfig:
    stdit: STDiT3Config = field(default_factory=STDiT3Config)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(data: dict, cls):
    names = {f.name for f in fields(cls)}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k in names}


#: STDiT3 options the released model uses at these values; others are refused
_STDIT_FIXED = {"enable_sequence_parallelism": False, "only_train_temporal": False, "skip_y_embedder": False}


def load_json_configs(folder: str | Path | None = None) -> OpenSoraConfig:
    """Read ``stdit3_xl2_config.json``, ``vae_2d_sdxl_config.json``, ``vae_temporal_config.json``
    and ``vae_pipeline_config.json`` from ``folder`` (default: the packaged Open-Sora v1.2 ones)."""
    folder = Path(folder) if folder is not None else packaged_config("opensora_v1.2")
    stdit_raw = json.loads((folder / "stdit3_xl2_config.json").read_text())
    for key, allowed in _STDIT_FIXED.items():
        if key in stdit_raw and stdit_raw[key] != allowed:
            raise NotImplementedError(f"stdit3 {key}={stdit_raw[key]!r} is not implemented (only {allowed!r})")
    stdit = STDiT3Config(**_pick(stdit_raw, STDiT3Config))
    spatial = {k: v for k, v in json.loads((folder / "vae_2d_sdxl_config.json").read_text()).items()
               if not k.startswith("_")}
    temporal_raw = json.loads((folder / "vae_temporal_config.json").read_text())
    if temporal_raw.get("activation_fn", "swish") != "swish":
        raise NotImplementedError("temporal VAE activation_fn must be swish")
    temporal = TemporalVAEConfig(**_pick(temporal_raw, TemporalVAEConfig))
    pipe = json.loads((folder / "vae_pipeline_config.json").read_text())
    vae = VAEConfig(spatial=spatial, temporal=temporal, micro_frame_size=pipe.get("micro_frame_size", 17),
                    scale=list(pipe["scale"]), shift=list(pipe["shift"]),
                    spatial_micro_batch_size=pipe.get("vae_2d", {}).get("micro_batch_size", 4))
    return OpenSoraConfig(stdit=stdit, vae=vae)


def tiny_config() -> OpenSoraConfig:
    """Every part of the real model (spatial + temporal blocks with RoPE and qk-norm, caption
    cross-attention with a null caption, fps embedding, the SD-style 2D VAE, the causal temporal
    VAE with its temporal up/downsampling and micro-frame chunks), tiny. The text encoder is a
    random 2-layer T5."""
    return OpenSoraConfig(
        stdit=STDiT3Config(depth=2, hidden_size=64, num_heads=2, caption_channels=32, model_max_length=8,
                           input_sq_size=32, frequency_embedding_size=32),
        vae=VAEConfig(
            spatial=dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], layers_per_block=1,
                         norm_num_groups=32, act_fn="silu", sample_size=32, scaling_factor=0.13025),
            temporal=TemporalVAEConfig(filters=32, num_res_blocks=1, channel_multipliers=[1, 1, 1],
                                       temporal_downsample=[False, True]),
            micro_frame_size=5),
        text=TextConfig(source="tiny", max_length=8,
                        t5_config=dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0)))
