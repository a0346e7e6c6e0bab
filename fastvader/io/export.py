"""Portable LoRA files: the trained adapter in the three layouts video tools load.

``diffusers`` (what ``train`` writes): ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
  ``lora_adapter_metadata`` (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``), read by
  diffusers' ``load_lora_weights`` / ``load_lora_adapter`` and by peft's
  ``set_peft_model_state_dict`` once the prefix is stripped. ``--prefix transformer`` for DiT
  pipelines (Wan, CogVideoX), whose loaders look for ``transformer.`` keys.
``comfyui``: ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (ComfyUI's own LoRA layout; ``lora_down`` is peft's ``lora_A``).
``kohya``: ``lora_unet_<module with dots as underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` with kohya's ``ss_*`` metadata.

Every file carries the fastvader metadata (base model, rank, alpha, target modules, reward,
steps) as safetensors string metadata. ``read_any_lora`` is the inverse of each converter.
Module names are the diffusers model's; ComfyUI and kohya use the same names for models they load
in diffusers naming, while families whose original checkpoints name modules differently need a
key map (not included).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMATS = ("diffusers", "comfyui", "kohya")
_COMFY_PREFIX = "diffusion_model."
_KOHYA_PREFIX = "lora_unet_"


def _modules_of(peft_state: dict[str, torch.Tensor]) -> list[str]:
    bad = [k for k in peft_state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise ValueError(f"only plain LoRA (lora_A/lora_B) adapters can be exported; found e.g. {bad[:2]}")
    return sorted({k.rsplit(".lora_", 1)[0] for k in peft_state})


def peft_to_format(peft_state: dict[str, torch.Tensor], fmt: str, alpha: float,
                   prefix: str = "unet") -> dict[str, torch.Tensor]:
    """peft keys (``<module>.lora_A.weight``) -> the keys of ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for module in _modules_of(peft_state):
        a, b = peft_state[f"{module}.lora_A.weight"], peft_state[f"{module}.lora_B.weight"]
        if fmt == "diffusers":
            out[f"{prefix}.{module}.lora_A.weight"], out[f"{prefix}.{module}.lora_B.weight"] = a, b
            continue
        base = _COMFY_PREFIX + module if fmt == "comfyui" else _KOHYA_PREFIX + module.replace(".", "_")
        out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"] = a, b
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return {k: v.contiguous() for k, v in out.items()}


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith(_KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith(_COMFY_PREFIX) for k in keys):
        return "comfyui"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    raise ValueError(f"not a LoRA file fastvader knows (keys such as {keys[:2]})")


def format_to_peft(state: dict[str, torch.Tensor], fmt: str, module_names: list[str] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The inverse: keys of ``fmt`` -> (peft keys, alpha per module; empty when the file has none).
    kohya's underscored names are resolved against ``module_names`` (the model's dotted names)."""
    peft: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    if fmt == "diffusers":
        for key, value in state.items():
            module_key = key.split(".", 1)[1] if key.split(".", 1)[0] in ("unet", "transformer") else key
            peft[module_key] = value
        return peft, alphas
    lookup = {}
    if fmt == "kohya":
        if not module_names:
            raise ValueError("a kohya file names modules with underscores; pass the model's module names "
                             "(or use a file exported by fastvader, which records them)")
        lookup = {name.replace(".", "_"): name for name in module_names}
    for key, value in state.items():
        leaf = next((s for s in (".alpha", ".lora_down.weight", ".lora_up.weight") if key.endswith(s)), None)
        if leaf is None:
            raise ValueError(f"unexpected key {key!r} in a {fmt} LoRA file")
        base = key[: -len(leaf)]
        if fmt == "comfyui":
            module = base[len(_COMFY_PREFIX):]
        else:
            module = lookup.get(base[len(_KOHYA_PREFIX):])
            if module is None:
                raise ValueError(f"kohya key {key!r} matches no module of the model")
        if leaf == ".alpha":
            alphas[module] = float(value)
        else:
            peft[f"{module}.lora_{'A' if leaf == '.lora_down.weight' else 'B'}.weight"] = value
    return peft, alphas


def export_metadata(meta: dict[str, str], fmt: str, modules: list[str], prefix: str = "unet") -> dict[str, str]:
    """Carry the fastvader metadata over, in the target tool's conventions."""
    out = {k: v for k, v in meta.items() if k.startswith("fastvader.") or k == "format"}
    out["fastvader.format"] = fmt
    out["fastvader.lora_modules"] = json.dumps(modules)
    rank, alpha = meta.get("fastvader.lora_rank", ""), meta.get("fastvader.lora_alpha", "")
    if fmt == "diffusers":
        adapter = {"r": int(rank), "lora_alpha": float(alpha),
                   "target_modules": json.loads(meta.get("fastvader.target_modules", "[]"))}
        out["lora_adapter_metadata"] = json.dumps({f"{prefix}.{k}": v for k, v in adapter.items()})
    elif fmt == "kohya":
        out.update({"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": alpha,
                    "ss_sd_model_name": meta.get("fastvader.base_model", ""),
                    "ss_steps": meta.get("fastvader.steps", ""),
                    "ss_training_comment": f"fastvader reward alignment; reward={meta.get('fastvader.reward', '')}"})
    return out


def _source_file(src: str | Path) -> Path:
    src = Path(src)
    if src.is_dir():
        src = src / "lora.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; give a run directory (runs/<name>) or a .safetensors file")
    return src


def read_any_lora(path: str | Path, module_names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any of the three layouts -> (peft state, info: format, rank, alpha, modules, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    fmt = detect_format(state)
    if module_names is None and "fastvader.lora_modules" in meta:
        module_names = json.loads(meta["fastvader.lora_modules"])
    peft, alphas = format_to_peft(state, fmt, module_names)
    modules = _modules_of(peft)
    ranks = {peft[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise ValueError(f"{path}: modules have different ranks {sorted(ranks)}; only one rank is supported")
    rank = ranks.pop()
    if "fastvader.lora_alpha" in meta:
        alpha = float(meta["fastvader.lora_alpha"])
    elif alphas:
        if len(set(alphas.values())) != 1:
            raise ValueError(f"{path}: modules have different alphas; only one alpha is supported")
        alpha = next(iter(alphas.values()))
    else:
        alpha = float(rank)  # the convention of files that record no alpha
    return peft, {"format": fmt, "rank": rank, "alpha": alpha, "modules": modules, "metadata": meta}


def load_any_lora(denoiser: nn.Module, path: str | Path) -> dict[str, Any]:
    """Inject adapters matching the file (exact module names, its rank and alpha) into a fresh
    denoiser and load the weights; returns the file's info."""
    from peft.utils import set_peft_model_state_dict

    from fastvader.lora import add_lora

    names = [n for n, _ in denoiser.named_modules()]
    peft, info = read_any_lora(path, names)
    missing = [m for m in info["modules"] if m not in set(names)]
    if missing:
        raise ValueError(f"{path} adapts modules this model does not have, e.g. {missing[:2]}")
    add_lora(denoiser, info["rank"], info["alpha"], target_modules=info["modules"])
    result = set_peft_model_state_dict(denoiser, peft)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path} holds keys the model does not take, e.g. {result.unexpected_keys[:2]}")
    return info


def export_lora(src: str | Path, fmt: str, out: str | Path, prefix: str = "unet") -> Path:
    """Convert a fastvader LoRA file (or a run directory's lora.safetensors) to ``fmt``."""
    from safetensors.torch import save_file

    from fastvader.io.checkpoint import atomic_path
    from fastvader.monitoring.guards import check_finite_state

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    src = _source_file(src)
    peft, info = read_any_lora(src)
    meta = dict(info["metadata"])
    meta.setdefault("fastvader.lora_rank", str(info["rank"]))
    meta.setdefault("fastvader.lora_alpha", str(info["alpha"]))
    meta.setdefault("fastvader.target_modules", json.dumps(info["modules"]))
    check_finite_state(peft, f"{fmt} export of {src}")
    state = peft_to_format(peft, fmt, info["alpha"], prefix)
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=export_metadata(meta, fmt, info["modules"], prefix))
    return out
