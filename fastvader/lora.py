"""LoRA on the denoiser through peft, and LoRA files in the diffusers/peft layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

#: diffusers' LoRA loaders read UNet/transformer keys behind this prefix
DIFFUSERS_PREFIX = "unet."


def add_lora(denoiser: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: list[str] | None = None, init_weights: bool = True) -> list[nn.Parameter]:
    """Inject LoRA adapters (peft ``inject_adapter_in_model``, which also works for
    UNet3DConditionModel that lacks ``add_adapter``). Freezes every base weight and returns the
    trainable LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), init_lora_weights=init_weights)
    inject_adapter_in_model(config, denoiser)
    denoiser.requires_grad_(False)
    for name, module in denoiser.named_modules():
        if "lora_dropout" in name:
            module.train()  # the base model stays in eval mode; the adapters' dropout trains
    params = []
    for name, p in denoiser.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} matched no module of "
                         f"{type(denoiser).__name__}; check the module names")
    return params


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key layout (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def lora_metadata(rank: int, alpha: float, target_modules: list[str], **extra) -> dict[str, str]:
    meta = {"format": "pt", "fastvader.lora_rank": str(rank), "fastvader.lora_alpha": str(alpha),
            "fastvader.target_modules": json.dumps(list(target_modules))}
    # diffusers reads the adapter config from this key when loading with load_lora_weights; its
    # loader keeps only entries behind the component prefix ("unet.r"), so unprefixed entries are
    # dropped and alpha falls back to the rank (a wrong scale whenever alpha != rank)
    adapter = {"r": rank, "lora_alpha": alpha, "target_modules": list(target_modules)}
    meta["lora_adapter_metadata"] = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in adapter.items()})
    meta.update({f"fastvader.{k}": str(v) for k, v in extra.items()})
    return meta


def save_lora(denoiser: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``unet.``-prefixed peft keys as safetensors (diffusers ``load_lora_weights`` layout),
    atomically."""
    from safetensors.torch import save_file

    from fastvader.io.checkpoint import atomic_path

    state = {DIFFUSERS_PREFIX + k: v for k, v in lora_state_dict(denoiser).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: f.get_tensor(k)
                 for k in f.keys()}
    return state, meta


def load_lora(denoiser: nn.Module, path: str | Path) -> dict[str, str]:
    """Inject adapters as recorded in the file's metadata and load its weights."""
    from peft.utils import set_peft_model_state_dict

    state, meta = read_lora(path)
    if "fastvader.lora_rank" not in meta:
        raise ValueError(f"{path} has no fastvader LoRA metadata (rank, alpha, targets)")
    add_lora(denoiser, int(meta["fastvader.lora_rank"]), float(meta["fastvader.lora_alpha"]),
             target_modules=json.loads(meta["fastvader.target_modules"]))
    result = set_peft_model_state_dict(denoiser, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path} holds keys the model does not have, e.g. {unexpected[:3]}")
    return meta
