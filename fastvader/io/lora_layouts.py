"""The key names each tool gives a LoRA, per backbone family, both ways.

fastvader trains adapters on the diffusers (or fastvader) module names, e.g.
``blocks.0.attn1.to_q``. A file for another tool must name each adapted module as that tool's
loader looks it up, and that depends on the model family. The map below was read from the
loaders themselves (``docs/trust.md`` has the table with the sources):

- **diffusers** (``load_lora_weights``/``load_lora_adapter``): ``<prefix>.<module>.lora_A.weight``
  and ``.lora_B.weight``, prefix ``unet`` for UNet pipelines, ``transformer`` for DiT pipelines.
- **ComfyUI** (``comfy/lora.py``, ``model_lora_keys_unet``): Wan keys are the original Wan names
  behind ``diffusion_model.`` (``blocks.0.self_attn.q``); for SD1.5 (AnimateDiff's image model)
  it maps kohya's ``lora_unet_<diffusers name with underscores>`` through
  ``comfy.utils.unet_to_diffusers``. AnimateDiff's motion modules are loaded by the
  AnimateDiff-Evolved node (``load_motion_lora_as_patches``) from the original motion-LoRA keys:
  ``<block>.motion_modules.<j>.temporal_transformer.transformer_blocks.<k>.attention_blocks.<a>
  .processor.to_q_lora.down.weight`` / ``.up.weight``, applied as ``up @ down`` at full strength
  (no alpha: the scale is folded into ``up``).
- **kohya**: sd-scripts (``networks/lora.py``) names a module ``lora_unet_`` + its dotted name with
  underscores, for SD1.5 the diffusers names; musubi-tuner, kohya's video trainer, does the same on
  the original Wan names (``lora_unet_blocks_0_self_attn_q``), which is what diffusers'
  ``_convert_musubi_wan_lora_to_diffusers`` reads.

ComfyUI (without custom nodes) and kohya have no loader for the UNet3DConditionModel families
(toy, ModelScope, ZeroScope), VideoCrafter2 or Open-Sora: a file for them would load nowhere, so
it is refused; ``fastvader.load_lora`` loads the diffusers layout into those models.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

FORMATS = ("diffusers", "comfyui", "kohya")
#: the diffusers key prefix per family (UNet pipelines read ``unet.``, DiT pipelines ``transformer.``)
DIT_FAMILIES = ("wan",)
#: leaf names of each key style: the two factors (A/down, B/up) and the alpha
PEFT_LEAVES = (".lora_A.weight", ".lora_B.weight")
KOHYA_LEAVES = (".lora_down.weight", ".lora_up.weight", ".alpha")
MOTION_LEAVES = ("_lora.down.weight", "_lora.up.weight")

_COMFY = "diffusion_model."
_KOHYA = "lora_unet_"

# Wan: diffusers name -> original name (diffusers' _convert_non_diffusers_wan_lora_to_diffusers, inverted)
_WAN_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_WAN_ATTENTION = re.compile(r"^blocks\.(\d+)\.attn([12])\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)$")
_WAN_FFN = re.compile(r"^blocks\.(\d+)\.ffn\.net\.(0\.proj|2)$")
_WAN_OTHERS = {"condition_embedder.text_embedder.linear_1": "text_embedding.0",
               "condition_embedder.text_embedder.linear_2": "text_embedding.2",
               "condition_embedder.time_embedder.linear_1": "time_embedding.0",
               "condition_embedder.time_embedder.linear_2": "time_embedding.2",
               "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}

# AnimateDiff: diffusers UNetMotionModel motion-module attention -> the original motion-LoRA base
_MOTION_ATTENTION = re.compile(r"^((?:down|up)_blocks\.\d+|mid_block)\.motion_modules\.(\d+)\.transformer_blocks\."
                               r"(\d+)\.attn([12])\.(to_q|to_k|to_v|to_out\.0)$")


def wan_original_name(module: str) -> str | None:
    """``blocks.3.attn1.to_out.0`` -> ``blocks.3.self_attn.o``; None for a module Wan's original
    checkpoint has no counterpart of."""
    m = _WAN_ATTENTION.match(module)
    if m:
        block, which, proj = m.groups()
        return f"blocks.{block}.{'self_attn' if which == '1' else 'cross_attn'}.{_WAN_PROJECTIONS[proj]}"
    m = _WAN_FFN.match(module)
    if m:
        return f"blocks.{m.group(1)}.ffn.{'0' if m.group(2) == '0.proj' else '2'}"
    return _WAN_OTHERS.get(module)


def motion_lora_base(module: str) -> str | None:
    """``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q``
    (keys add ``_lora.down.weight``/``_lora.up.weight``); None for a module outside the motion
    modules' attention projections."""
    m = _MOTION_ATTENTION.match(module)
    if m is None:
        return None
    block, j, k, which, proj = m.groups()
    return (f"{block}.motion_modules.{j}.temporal_transformer.transformer_blocks.{k}.attention_blocks."
            f"{int(which) - 1}.processor.{proj.removesuffix('.0')}")


def _underscored(name: str) -> str:
    return _KOHYA + name.replace(".", "_")


def _animatediff(fmt: str) -> Callable[[str], tuple[str, str] | None]:
    """The image model's modules in kohya naming (ComfyUI maps them for SD1.5); the motion
    modules as AnimateDiff-Evolved reads them (ComfyUI only: kohya has no motion modules)."""
    def base(module: str) -> tuple[str, str] | None:
        if ".motion_modules." not in module:
            return _underscored(module), "kohya"
        motion = motion_lora_base(module)
        return (motion, "motion") if fmt == "comfyui" and motion else None
    return base


def _wan(fmt: str) -> Callable[[str], tuple[str, str] | None]:
    def base(module: str) -> tuple[str, str] | None:
        original = wan_original_name(module)
        if original is None:
            return None
        return (_COMFY + original if fmt == "comfyui" else _underscored(original)), "kohya"
    return base


#: family -> format -> (module name -> (key base, key style) or None when the tool cannot address it)
TOOL_LAYOUTS: dict[str, dict[str, Callable[[str], tuple[str, str] | None]]] = {
    "animatediff": {"comfyui": _animatediff("comfyui"), "kohya": _animatediff("kohya")},
    "wan": {"comfyui": _wan("comfyui"), "kohya": _wan("kohya")},
}


def diffusers_prefix(family: str | None) -> str:
    return "transformer" if family in DIT_FAMILIES else "unet"


def loads_in(family: str | None) -> list[str]:
    """The formats whose tools load LoRAs of ``family``."""
    return ["diffusers"] + sorted(TOOL_LAYOUTS.get(family or "", {}))


def key_base(family: str | None, fmt: str, module: str, prefix: str | None = None) -> tuple[str, str] | None:
    """The key base and style ("peft", "kohya" or "motion") under which ``fmt`` names ``module``
    of a ``family`` model; None when that tool has no name for it."""
    if fmt == "diffusers":
        return f"{prefix or diffusers_prefix(family)}.{module}", "peft"
    layout = TOOL_LAYOUTS.get(family or "", {}).get(fmt)
    return layout(module) if layout else None


def to_format(peft: dict[str, torch.Tensor], modules: list[str], fmt: str, family: str | None, alpha: float,
              prefix: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """peft keys -> the keys of ``fmt`` for ``family``: (state, modules the tool cannot name)."""
    out: dict[str, torch.Tensor] = {}
    unnamed = []
    for module in modules:
        a, b = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"]
        named = key_base(family, fmt, module, prefix)
        if named is None:
            unnamed.append(module)
            continue
        base, style = named
        if style == "peft":
            out[base + PEFT_LEAVES[0]], out[base + PEFT_LEAVES[1]] = a, b
        elif style == "kohya":
            out[base + KOHYA_LEAVES[0]], out[base + KOHYA_LEAVES[1]] = a, b
            out[base + KOHYA_LEAVES[2]] = torch.tensor(float(alpha), dtype=torch.float32)
        else:  # applied as up @ down with no scale: fold alpha/rank into up
            out[base + MOTION_LEAVES[0]], out[base + MOTION_LEAVES[1]] = a, b * (alpha / a.shape[0])
    return {k: v.contiguous() for k, v in out.items()}, unnamed


def split_key(key: str) -> tuple[str, str, int | None]:
    """A LoRA key -> (key base, style, factor: 0 for A/down, 1 for B/up, None for alpha)."""
    for style, leaves in (("peft", PEFT_LEAVES), ("motion", MOTION_LEAVES), ("kohya", KOHYA_LEAVES)):
        for factor, leaf in enumerate(leaves):
            if key.endswith(leaf):
                return key[: -len(leaf)], style, (None if leaf == ".alpha" else factor)
    raise ValueError(f"key {key!r} is not a LoRA factor or alpha (expected names ending in "
                     f"{PEFT_LEAVES + KOHYA_LEAVES[:2] + MOTION_LEAVES})")


def module_lookup(modules: Iterable[str], family: str | None) -> dict[str, str]:
    """Every key base any supported tool gives a module of the model -> the module name: the
    bare name, the diffusers prefixes, ComfyUI's ``diffusion_model.`` and kohya's underscored
    name of the diffusers names, and the family's own tool names (ComfyUI loads all of these)."""
    lookup: dict[str, str] = {}
    for module in modules:
        for base in (module, f"unet.{module}", f"transformer.{module}", _COMFY + module, _underscored(module)):
            lookup.setdefault(base, module)
        for fmt in TOOL_LAYOUTS.get(family or "", {}):
            named = key_base(family, fmt, module)
            if named is not None:
                lookup.setdefault(named[0], module)
    return lookup


def detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.endswith(MOTION_LEAVES) or k.startswith(_COMFY) for k in keys):
        return "comfyui"
    if any(k.startswith(_KOHYA) for k in keys):
        return "kohya"
    return "diffusers"


def from_format(state: dict[str, torch.Tensor], lookup: dict[str, str] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], set[str], list[str]]:
    """The inverse of :func:`to_format` for any supported layout: (peft state, alpha per module
    where the file stores one, modules whose scale is folded into B, key bases no module of the
    model answers to). Without ``lookup`` (the model's names) only diffusers/peft keys resolve."""
    peft: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    folded: set[str] = set()
    unknown: list[str] = []
    for key, value in state.items():
        base, style, factor = split_key(key)
        if lookup is not None:
            module = lookup.get(base)
        else:
            module = re.sub(r"^(unet|transformer)\.", "", base) if style == "peft" else None
        if module is None:
            unknown.append(base)
        elif factor is None:
            alphas[module] = float(value)
        else:
            peft[f"{module}{PEFT_LEAVES[factor]}"] = value
            if style == "motion":
                folded.add(module)
    return peft, alphas, folded, unknown
