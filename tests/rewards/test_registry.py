"""Registry, describe(), real architectures on the meta device, weighted sums and presets."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastvader.config import RewardConfig
from fastvader.rewards import (PRESETS, REWARDS, WeightedSum, available_rewards, build_reward, describe_rewards,
                               expand_terms, reward_class)
from fastvader.model_configs import ROOT as PACKAGED
from fastvader.rewards._hf import transformers_module
from tests.helpers.tiny_rewards import PROMPTS, TINY_CLIP, TINY_VICLIP, TINY_YOLOS, videos

REAL_REWARDS = ["aesthetic", "hpsv2", "hpsv2.1", "pickscore", "clip_score", "viclip", "action", "objectness", "vjepa"]

# published / computed counts (fastvader/model_configs/*/SOURCES.md)
CLIP_L14, CLIP_H14, VICLIP_L14 = 427_616_513, 986_109_441, 427_590_145
AESTHETIC_MLP, VIDEOMAE_K400, YOLOS_TINY, VJEPA2_L = 927_969, 86_534_800, 6_488_736, 325_971_328


def meta_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def test_every_reward_is_registered_with_the_preset():
    names = available_rewards()
    assert set(REAL_REWARDS) <= set(names) and "aesthetic_hps" in names
    assert PRESETS["aesthetic_hps"] == {"aesthetic": 1.0, "hpsv2": 15.0}


def test_listing_rewards_imports_no_model_code():
    code = ("import sys; from fastvader.rewards import available_rewards; available_rewards(); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers', 'open_clip'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_describe_lists_kind_weights_defaults_and_real_param_counts():
    # rewards registered by fastvader.rewards itself (other modules, e.g. benchmark stand-ins, may add more)
    builtin = {n for n, cls in REWARDS.items() if cls.__module__.startswith("fastvader.rewards.")}
    described = {d["name"]: d for d in describe_rewards() if d["name"] in builtin}
    assert set(described) == builtin
    expected_params = {
        "aesthetic": 303_966_208 + AESTHETIC_MLP,  # the ViT-L/14 vision tower + projection, and the MLP
        "hpsv2": CLIP_H14, "hpsv2.1": CLIP_H14, "pickscore": CLIP_H14, "clip_score": CLIP_L14,
        "viclip": VICLIP_L14, "action": VIDEOMAE_K400, "objectness": YOLOS_TINY, "vjepa": VJEPA2_L,
        "target_color": 0, "object_color": 0, "object_recolor": 0, "object_compactness": 0, "brightness": 0,
        "contrast": 0, "temporal_smoothness": 0,
        "image_consistency": 86_580_480,  # DINOv2 ViT-B/14 at 518 px (published "86M")
    }
    for name, d in described.items():
        assert set(d) == {"name", "kind", "weights", "defaults", "params"}
        assert d["kind"] in ("image", "video", "detection")
        assert d["params"] == expected_params[name], name
        json.dumps(d)  # `fastvader models --json`
    assert described["objectness"]["kind"] == "detection"
    assert {n for n, d in described.items() if d["kind"] == "video"} == {"viclip", "action", "vjepa", "temporal_smoothness"}
    assert described["hpsv2"]["defaults"]["pretrained"] == "xswu/HPSv2"
    assert described["action"]["defaults"]["target"] is None
    assert "HPS_v2.1_compressed.pt" in described["hpsv2.1"]["weights"]


def test_the_vision_tower_count_used_for_aesthetic():
    from fastvader.rewards._clip import clip_config

    tf = transformers_module()
    full = clip_config(reward_class("aesthetic").architecture(), reward="test")
    assert meta_count(lambda: tf.CLIPModel(full)) == CLIP_L14
    vision = meta_count(lambda: tf.CLIPVisionModelWithProjection(full.vision_config))
    text = meta_count(lambda: tf.CLIPTextModelWithProjection(full.text_config))
    assert vision == 303_966_208 and vision + text + 1 == CLIP_L14  # + logit_scale


def test_each_reward_builds_its_packaged_architecture_and_knows_its_hub_ids():
    """random_init without a config builds the packaged architecture of ``pretrained`` (a listed
    hub id), else of the default; weight and tokenizer files are dropped for the planner."""
    from fastvader.rewards._hf import PretrainedReward

    for name in REAL_REWARDS:
        cls = reward_class(name)
        assert issubclass(cls, PretrainedReward) and cls.default_pretrained in cls.packaged_architectures, name
        for relative in cls.packaged_architectures.values():
            assert (PACKAGED / relative).is_file(), (name, relative)
    objectness = reward_class("objectness")
    assert objectness.architecture(pretrained="hustvl/yolos-base")["hidden_size"] == 768
    assert objectness.architecture(pretrained="a/local-folder")["hidden_size"] == 192  # the default, yolos-tiny
    assert objectness.architecture(config={"hidden_size": 8, "_source": "x"}) == {"hidden_size": 8}
    options = reward_class("aesthetic").architecture_options(
        {"pretrained": "openai/clip-vit-large-patch14", "mlp_path": "x.pth", "tokenizer": "t", "checkpointing": True})
    assert options == {"pretrained": "openai/clip-vit-large-patch14", "checkpointing": True, "random_init": True}


# --- the packaged real configs ------------------------------------------------------------------------
def test_packaged_clip_configs_build_with_published_counts():
    root = PACKAGED
    from fastvader.rewards._clip import clip_config

    tf = transformers_module()
    cases = {"clip_hf/openai_clip-vit-large-patch14_config.json": CLIP_L14,
             "clip_hf/laion_CLIP-ViT-H-14-laion2B-s32B-b79K_config.json": CLIP_H14,
             "clip_hf/yuvalkirstain_PickScore_v1_config.json": CLIP_H14,
             "open_clip/ViT-H-14.json": CLIP_H14, "open_clip/ViT-L-14-quickgelu.json": CLIP_L14,
             "reward_models/hpsv2_config.json": CLIP_H14}
    for rel, count in cases.items():
        cfg = clip_config(root / rel, reward="test")
        assert meta_count(lambda: tf.CLIPModel(cfg)) == count, rel
    quick = clip_config(root / "open_clip/ViT-L-14-quickgelu.json", reward="test")
    assert quick.vision_config.hidden_act == "quick_gelu"
    hps = json.loads((root / "reward_models/hpsv2_config.json").read_text())
    assert hps["num_parameters"] == CLIP_H14


# transformers convert_yolos_to_pytorch.py get_yolos_config: what the packaged YOLOS files must hold
YOLOS_ARCHITECTURES = {
    "tiny": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 12, "num_attention_heads": 3,
             "image_size": [800, 1333], "use_mid_position_embeddings": False},
    "small": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
              "image_size": [512, 864], "use_mid_position_embeddings": True},
    "base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": [800, 1344], "use_mid_position_embeddings": True},
}
COCO_UNUSED_IDS = [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # "N/A" among COCO's 91 detection ids


def test_packaged_reward_configs_build_with_published_counts():
    root = PACKAGED / "reward_models"
    from fastvader.rewards._hf import read_config, strip_private
    from fastvader.rewards.aesthetic import AestheticMLP
    from fastvader.rewards.viclip import ViCLIPModel, viclip_config

    tf = transformers_module()
    mlp_spec = json.loads((root / "laion_aesthetic_predictor_mlp.json").read_text())
    assert meta_count(lambda: AestheticMLP(768)) == mlp_spec["num_parameters"] == AESTHETIC_MLP
    assert sorted(AestheticMLP(768).state_dict()) == sorted(mlp_spec["state_dict_keys"])

    viclip = viclip_config(root / "viclip_l14_config.json")
    assert meta_count(lambda: ViCLIPModel(viclip)) == VICLIP_L14
    assert json.loads((root / "viclip_l14_config.json").read_text())["num_parameters_approx"] == VICLIP_L14
    assert (viclip["vision_encoder"]["num_frames"], viclip["text_encoder"]["context_length"]) == (8, 32)

    videomae = tf.VideoMAEConfig(**strip_private(read_config(root / "videomae-base-finetuned-kinetics_config.json", "t")))
    assert meta_count(lambda: tf.VideoMAEForVideoClassification(videomae)) == VIDEOMAE_K400
    assert videomae.label2id["playing piano"] >= 0 and len(videomae.id2label) == 400

    for size, count in (("tiny", YOLOS_TINY), ("small", 30_684_768), ("base", 127_798_368)):
        packaged = strip_private(read_config(root / f"hustvl_yolos-{size}_config.json", "t"))
        cfg = tf.YolosConfig(**packaged)
        assert meta_count(lambda: tf.YolosForObjectDetection(cfg)) == count, size
        for key, value in YOLOS_ARCHITECTURES[size].items():
            assert packaged[key] == value, (size, key)
        labels = [packaged["id2label"][str(i)] for i in range(91)]
        assert [i for i, label in enumerate(labels) if label == "N/A"] == COCO_UNUSED_IDS
        assert (labels[1], labels[18], len(labels)) == ("person", "dog", len(packaged["id2label"]))

    vjepa = strip_private(read_config(root / "vjepa2-vitl-fpc64-256_config.json", "t"))
    assert meta_count(lambda: tf.VJEPA2Model(tf.VJEPA2Config(**vjepa))) == VJEPA2_L
    assert (vjepa["crop_size"], vjepa["hidden_size"], vjepa["pred_hidden_size"]) == (256, 1024, 384)


@pytest.mark.parametrize("name,rel", [
    ("clip_score", "clip_hf/openai_clip-vit-large-patch14_config.json"),
    ("hpsv2", "reward_models/hpsv2_config.json"),
    ("viclip", "reward_models/viclip_l14_config.json"),
    ("action", "reward_models/videomae-base-finetuned-kinetics_config.json"),
    ("objectness", "reward_models/hustvl_yolos-base_config.json"),
    ("vjepa", "reward_models/vjepa2-vitl-fpc64-256_config.json"),
])
def test_rewards_build_from_the_packaged_configs_on_meta(name, rel):
    """The benchmark path: random_init + config=<a config file>, here on the meta device."""
    options = {"random_init": True, "config": str(PACKAGED / rel)}
    if name == "action":
        options["target"] = "playing piano"
    with torch.device("meta"):
        reward = reward_class(name)(**options)
    assert sum(p.numel() for p in reward.parameters()) > 1_000_000


# --- combinations ------------------------------------------------------------------------------------
def test_aesthetic_hps_preset_through_build_reward():
    cfg = RewardConfig(name="aesthetic_hps", options={"aesthetic": {"random_init": True, "config": TINY_CLIP},
                                                       "hpsv2": {"random_init": True, "config": TINY_CLIP}})
    reward = build_reward(cfg)
    assert isinstance(reward, WeightedSum) and reward.weights == {"aesthetic": 1.0, "hpsv2": 15.0}
    x = videos(3)
    total = reward(x, PROMPTS)
    total.sum().backward()
    assert x.grad.abs().sum() > 0 and all(not p.requires_grad and p.grad is None for p in reward.parameters())
    parts = {k: r(x.detach(), PROMPTS) for k, r in reward.terms.items()}
    torch.testing.assert_close(total.detach(), parts["aesthetic"] + 15.0 * parts["hpsv2"])
    torch.testing.assert_close(reward.last_terms["hpsv2"], parts["hpsv2"])


def test_weighted_sum_of_image_video_and_detection_rewards():
    cfg = RewardConfig(name=None, terms={"clip_score": 1.0, "viclip": 0.5, "objectness": 2.0}, options={
        "clip_score": {"random_init": True, "config": TINY_CLIP},
        "viclip": {"random_init": True, "config": TINY_VICLIP},
        "objectness": {"random_init": True, "config": TINY_YOLOS, "shortest_edge": 32, "longest_edge": 64}})
    reward = build_reward(cfg)
    assert reward.is_video_reward
    x = videos(2, frames=4).detach()
    expected = sum(w * reward.terms[k](x, PROMPTS[:2]) for k, w in cfg.terms.items())
    torch.testing.assert_close(reward(x, PROMPTS[:2]), expected)


def test_presets_expand_inside_terms():
    assert expand_terms({"aesthetic_hps": 2.0, "viclip": 1.0}) == {"aesthetic": 2.0, "hpsv2": 30.0, "viclip": 1.0}
    assert expand_terms({"aesthetic": 1.0, "aesthetic_hps": 1.0}) == {"aesthetic": 2.0, "hpsv2": 15.0}


def test_unknown_option_names_the_constructor():
    cfg = RewardConfig(name="clip_score", options={"clip_score": {"random_init": True, "config": TINY_CLIP,
                                                                  "colour": "red"}})
    with pytest.raises(ValueError, match=r"\['colour'\] are not options of 'clip_score'.*'scale'"):
        build_reward(cfg)
