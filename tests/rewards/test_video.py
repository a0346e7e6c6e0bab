"""Video rewards (viclip, action, vjepa) on tiny random-initialised models."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastvader.rewards._hf import RewardWeightsError
from fastvader.rewards._text import eos_positions
from fastvader.rewards.action import ActionReward, match_label
from fastvader.rewards.viclip import ViCLIPReward
from fastvader.rewards.vjepa import VJEPAReward
from tests.helpers.tiny_rewards import (PROMPTS, TINY_VICLIP, TINY_VIDEOMAE, TINY_VJEPA2,
                                 assert_differentiable_and_frozen, videos)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return {
        "viclip": ViCLIPReward(random_init=True, config=TINY_VICLIP).freeze(),
        "action": ActionReward(random_init=True, config=TINY_VIDEOMAE).freeze(),
        "vjepa": VJEPAReward(random_init=True, config=TINY_VJEPA2).freeze(),
    }


@pytest.mark.parametrize("name", ["viclip", "action", "vjepa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_differentiable_shapes_frozen(tiny, name, batch):
    assert tiny[name].is_video_reward
    assert_differentiable_and_frozen(tiny[name], batch)


@pytest.mark.parametrize("name", ["viclip", "action", "vjepa"])
def test_every_frame_gets_a_gradient(tiny, name):
    """Video rewards take all frames (ViCLIP/VideoMAE resample to their clip length)."""
    x = videos(1, frames=4)
    tiny[name](x, PROMPTS[:1]).sum().backward()
    assert (x.grad.abs().sum(dim=(2, 3, 4)) > 0).all()


@pytest.mark.parametrize("cls,name", [(ViCLIPReward, "viclip"), (ActionReward, "action"), (VJEPAReward, "vjepa")])
def test_save_pretrained_round_trip(tiny, cls, name, tmp_path):
    tiny[name].save_pretrained(tmp_path)
    loaded = cls(pretrained=str(tmp_path)).freeze()
    x = videos(2).detach()
    if name == "vjepa":  # same masks: same seed, fresh generators
        tiny[name].generator.manual_seed(0)
    torch.testing.assert_close(loaded(x, PROMPTS[:2]), tiny[name](x, PROMPTS[:2]))


@pytest.mark.parametrize("cls", [ViCLIPReward, ActionReward, VJEPAReward])
def test_missing_folder_errors(cls, tmp_path):
    with pytest.raises(RewardWeightsError, match="does not exist"):
        cls(pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(RewardWeightsError, match="model.safetensors"):
        cls(pretrained=str(tmp_path))  # empty folder


# --- ViCLIP: the published module, transcribed ---------------------------------------------------
def test_viclip_state_dict_matches_the_published_layout():
    with torch.device("meta"):
        model = ViCLIPReward.real_architecture()  # ViCLIP-L/14 from its packaged config
    sd = model.state_dict()
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
             "ln_2.weight", "ln_2.bias"]
    expected = {"temp"}
    expected |= {f"vision_encoder.{k}" for k in ["conv1.weight", "class_embedding", "positional_embedding",
                                                  "temporal_positional_embedding", "ln_pre.weight", "ln_pre.bias",
                                                  "ln_post.weight", "ln_post.bias", "proj"]}
    expected |= {f"vision_encoder.transformer.resblocks.{i}.{k}" for i in range(24) for k in block}
    expected |= {f"text_encoder.{k}" for k in ["token_embedding.weight", "positional_embedding", "ln_final.weight",
                                                "ln_final.bias", "text_projection"]}
    expected |= {f"text_encoder.transformer.resblocks.{i}.{k}" for i in range(12) for k in block}
    assert set(sd) == expected
    shapes = {"vision_encoder.conv1.weight": (1024, 3, 1, 14, 14), "vision_encoder.positional_embedding": (257, 1024),
              "vision_encoder.temporal_positional_embedding": (1, 8, 1024), "vision_encoder.proj": (1024, 768),
              "text_encoder.positional_embedding": (32, 768), "text_encoder.text_projection": (768, 768),
              "temp": ()}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def _original_block(block, x, mask=None):
    """InternVideo's ResidualAttentionBlock on (L, N, D) through nn.MultiheadAttention's functional."""
    h = block.ln_1(x)
    a = F.multi_head_attention_forward(h, h, h, h.shape[-1], block.attn.num_heads, block.attn.in_proj_weight,
                                       block.attn.in_proj_bias, None, None, False, 0.0, block.attn.out_proj.weight,
                                       block.attn.out_proj.bias, need_weights=False, attn_mask=mask)[0]
    x = x + a
    return x + block.mlp(block.ln_2(x))


def test_viclip_matches_the_original_forward(tiny):
    """viclip_vision.VisionTransformer.forward and viclip_text.CLIP_TEXT.forward, line by line."""
    model = tiny["viclip"].model
    v = model.vision_encoder
    video = torch.randn(2, 3, 4, 28, 28)
    x = v.conv1(video)
    B, C, T, H, W = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, C), x], dim=1) + v.positional_embedding
    cls_tokens = x[:B, :1, :]
    x = x[:, 1:].reshape(B, T, H * W, C).permute(0, 2, 1, 3).reshape(B * H * W, T, C)  # (b t) n m -> (b n) t m
    x = x + v.temporal_positional_embedding
    x = x.reshape(B, H * W * T, C)  # (b n) t m -> b (n t) m
    x = v.ln_pre(torch.cat((cls_tokens, x), dim=1)).permute(1, 0, 2)
    for block in v.transformer.resblocks:
        x = _original_block(block, x)
    reference = v.ln_post(x)[0] @ v.proj
    torch.testing.assert_close(v(video), reference, rtol=1e-4, atol=1e-5)

    t = model.text_encoder
    ids = tiny["viclip"].tokenizer(["a cat", "two dogs playing"])
    x = (t.token_embedding(ids) + t.positional_embedding).permute(1, 0, 2)
    mask = torch.full((16, 16), float("-inf")).triu_(1)
    for block in t.transformer.resblocks:
        x = _original_block(block, x, mask)
    x = t.ln_final(x.permute(1, 0, 2))
    reference = x[torch.arange(2), ids.argmax(dim=-1)] @ t.text_projection
    eos = eos_positions(ids, tiny["viclip"].tokenizer.eos_token_id)  # the original pools at argmax(ids)
    torch.testing.assert_close(t(ids, eos), reference, rtol=1e-4, atol=1e-5)


def test_viclip_loads_the_published_checkpoint_file(tiny, tmp_path):
    """ViClip-InternVid-10M-FLT.pth holds {"model": state_dict}; load strictly, reject wrong files."""
    torch.save({"model": tiny["viclip"].model.state_dict()}, tmp_path / "ViClip-InternVid-10M-FLT.pth")
    tiny["viclip"].tokenizer.save_pretrained(tmp_path)
    loaded = ViCLIPReward(pretrained=str(tmp_path), config=TINY_VICLIP).freeze()
    x = videos(2).detach()
    torch.testing.assert_close(loaded(x, PROMPTS[:2]), tiny["viclip"](x, PROMPTS[:2]))
    torch.save({"model": {"vision_encoder.proj": torch.zeros(3, 3)}}, tmp_path / "ViClip-InternVid-10M-FLT.pth")
    with pytest.raises(RewardWeightsError, match="missing keys"):
        ViCLIPReward(pretrained=str(tmp_path), config=TINY_VICLIP)


def test_viclip_score_is_a_cosine(tiny):
    s = tiny["viclip"](videos(3).detach(), PROMPTS)
    assert (s.abs() <= 1.0 + 1e-5).all()


# --- action ---------------------------------------------------------------------------------------
def test_action_targets_from_config_and_prompts(tiny):
    labels = TINY_VIDEOMAE["id2label"]
    assert [match_label(p, labels) for p in PROMPTS] == [0, 1, 2]
    assert match_label("a bear eats doughnuts", labels) == 3
    with pytest.raises(ValueError, match="reward.options.action.target"):
        match_label("a quiet lake", labels)
    fixed = ActionReward(random_init=True, config=TINY_VIDEOMAE, target="Jogging")
    assert fixed.target_ids(PROMPTS) == [2, 2, 2]
    with pytest.raises(ValueError, match="playing piano"):
        ActionReward(random_init=True, config=TINY_VIDEOMAE, target="playing pianos")


def test_action_score_is_the_class_probability(tiny):
    reward = tiny["action"]
    x = videos(3).detach()
    log_probs = reward.class_log_probs(x)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))
    expected = log_probs.exp()[torch.arange(3), torch.tensor([0, 1, 2])]
    torch.testing.assert_close(reward(x, PROMPTS), expected)
    log_reward = ActionReward(random_init=True, config=TINY_VIDEOMAE, score="log_prob")
    log_reward.load_state_dict(reward.state_dict())
    torch.testing.assert_close(log_reward.freeze()(x, PROMPTS), expected.log())


def test_action_uses_the_checkpoint_processor_config(tiny, tmp_path):
    tiny["action"].save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg.update(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    loaded = ActionReward(pretrained=str(tmp_path))
    assert loaded.transform.mean == (0.485, 0.456, 0.406) and loaded.transform.crop == (32, 32)


# --- vjepa ----------------------------------------------------------------------------------------
def test_vjepa_masks_split_tokens_and_span_time(tiny):
    reward = tiny["vjepa"]
    grid = reward.grid
    for context, target in reward.sample_masks(time_steps=3):
        assert len(context) > 0 and len(target) > 0
        assert set(context.tolist()).isdisjoint(target.tolist())
        assert sorted(context.tolist() + target.tolist()) == list(range(3 * grid * grid))
        per_frame = [{i % (grid * grid) for i in target.tolist() if i // (grid * grid) == t} for t in range(3)]
        assert per_frame[0] == per_frame[1] == per_frame[2]


def test_vjepa_context_encoder_and_predictor_match_transformers(tiny):
    """With every token as context, the context-only encoder equals VJEPA2Model's encoder; the
    predictor plumbing equals VJEPA2Model's own masked forward."""
    reward = tiny["vjepa"]
    pixels = reward.pixels(videos(2, frames=4).detach())
    out = reward.model(pixel_values_videos=pixels, skip_predictor=True)
    n = out.last_hidden_state.shape[1]
    everything = torch.arange(n)
    torch.testing.assert_close(reward.encode_context(pixels, everything), out.last_hidden_state, rtol=1e-4, atol=1e-5)

    context, target = reward.sample_masks(n // reward.grid ** 2)[0]
    ctx_ids, tgt_ids = context[None].expand(2, -1), target[None].expand(2, -1)
    hf = reward.model(pixel_values_videos=pixels, context_mask=[ctx_ids], target_mask=[tgt_ids]).predictor_output
    expected = (hf.last_hidden_state - F.layer_norm(hf.target_hidden_state, (hf.target_hidden_state.shape[-1],)))
    full = out.last_hidden_state
    reward_encode = reward.encode_context
    try:  # transformers' forward feeds the predictor context tokens encoded with the full video
        reward.encode_context = lambda p, c: full[:, c]
        ours = reward.prediction_error(pixels, context, target, full)
    finally:
        reward.encode_context = reward_encode
    torch.testing.assert_close(ours, expected.abs().mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)


def test_vjepa_odd_frames_and_detached_target():
    reward = VJEPAReward(random_init=True, config=TINY_VJEPA2, detach_target=True, num_masks=2).freeze()
    x = videos(2, frames=5)
    score = reward(x, PROMPTS[:2])
    score.sum().backward()
    assert score.shape == (2,) and (score <= 0).all() and x.grad.abs().sum() > 0
