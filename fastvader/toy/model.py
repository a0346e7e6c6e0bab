"""The embedded world's models: a word-level tokenizer over a fixed vocabulary, a small text
encoder, a small UNet3DConditionModel and a small AutoencoderKL."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fastvader.toy import world as _world

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHT_FILES = ["world.json", "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"]


@dataclass
class ToyWorldConfig:
    """Sizes of the embedded world's models. ``frames``/``height``/``width`` and ``vocab`` follow
    the synthetic world (fastvader.toy.world); the VAE maps 32x32 frames to 4x8x8 latents and
    ``vae["scaling_factor"]`` is set by training so scaled latents have about unit std."""

    vocab: list = field(default_factory=lambda: list(_world.VOCAB))
    # "a red square moving left on a gray background" is 9 words; 12 leaves room.
    max_length: int = 12
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    frames: int = _world.FRAMES
    height: int = _world.HEIGHT
    width: int = _world.WIDTH
    unet: dict = field(default_factory=lambda: dict(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=64, attention_head_dim=8))
    vae: dict = field(default_factory=lambda: dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=1.0))
    scheduler: dict = field(default_factory=lambda: dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"))


class WordTokenizer:
    """Lower-cased words -> ids over a fixed vocabulary; 0 pads, 1 is unknown."""

    def __init__(self, vocab: list[str], max_length: int):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, text in enumerate(prompts):
            words = text.lower().replace(",", " ").split()[: self.max_length]
            for col, word in enumerate(words):
                ids[row, col] = self.index.get(word, 1)
        return ids


class ToyTextEncoder(nn.Module):
    """Token + position embeddings and a small transformer: (B, L) ids -> (B, L, D).

    Every output token also gets ``sentence_gate`` times the mean of the prompt's word tokens.
    Cross-attention that has learned to ignore a word (its attention weight near zero) gets no
    gradient to start looking at it: the world trained without the gate ignored "left / right /
    up / down" completely. The pooled sentence puts every word into the tokens the UNet does
    attend to. The gate starts at zero, so a world saved without it loads as exactly the same model."""

    PAD = 0

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.sentence_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.encoder(self.token(ids) + self.position[:, : ids.shape[1]]))
        words = (ids != self.PAD).unsqueeze(-1).to(tokens.dtype)
        sentence = (tokens * words).sum(dim=1, keepdim=True) / words.sum(dim=1, keepdim=True).clamp(min=1.0)
        return tokens + self.sentence_gate * sentence


class FramePosition(nn.Module):
    """A learned per-frame vector added to the input of a temporal transformer block's attention
    (diffusers' ``BasicTransformerBlock.pos_embed`` hook): (B*h*w, F, C) -> same.

    UNet3DConditionModel's temporal attention has no frame positions, and its temporal
    convolutions tell frames apart only through their zero padding, so "moving left" and
    "moving right" differ only in which frame comes first, something the model barely sees.
    Zero-initialised: a world saved without it loads as exactly the same model."""

    def __init__(self, frames: int, channels: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, frames, channels))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = hidden_states.shape[1]
        if frames > self.table.shape[1]:
            raise ValueError(f"this toy world's frame positions cover {self.table.shape[1]} frames "
                             f"(ToyWorldConfig.frames); got a video of {frames}: set video.frames <= "
                             f"{self.table.shape[1]}")
        return hidden_states + self.table[:, :frames].to(hidden_states.dtype)


def add_frame_positions(unet: nn.Module, frames: int) -> list[str]:
    """Give every block of every temporal transformer in ``unet`` a ``FramePosition``; returns
    the names of the blocks that got one."""
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    named = []
    for name, module in unet.named_modules():
        if isinstance(module, TransformerTemporalModel):
            for index, block in enumerate(module.transformer_blocks):
                block.pos_embed = FramePosition(frames, block.norm1.normalized_shape[0])
                named.append(f"{name}.transformer_blocks.{index}")
    return named


@dataclass
class ToyWorld:
    config: ToyWorldConfig
    tokenizer: WordTokenizer
    text_encoder: ToyTextEncoder
    unet: nn.Module
    vae: nn.Module


def build_toy_world(config: ToyWorldConfig | None = None, seed: int = 0) -> ToyWorld:
    """The toy architecture with random weights, in eval mode."""
    from diffusers import AutoencoderKL, UNet3DConditionModel

    config = config or ToyWorldConfig()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text = ToyTextEncoder(len(config.vocab), config.max_length, config.text_dim,
                              config.text_layers, config.text_heads)
        unet = UNet3DConditionModel(**config.unet)
        add_frame_positions(unet, config.frames)
        vae = AutoencoderKL(**config.vae)
    # Inference mode: UNet3DConditionModel's temporal convolutions carry dropout (p=0.1), which
    # would make sampling random. Training code switches modules to train() itself.
    for module in (text, unet, vae):
        module.eval()
    return ToyWorld(config, WordTokenizer(config.vocab, config.max_length), text, unet, vae)


def save_toy_world(world: ToyWorld, path: str | Path = WEIGHTS_DIR,
                   dtype: torch.dtype | None = torch.float16) -> None:
    """Write world.json and one safetensors file per model. Floating-point tensors are stored
    as ``dtype`` (fp16 by default: halves the shipped size; loading casts back to the models'
    fp32); ``dtype=None`` keeps them as they are."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "world.json").write_text(json.dumps(asdict(world.config), indent=1))
    for name in ("text_encoder", "unet", "vae"):
        state = {}
        for key, value in getattr(world, name).state_dict().items():
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key] = value.contiguous()
        save_file(state, str(path / f"{name}.safetensors"))


def load_toy_world(path: str | Path | None = None) -> ToyWorld:
    """Load the shipped (or a given) toy world. Raises FileNotFoundError naming what is missing."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_DIR
    missing = [n for n in WEIGHT_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"toy world at {path} is missing {missing}; "
                                "run `python -m fastvader.toy.train_world` to create it")
    config = ToyWorldConfig(**json.loads((path / "world.json").read_text()))
    world = build_toy_world(config)
    for name in ("text_encoder", "unet", "vae"):
        state = load_file(str(path / f"{name}.safetensors"))
        # Saved before the sentence gate and frame positions existed: both start at zero, which
        # is that model exactly.
        for key, value in getattr(world, name).state_dict().items():
            if key.endswith(("sentence_gate", "pos_embed.table")) and key not in state:
                state[key] = torch.zeros_like(value)
        getattr(world, name).load_state_dict(state, strict=True)
    return world
