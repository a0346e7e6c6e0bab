"""VideoCrafter2's first stage: the SD KL-f8 VAE as a diffusers ``AutoencoderKL`` that reads and
writes the original LDM key names.

The network is exactly diffusers' (so ``decode_frames``, slicing, gradient checkpointing and
fastvader's GroupNorm patches work on it unchanged); only the names differ. Two state-dict
hooks translate: ``state_dict()`` returns LDM names (``encoder.down.0.block.1.nin_shortcut``,
``mid.attn_1.q`` as a 1x1 conv with a 4-D weight, ``decoder.up.N`` counted from the output
side), and ``load_state_dict()`` accepts LDM names (diffusers names still load too). That is
what lets the whole ``LatentDiffusion`` checkpoint load with strict key matching.
"""
from __future__ import annotations

import re
from typing import Callable

from fastvader.backbones.videocrafter2.config import VAEConfig

# diffusers name fragment <-> LDM name fragment, for the parts that do not depend on the level
_MID = [
    (r"mid_block\.resnets\.0\.", "mid.block_1."),
    (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
    (r"mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
    (r"mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
    (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"conv_norm_out\.", "norm_out."),
]
_ATTN_LINEAR = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def diffusers_to_ldm_name(name: str, num_levels: int) -> str:
    """``encoder.down_blocks.1.resnets.0.conv_shortcut.weight`` -> ``encoder.down.1.block.0.nin_shortcut.weight``."""
    for side in ("encoder.", "decoder."):
        if not name.startswith(side):
            continue
        rest = name[len(side):]
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
        if m:
            kind, level, part, idx, tail = m.groups()
            level = int(level) if kind == "down" else num_levels - 1 - int(level)
            tail = tail.replace("conv_shortcut.", "nin_shortcut.")
            if part == "resnets":
                return f"{side}{kind}.{level}.block.{idx}.{tail}"
            return f"{side}{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
        for pattern, ldm in _MID:
            rest2, n = re.subn("^" + pattern, ldm, rest)
            if n:
                return side + rest2.replace("conv_shortcut.", "nin_shortcut.")
        return name
    return name


def ldm_to_diffusers_name(name: str, num_levels: int) -> str:
    """Inverse of :func:`diffusers_to_ldm_name` (names already in diffusers form pass through)."""
    for side in ("encoder.", "decoder."):
        if not name.startswith(side):
            continue
        rest = name[len(side):]
        m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", rest)
        if m:
            kind, level, part, idx, tail = m.groups()
            level = int(level) if kind == "down" else num_levels - 1 - int(level)
            tail = tail.replace("nin_shortcut.", "conv_shortcut.")
            if idx is not None:
                return f"{side}{kind}_blocks.{level}.resnets.{idx}.{tail}"
            return f"{side}{kind}_blocks.{level}.{kind}samplers.0.{tail}"
        for diffusers, ldm in _MID:
            plain = diffusers.replace("\\", "")
            if rest.startswith(ldm):
                return side + plain + rest[len(ldm):].replace("nin_shortcut.", "conv_shortcut.")
        return name
    return name


def _rename_in_place(state: dict, prefix: str, rename: Callable[[str], str], reshape: Callable) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        new = prefix + rename(key[len(prefix):])
        value = reshape(new[len(prefix):], state.pop(key))
        state[new] = value


def attach_ldm_key_layout(vae, num_levels: int):
    """Make ``vae`` (a diffusers AutoencoderKL) save and load LDM key names. Returns ``vae``."""

    def to_ldm(module, state, prefix, local_metadata):
        def reshape(name, value):
            # LDM's attention projections are 1x1 convs: (C, C) -> (C, C, 1, 1)
            return value[:, :, None, None] if _ATTN_LINEAR.search(name) and value.ndim == 2 else value
        _rename_in_place(state, prefix, lambda n: diffusers_to_ldm_name(n, num_levels), reshape)

    def from_ldm(module, state, prefix, *args):
        def reshape(name, value):
            if value.ndim == 4 and re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name):
                return value[:, :, 0, 0]
            return value
        _rename_in_place(state, prefix, lambda n: ldm_to_diffusers_name(n, num_levels), reshape)

    vae._register_state_dict_hook(to_ldm)
    vae.register_load_state_dict_pre_hook(from_ldm)
    vae._fastvader_ldm_layout = True
    return vae


def build_vae(cfg: VAEConfig, scaling_factor: float):
    """The first-stage VAE (diffusers AutoencoderKL speaking LDM key names)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**cfg.diffusers_kwargs(scaling_factor))
    return attach_ldm_key_layout(vae, len(cfg.ch_mult))

