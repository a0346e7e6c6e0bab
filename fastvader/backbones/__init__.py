"""Backbone registry: ``build_backbone(cfg)`` returns the adapter a config names."""
from __future__ import annotations

import importlib
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


def build_backbone(cfg) -> Backbone:
    """Build the backbone named by ``cfg.name`` (a BackboneConfig)."""
    return backbone_class(cfg.name).from_config(cfg)


__all__ = ["Backbone", "PromptEmbeddings", "build_backbone", "backbone_class", "register_backbone", "available_backbones"]
