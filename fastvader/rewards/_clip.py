"""CLIP machinery shared by the aesthetic, HPS, PickScore and CLIP-score rewards.

Every CLIP here is a transformers ``CLIPModel``. Checkpoints in OpenCLIP's layout (HPSv2's
``HPS_v2_compressed.pt``) are converted key by key (``open_clip_state_to_hf``): OpenCLIP's
fused ``in_proj`` attention weights are split into q/k/v, and its ``x @ proj`` projections
become ``Linear`` weights (transposed). OpenCLIP model configs (``vision_cfg``/``text_cfg``)
convert the same way, so the ViT-H-14 JSON builds the same 986,109,441 parameters.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fastvader.rewards._hf import (PretrainedReward, RewardWeightsError, from_pretrained, processor_config, read_config,
                  strip_private, transformers_module)
from fastvader.rewards._text import eos_positions, load_tokenizer
from fastvader.rewards.preprocess import CLIP_TRANSFORM, ImageTransform, frames_to_images, write_processor_config

def open_clip_to_hf_config(cfg: dict) -> dict:
    """An OpenCLIP model config (optionally wrapped as ``{"model_cfg": ...}``) as CLIPConfig kwargs."""
    cfg = cfg.get("model_cfg", cfg)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = v["width"], t["width"]
    return {
        "projection_dim": cfg["embed_dim"],
        "vision_config": {
            "hidden_size": v_width, "num_hidden_layers": v["layers"],
            "num_attention_heads": v_width // v.get("head_width", 64),
            "intermediate_size": int(v_width * v.get("mlp_ratio", 4.0)),
            "patch_size": v["patch_size"], "image_size": v["image_size"],
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg["embed_dim"],
        },
        "text_config": {
            "hidden_size": t_width, "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "intermediate_size": int(t_width * t.get("mlp_ratio", 4.0)),
            "max_position_embeddings": t["context_length"], "vocab_size": t["vocab_size"],
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg["embed_dim"],
        },
    }


def clip_config(config: Any, *, reward: str):
    """CLIPConfig from a dict / file in transformers' or OpenCLIP's layout."""
    tf = transformers_module()
    if isinstance(config, tf.CLIPConfig):
        return config
    d = strip_private(read_config(config, reward))
    if "vision_cfg" in d or "model_cfg" in d:
        d = open_clip_to_hf_config(d)
    for key in ("vision_config_dict", "text_config_dict"):  # transformers-4.16-era files
        if key in d:
            d.setdefault(key.replace("_dict", ""), d.pop(key))
    return tf.CLIPConfig(**d)


def build_clip(config: Any, *, reward: str, vision_only: bool = False):
    """A CLIPModel (or its vision tower with the projection) from a config in either layout,
    with random weights."""
    tf = transformers_module()
    cfg = clip_config(config, reward=reward)
    cfg.vision_config.projection_dim = cfg.projection_dim
    cfg.text_config.projection_dim = cfg.projection_dim
    return tf.CLIPVisionModelWithProjection(cfg.vision_config) if vision_only else tf.CLIPModel(cfg)


def open_clip_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP CLIP state dict -> transformers CLIPModel state dict."""
    out: dict[str, torch.Tensor] = {}

    def blocks(src_prefix: str, dst_prefix: str) -> None:
        layer_ids = sorted({int(k[len(src_prefix):].split(".")[0]) for k in state if k.startswith(src_prefix)})
        for i in layer_ids:
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            w = state[s + "attn.in_proj_weight"]
            b = state[s + "attn.in_proj_bias"]
            for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0), b.chunk(3, dim=0)):
                out[d + f"self_attn.{name}.weight"] = wi
                out[d + f"self_attn.{name}.bias"] = bi
            for src, dst in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[d + dst + ".weight"] = state[s + src + ".weight"]
                out[d + dst + ".bias"] = state[s + src + ".bias"]

    try:
        out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
        out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
        out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
        for src, dst in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm"),
                         ("ln_final", "text_model.final_layer_norm")):
            out[dst + ".weight"] = state[src + ".weight"]
            out[dst + ".bias"] = state[src + ".bias"]
        out["visual_projection.weight"] = state["visual.proj"].t().contiguous()
        out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
        out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
        out["text_projection.weight"] = state["text_projection"].t().contiguous()
        out["logit_scale"] = state["logit_scale"]
        blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.")
        blocks("transformer.resblocks.", "text_model.encoder.layers.")
    except KeyError as e:
        raise RewardWeightsError(
            f"not an OpenCLIP CLIP state dict: key {e} is missing (first keys: {list(state)[:5]})") from e
    return out


@contextlib.contextmanager
def fast_init():
    """Skip random initialisation when real weights are loaded right after."""
    try:  # transformers 5 moved it from modeling_utils to initialization
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover - then weights are initialised, only slower
            yield
            return
    with no_init_weights():
        yield


def _folder_of(source) -> str | None:
    """The folder holding ``source`` when it is a local file (tokenizer files may sit next to it)."""
    if source is None:
        return None
    path = Path(os.path.expanduser(os.fspath(source)))
    return str(path.parent) if path.is_file() else os.fspath(source)


class ClipReward(PretrainedReward):
    """Image rewards on a frozen CLIP: ``self.clip`` (CLIPModel, or the vision tower with its
    projection when ``vision_only``), the processor's preprocessing done differentiably, and
    prompt embeddings computed once per prompt (the text tower is frozen and needs no grad)."""

    default_tokenizer: str | None = None

    def __init__(self, pretrained: str | None, *, random_init: bool, config: Any, tokenizer: str | None,
                 dtype: str | torch.dtype, checkpointing: bool = False, vision_only: bool = False,
                 transform: ImageTransform = CLIP_TRANSFORM):
        super().__init__(dtype)
        tf = transformers_module()
        self.vision_only = vision_only
        model_cls = tf.CLIPVisionModelWithProjection if vision_only else tf.CLIPModel
        processor_cfg = None
        if random_init:
            architecture = self.architecture(config, pretrained)
            self.clip = build_clip(architecture, reward=self.name, vision_only=vision_only).to(self.model_dtype)
        else:
            self.clip = self.load_pretrained(model_cls, pretrained, config)
            processor_cfg = processor_config(pretrained)
        if processor_cfg is None:  # no processor file: crop to the size the model was built for
            vcfg = self.clip.config if vision_only else self.clip.config.vision_config
            transform = replace(transform, shortest_edge=vcfg.image_size, crop=(vcfg.image_size, vcfg.image_size))
        self.transform = transform.updated_from_processor_config(processor_cfg)
        self.tokenizer = None
        if not vision_only:
            text_cfg = self.clip.config.text_config
            self.tokenizer = load_tokenizer(
                tokenizer, reward=self.name, context_length=text_cfg.max_position_embeddings,
                vocab_size=text_cfg.vocab_size, random_init=random_init,
                fallbacks=() if random_init else (_folder_of(pretrained), self.default_tokenizer))
        self._prompt_cache: dict[str, torch.Tensor] = {}
        if checkpointing:
            self.enable_checkpointing()

    def checkpointed_layers(self):
        return list(self.clip.vision_model.encoder.layers)

    @classmethod
    def real_architecture(cls):
        return build_clip(cls.architecture(), reward=cls.name)

    def load_pretrained(self, model_cls, pretrained, config):
        self.reject_config_with_weights(config)
        return from_pretrained(model_cls, pretrained, reward=self.name, dtype=self.model_dtype)

    # -- embeddings ----------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> L2-normalised float32 embeddings (N, D), with gradients."""
        pixels = self.to_model(self.transform(images.float()))
        vision = self.clip.vision_model(pixel_values=pixels)
        emb = self.clip.visual_projection(vision.pooler_output).float()
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            device = self.clip.text_projection.weight.device
            ids = self.tokenizer(missing)
            # read on the CPU ids: no device sync, and possible on the meta device (the planner)
            eos = eos_positions(ids, self.tokenizer.eos_token_id).to(device)
            hidden = self.clip.text_model(input_ids=ids.to(device)).last_hidden_state
            pooled = hidden[torch.arange(ids.shape[0], device=device), eos]
            emb = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)
            for p, e in zip(missing, emb):
                self._prompt_cache[p] = e
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _apply(self, fn, *args, **kwargs):  # moving the model invalidates cached embeddings
        self._prompt_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def frame_cosines(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """cosine(image, prompt) per frame: (B, F)."""
        b, f = frames.shape[:2]
        img = self.image_embeddings(frames_to_images(frames)).view(b, f, -1)
        txt = self.prompt_embeddings(prompts).to(img.device)
        return (img * txt[:, None, :]).sum(-1)

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The CLIP in transformers' format, its tokenizer, and the preprocessing as a
        preprocessor_config.json; ``pretrained: <folder>`` loads it back."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(str(folder))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        write_processor_config(self.transform, folder)
