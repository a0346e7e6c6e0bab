"""CLIP-based rewards (aesthetic, hpsv2, hpsv2.1, pickscore, clip_score) on tiny random CLIPs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvader.rewards._hf import RewardWeightsError
from fastvader.rewards._text import ByteTokenizer
from fastvader.rewards.aesthetic import AestheticMLP, AestheticReward
from fastvader.rewards.clip_score import ClipScoreReward
from fastvader.rewards.hps import HPSv2Reward, HPSv21Reward
from fastvader.rewards.pickscore import PickScoreReward
from tests.helpers.tiny_rewards import PROMPTS, TINY_CLIP, TINY_OPEN_CLIP, assert_differentiable_and_frozen, videos

CLASSES = [AestheticReward, HPSv2Reward, HPSv21Reward, PickScoreReward, ClipScoreReward]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return {cls.name: cls(random_init=True, config=TINY_CLIP).freeze() for cls in CLASSES}


@pytest.mark.parametrize("name", [c.name for c in CLASSES])
@pytest.mark.parametrize("batch", [1, 3])
def test_differentiable_shapes_frozen(tiny, name, batch):
    assert_differentiable_and_frozen(tiny[name], batch)


@pytest.mark.parametrize("name", [c.name for c in CLASSES])
def test_batch_of_three_equals_three_batches_of_one(tiny, name):
    reward = tiny[name]
    x = videos(3).detach()
    together = reward(x, PROMPTS)
    alone = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_image_rewards_average_their_frames(tiny):
    reward = tiny["clip_score"]
    x = videos(2, frames=3).detach()
    per_frame = reward.score_frames(x, PROMPTS[:2])
    assert per_frame.shape == (2, 3)
    torch.testing.assert_close(reward(x, PROMPTS[:2]), per_frame.mean(1))


def test_scores_follow_their_definitions(tiny):
    x = videos(2).detach()
    cos = tiny["pickscore"].frame_cosines(x, PROMPTS[:2])
    assert cos.abs().max() <= 1.0 + 1e-5
    expected = tiny["pickscore"].clip.logit_scale.exp() * cos
    torch.testing.assert_close(tiny["pickscore"].score_frames(x, PROMPTS[:2]), expected)
    torch.testing.assert_close(tiny["hpsv2"].score_frames(x, PROMPTS[:2]),
                               tiny["hpsv2"].frame_cosines(x, PROMPTS[:2]))
    # aesthetic: the MLP on the L2-normalised image embedding
    a = tiny["aesthetic"]
    emb = a.image_embeddings(x.flatten(0, 1))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(a.score_frames(x, PROMPTS[:2]).flatten(), a.mlp(emb).flatten())


def test_preprocessing_crops_to_the_model_size(tiny):
    t = tiny["clip_score"].transform
    assert (t.shortest_edge, t.crop, t.resample) == (32, (32, 32), "bicubic")


@pytest.mark.parametrize("cls", CLASSES)
def test_save_pretrained_round_trip(tiny, cls, tmp_path):
    reward = tiny[cls.name]
    reward.save_pretrained(tmp_path)
    loaded = cls(pretrained=str(tmp_path)).freeze()
    x = videos(2).detach()
    torch.testing.assert_close(loaded(x, PROMPTS[:2]), reward(x, PROMPTS[:2]))


@pytest.mark.parametrize("cls", [AestheticReward, PickScoreReward, ClipScoreReward])
def test_missing_or_incomplete_folder_errors_name_the_files(cls, tmp_path):
    with pytest.raises(RewardWeightsError, match="does not exist"):
        cls(pretrained=str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RewardWeightsError, match="model.safetensors"):
        cls(pretrained=str(tmp_path))


def test_config_without_random_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match="random_init"):
        ClipScoreReward(pretrained=str(tmp_path), config=TINY_CLIP)


def test_aesthetic_mlp_missing_and_wrong(tiny, tmp_path):
    tiny["aesthetic"].clip.save_pretrained(str(tmp_path))  # CLIP without the MLP
    with pytest.raises(RewardWeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticReward(pretrained=str(tmp_path))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, wrong)
    with pytest.raises(RewardWeightsError, match="missing keys"):
        AestheticReward(pretrained=str(tmp_path), mlp_path=str(wrong))


def test_aesthetic_mlp_loads_the_published_layout(tiny, tmp_path):
    """sac+logos+ava1-l14-linearMSE.pth is a torch.save'd state dict with keys layers.0/2/4/6/7."""
    tiny["aesthetic"].clip.save_pretrained(str(tmp_path))
    mlp = AestheticMLP(16).eval()  # dropouts off, as at inference
    assert sorted(mlp.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = AestheticReward(pretrained=str(tmp_path), mlp_path=str(tmp_path)).freeze()
    emb = torch.randn(4, 16)
    torch.testing.assert_close(reward.mlp(emb), mlp(emb))


def test_bf16_reward_returns_float32_with_gradients():
    reward = ClipScoreReward(random_init=True, config=TINY_CLIP, dtype="bf16").freeze()
    assert all(p.dtype == torch.bfloat16 for p in reward.parameters())
    x = videos(2)
    score = reward(x, PROMPTS[:2])
    score.sum().backward()
    assert score.dtype == torch.float32 and x.grad.abs().sum() > 0


# --- HPS: the OpenCLIP checkpoint layout --------------------------------------------------------
def _hf_to_open_clip(hf: dict) -> dict:
    """The inverse of the loader's conversion, written independently from it."""
    o = {"visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
         "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
         "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
         "visual.proj": hf["visual_projection.weight"].T.contiguous(),
         "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
         "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
         "text_projection": hf["text_projection.weight"].T.contiguous(),
         "logit_scale": hf["logit_scale"]}
    for oc, h in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                  ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            o[f"{oc}.{p}"] = hf[f"{h}.{p}"]
    for oc, h in (("visual.transformer.resblocks", "vision_model.encoder.layers"),
                  ("transformer.resblocks", "text_model.encoder.layers")):
        for i in range(2):
            a, b = f"{oc}.{i}.", f"{h}.{i}."
            for p in ("weight", "bias"):
                o[a + f"attn.in_proj_{p}"] = torch.cat([hf[b + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
                for oc_name, h_name in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                        ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    o[a + f"{oc_name}.{p}"] = hf[b + f"{h_name}.{p}"]
    return o


def _open_clip_image_features(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenCLIP's VisionTransformer forward, written from its state-dict layout."""
    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    b, n, d = x.shape
    for i in range(2):
        p = f"visual.transformer.resblocks.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + attn @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]


@pytest.mark.parametrize("cls,filename", [(HPSv2Reward, "HPS_v2_compressed.pt"), (HPSv21Reward, "HPS_v2.1_compressed.pt")])
def test_hps_loads_open_clip_checkpoint(cls, filename, tmp_path):
    torch.manual_seed(1)
    source = HPSv2Reward(random_init=True, config=TINY_OPEN_CLIP).freeze()
    open_clip_sd = _hf_to_open_clip(source.clip.state_dict())
    # as HPSv2 ships it: {"state_dict": ...}, saved from DDP ("module." prefixes)
    torch.save({"state_dict": {"module." + k: v for k, v in open_clip_sd.items()}}, tmp_path / filename)
    ByteTokenizer(300, 16).save_pretrained(tmp_path)
    reward = cls(pretrained=str(tmp_path), config=TINY_OPEN_CLIP).freeze()

    pixels = torch.rand(2, 3, 32, 32)
    ours = reward.clip.visual_projection(reward.clip.vision_model(pixel_values=pixels).pooler_output)
    reference = _open_clip_image_features(open_clip_sd, pixels, heads=2)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    x = videos(2).detach()
    torch.testing.assert_close(reward(x, PROMPTS[:2]), source(x, PROMPTS[:2]))


def test_hps_missing_and_wrong_checkpoint(tmp_path):
    with pytest.raises(RewardWeightsError, match="HPS_v2.1_compressed.pt"):
        HPSv21Reward(pretrained=str(tmp_path))  # empty folder
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardWeightsError, match="OpenCLIP"):
        HPSv21Reward(pretrained=str(tmp_path), config=TINY_OPEN_CLIP)


def test_aesthetic_loads_the_vision_tower_from_a_full_clip_checkpoint(tiny, tmp_path):
    """openai/clip-vit-large-patch14 is a full CLIPModel; aesthetic loads only its vision tower."""
    full = tiny["clip_score"]
    full.clip.save_pretrained(str(tmp_path))  # a full CLIPModel folder, as on the hub
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = AestheticReward(pretrained=str(tmp_path), mlp_path=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    assert not hasattr(reward.clip, "text_model")
    images = videos(2, frames=1).detach().flatten(0, 1)
    torch.testing.assert_close(reward.freeze().image_embeddings(images), full.image_embeddings(images))
