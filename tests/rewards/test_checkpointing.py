"""checkpointing: true recomputes the reward network's blocks in backward: same scores and pixel
gradients, fewer activations kept."""
from __future__ import annotations

import pytest
import torch

from fastvader.rewards.action import ActionReward
from fastvader.rewards.clip_score import ClipScoreReward
from fastvader.rewards.objectness import ObjectnessReward
from fastvader.rewards.viclip import ViCLIPReward
from fastvader.rewards.vjepa import VJEPAReward
from tests.helpers.tiny_rewards import PROMPTS, TINY_CLIP, TINY_VICLIP, TINY_VIDEOMAE, TINY_VJEPA2, TINY_YOLOS, videos

CASES = {
    "clip_score": (ClipScoreReward, {"config": TINY_CLIP}),
    "viclip": (ViCLIPReward, {"config": TINY_VICLIP}),
    "action": (ActionReward, {"config": TINY_VIDEOMAE}),
    "objectness": (ObjectnessReward, {"config": TINY_YOLOS, "mode": "add", "shortest_edge": 32, "longest_edge": 64}),
    "vjepa": (VJEPAReward, {"config": TINY_VJEPA2}),
}


def _score_grad_and_saved_bytes(reward, x):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        score = reward(x, PROMPTS[:2])
    score.sum().backward()
    return score.detach(), x.grad, sum(saved)


@pytest.mark.parametrize("name", list(CASES))
def test_checkpointing_keeps_results_and_saves_memory(name):
    cls, options = CASES[name]
    torch.manual_seed(0)
    plain = cls(random_init=True, **options)
    ckpt = cls(random_init=True, checkpointing=True, **options)
    ckpt.load_state_dict(plain.state_dict())
    plain.freeze(), ckpt.freeze()
    assert sorted(ckpt.state_dict()) == sorted(plain.state_dict())  # wrapping leaves the keys alone
    x = videos(2, frames=4).detach()
    if name == "vjepa":
        plain.generator.manual_seed(0), ckpt.generator.manual_seed(0)
    s1, g1, bytes_plain = _score_grad_and_saved_bytes(plain, x)
    if name == "vjepa":
        plain.generator.manual_seed(0), ckpt.generator.manual_seed(0)
    s2, g2, bytes_ckpt = _score_grad_and_saved_bytes(ckpt, x)
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert bytes_ckpt < bytes_plain
