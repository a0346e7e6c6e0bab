"""Backbone registry: ``build_backbone(cfg)`` returns the adapter a config names."""
from __future__ import annotations

import importlib

import torch

from fastvader.backbones.base import Backbone, PromptEmbeddings

# name -> "module:Class". The class implements Backbone and ``from_config(BackboneConfig)``.
_REGISTRY: dict[str, str] = {
    "toy": "fastvader.backbones.toy:ToyBackbone",
    "modelscope": "fastvader.backbones.modelscope:ModelScopeBackbone",
    "zeroscope": "fastvader.backbones.modelscope:ZeroScopeBackbone",
    "animatediff": "fastvader.backbones.animatediff:AnimateDiffBackbone",
    "wan": "fastvader.backbones.wan:WanBackbone",
    "wan_i2v": "fastvader.backbones.wan:WanI2VBackbone",
    "cogvideox": "fastvader.backbones.cogvideox:CogVideoXBackbone",
    "cogvideox_i2v": "fastvader.backbones.cogvideox:CogVideoXI2VBackbone",
    "svd": "fastvader.backbones.svd:SVDBackbone",
    "videocrafter2": "fastvader.backbones.videocrafter2:VideoCrafter2Backbone",
    "opensora": "fastvader.backbones.opensora:OpenSoraBackbone",
}


def register_backbone(name: str, target: str) -> None:
    _REGISTRY[name] = target


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_class(name: str) -> type[Backbone]:
    """The adapter class for ``name`` (imports its module, builds nothing)."""
    if name not in _REGISTRY:
        raise ValueError(f"backbone.name={name!r} is not a known backbone; choose one of {available_backbones()}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_backbone(cfg, storage=None, *, progress: bool = True) -> Backbone:
    """Build the backbone named by ``cfg.name`` (a BackboneConfig). A hub id that is neither
    cached nor reachable fails at once, naming backbone.pretrained (fastvader.hub). ``storage``:
    an :class:`fastvader.memory.fp8.Fp8Storage` for the denoiser's frozen weights (families that
    stream their weights build straight into it; the others are converted once built)."""
    from fastvader.console import stage
    from fastvader.hub import hub_or_cache

    cls = backbone_class(cfg.name)
    hub = {} if cfg.random_init or not cls.hub_weights else {"backbone.pretrained": cfg.pretrained}
    source = "random weights" if cfg.random_init else cfg.pretrained or "default weights"
    on_meta = torch.empty(0).is_meta  # built under torch.device("meta") (the planner): nothing to stream
    with stage(f"loading {cfg.name} ({source})", enabled=progress), hub_or_cache(hub):
        if storage is not None and cls.streams_weights and not on_meta:
            return cls.from_config(cfg, storage=storage)
        backbone = cls.from_config(cfg)
    if storage is not None:
        storage.convert(backbone.denoiser)
    return backbone


__all__ = ["Backbone", "PromptEmbeddings", "build_backbone", "backbone_class", "register_backbone", "available_backbones"]
