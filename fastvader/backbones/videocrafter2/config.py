"""VideoCrafter2's hyperparameters as typed dataclasses.

The defaults ARE the released model (``configs/inference_t2v_512_v2.0.yaml`` of
AILab-CVC/VideoCrafter, which VADER uses unchanged, packaged as
fastvader/model_configs/videocrafter2_inference_t2v_512_v2.0.yaml; a test pins the two together).
:func:`load_yaml_config` reads that YAML (or an edited copy) and refuses the options the original
code offers that fastvader does not implement, instead of building something else silently.
:func:`tiny_config` is the same architecture at a size that runs on a CPU in tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastvader.model_configs import packaged_config


@dataclass
class UNetConfig:
    """``lvdm.modules.networks.openaimodel3d.UNetModel`` arguments (those VideoCrafter2 uses)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_head_channels: int = 64
    transformer_depth: int = 1
    temporal_transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_length: int = 16
    addition_attention: bool = True
    fps_cond: bool = True
    dropout: float = 0.0
    #: the temporal conv blocks hard-code Dropout(0.1) in the original; it only acts in train()
    temporal_conv_dropout: float = 0.1
    #: GroupNorm groups everywhere in the UNet (the original hard-codes 32)
    norm_groups: int = 32
    #: heads of the extra temporal transformer after the first conv (the original hard-codes 8)
    init_attn_heads: int = 8


@dataclass
class VAEConfig:
    """``lvdm.models.autoencoder.AutoencoderKL`` ddconfig (the SD 1.x/2.x KL-f8 VAE)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    def diffusers_kwargs(self, scaling_factor: float) -> dict[str, Any]:
        """The same network as diffusers ``AutoencoderKL`` arguments."""
        n = len(self.ch_mult)
        return dict(in_channels=self.in_channels, out_channels=self.out_ch, latent_channels=self.z_channels,
                    down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                    block_out_channels=[self.ch * m for m in self.ch_mult], layers_per_block=self.num_res_blocks,
                    norm_num_groups=self.norm_groups, act_fn="silu", scaling_factor=scaling_factor,
                    sample_size=512)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextConfig:
    """The text tower of open_clip ``ViT-H-14`` (``model_configs/ViT-H-14.json`` text_cfg)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    embed_dim: int = 1024
    mlp_ratio: float = 4.0
    #: "penultimate" (VideoCrafter2) or "last"
    layer: str = "penultimate"


@dataclass
class DiffusionConfig:
    """``lvdm.models.ddpm3d.LatentDiffusion`` schedule arguments."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    #: "eps" (VideoCrafter2: the YAML leaves the code default) or "v"
    parameterization: str = "eps"
    scale_factor: float = 0.18215
    #: use_scale / scale_b: the training forward process multiplies x0 by scale_arr[t]
    use_scale: bool = True
    scale_b: float = 0.7
    #: the released model keeps the original's buggy 1400-long scale_arr (fix_scale_bug=False)
    fix_scale_bug: bool = False


@dataclass
class VideoCrafter2Config:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    #: latent size of the training resolution (40x64 latents = 320x512 video)
    image_size: list = field(default_factory=lambda: [40, 64])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VideoCrafter2Config":
        return cls(unet=UNetConfig(**data.get("unet", {})), vae=VAEConfig(**data.get("vae", {})),
                   text=TextConfig(**data.get("text", {})), diffusion=DiffusionConfig(**data.get("diffusion", {})),
                   image_size=list(data.get("image_size", [40, 64])))


# ---------------------------------------------------------------------------------------------
# reading the original YAML
# ---------------------------------------------------------------------------------------------
#: original UNet options fastvader implements only at these values (anything else is refused)
_UNET_FIXED = {"use_relative_position": False, "use_causal_attention": False, "temporal_selfatt_only": True,
               "use_scale_shift_norm": False, "resblock_updown": False, "tempspatial_aware": False,
               "use_image_attention": False, "dims": 2, "conv_resample": True, "num_heads": -1}
#: original UNet options that change nothing fastvader builds
_UNET_IGNORED = {"use_checkpoint", "use_fp16"}


def _pick(section: dict, dataclass_type, where: str, rename: dict | None = None, fixed: dict | None = None,
          ignored: set | None = None):
    names = {f.name for f in fields(dataclass_type)}
    rename = rename or {}
    kwargs = {}
    for key, value in section.items():
        key2 = rename.get(key, key)
        if key2 in names:
            kwargs[key2] = list(value) if isinstance(value, tuple) else value
        elif fixed and key in fixed:
            if value != fixed[key]:
                raise NotImplementedError(f"{where}.{key}={value!r} is not implemented by fastvader's VideoCrafter2 "
                                          f"module (only {fixed[key]!r}, as in the released model)")
        elif ignored is not None and key in ignored:
            continue
    return dataclass_type(**kwargs)


#: the released model's configuration, packaged with fastvader
RELEASED_YAML = "videocrafter2_inference_t2v_512_v2.0.yaml"


def load_yaml_config(path: str | Path | None = None) -> VideoCrafter2Config:
    """Parse ``inference_t2v_512_v2.0.yaml`` (the ``model:`` node) into a VideoCrafter2Config;
    without ``path``, the packaged copy of the released one."""
    import yaml

    path = path if path is not None else packaged_config(RELEASED_YAML)
    with open(path) as f:
        data = yaml.safe_load(f)
    params = (data.get("model") or data).get("params")
    if not isinstance(params, dict) or "unet_config" not in params:
        raise ValueError(f"{path} is not a VideoCrafter LatentDiffusion config (no model.params.unet_config)")
    unet_params = dict(params["unet_config"].get("params", {}))
    if unet_params.get("num_head_channels", -1) == -1:
        raise NotImplementedError(f"{path}: only num_head_channels (fixed head width) is implemented, as in "
                                  "the released model")
    unet = _pick(unet_params, UNetConfig, "unet_config.params", fixed=_UNET_FIXED, ignored=_UNET_IGNORED)
    first = params["first_stage_config"]["params"]
    dd = dict(first["ddconfig"])
    if dd.get("attn_resolutions"):
        raise NotImplementedError("first_stage_config ddconfig.attn_resolutions must be empty (SD VAE)")
    vae = VAEConfig(in_channels=dd.get("in_channels", 3), out_ch=dd.get("out_ch", 3), ch=dd["ch"],
                    ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                    z_channels=dd["z_channels"], embed_dim=first.get("embed_dim", dd["z_channels"]))
    if vae.embed_dim != vae.z_channels:
        raise NotImplementedError("first_stage embed_dim must equal ddconfig.z_channels (SD VAE)")
    cond = params.get("cond_stage_config", {})
    target = cond.get("target", "")
    if target and not target.endswith("FrozenOpenCLIPEmbedder"):
        raise NotImplementedError(f"cond_stage_config.target={target!r}: only FrozenOpenCLIPEmbedder is implemented")
    cond_params = cond.get("params", {}) or {}
    if cond_params.get("arch", "ViT-H-14") != "ViT-H-14":
        raise NotImplementedError("only the open_clip ViT-H-14 text tower is implemented")
    text = TextConfig(layer=cond_params.get("layer", "last"))
    diffusion = DiffusionConfig(
        timesteps=params.get("timesteps", 1000), linear_start=params.get("linear_start", 0.00085),
        linear_end=params.get("linear_end", 0.012), parameterization=params.get("parameterization", "eps"),
        scale_factor=params.get("scale_factor", 0.18215), use_scale=params.get("use_scale", False),
        scale_b=params.get("scale_b", 0.3), fix_scale_bug=params.get("fix_scale_bug", False))
    if diffusion.parameterization not in ("eps", "v"):
        raise NotImplementedError(f"parameterization={diffusion.parameterization!r}: eps or v only")
    return VideoCrafter2Config(unet=unet, vae=vae, text=text, diffusion=diffusion,
                               image_size=list(params.get("image_size", [40, 64])))


def tiny_config() -> VideoCrafter2Config:
    """Every kind of block of the real model (temporal convs, spatial + temporal transformers,
    the init temporal attention, fps embedding, a down/up level, the KL-VAE with its mid
    attention, the causal text tower), a few thousand times smaller. 32 is the smallest width
    the hard-coded GroupNorm(32) allows."""
    return VideoCrafter2Config(
        unet=UNetConfig(model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                        num_head_channels=16, context_dim=32, temporal_length=4, init_attn_heads=2),
        vae=VAEConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, norm_groups=32),
        text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=3, embed_dim=16),
        image_size=[8, 8])
