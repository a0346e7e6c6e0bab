"""``image_consistency``: DINOv2 or CLIP image-image cosine of each frame to the prompt's
conditioning image, on tiny random-init models: its definition, gradients, weighted sums, the
DINOv2 processor's preprocessing, loading and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastvader.config import RewardConfig
from fastvader.io.images import prepare_image
from fastvader.rewards import build_reward
from fastvader.rewards._hf import RewardWeightsError, transformers_module
from fastvader.rewards.image_consistency import DINOV2_TRANSFORM, ImageConsistencyReward
from fastvader.training.prompts import ImagePrompt
from tests.helpers.tiny_rewards import TINY_CLIP
from tests.rewards.test_preprocess import _image

TINY_DINOV2 = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "mlp_ratio": 2, "image_size": 56, "patch_size": 14}
MODELS = {"dinov2": TINY_DINOV2, "clip": TINY_CLIP}


@pytest.fixture(scope="module")
def rewards():
    torch.manual_seed(0)
    return {name: ImageConsistencyReward(random_init=True, config=config).freeze() for name, config in MODELS.items()}


@pytest.fixture
def prompts(tmp_path):
    out = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        out.append(ImagePrompt(f"prompt {i}", tmp_path / f"{i}.png"))
    return out


def conditioned_video(prompts, frames: int = 3) -> torch.Tensor:
    """Each video's frames: its conditioning image (as the backbone saw it), then noise."""
    videos = torch.rand(len(prompts), frames, 3, 24, 36, generator=torch.Generator().manual_seed(3))
    for b, prompt in enumerate(prompts):
        videos[b, 0] = prompt.pixels(24, 36)
    return videos


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_frame_equal_to_the_conditioning_image_scores_one(rewards, prompts, name):
    reward = rewards[name]
    videos = conditioned_video(prompts)
    per_frame = reward.score_frames(videos, prompts)
    assert per_frame.shape == (2, 3)
    torch.testing.assert_close(per_frame[:, 0], torch.ones(2), rtol=0, atol=1e-5)
    assert (per_frame[:, 1:] < 0.9999).all()
    swapped = reward.score_frames(videos, prompts[::-1])[:, 0]  # the other video's image is another image
    assert (swapped < 0.9999).all()
    torch.testing.assert_close(reward(videos, prompts), per_frame.mean(1))  # averaged over the frames


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_reach_the_frames_and_the_model_stays_frozen(rewards, prompts, name):
    reward = rewards[name]
    videos = conditioned_video(prompts).requires_grad_(True)
    reward(videos, prompts).sum().backward()
    assert videos.grad is not None and videos.grad[:, 1:].abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())


def test_each_image_is_embedded_once_per_size(rewards, prompts):
    reward = rewards["dinov2"]
    reward._references.clear()
    reward(conditioned_video(prompts), prompts + prompts[:0])
    reward(conditioned_video(prompts[:1]), prompts[:1])
    assert len(reward._references) == 2
    assert all(key[2:] == (24, 36) for key in reward._references)


def test_a_prompt_without_image_is_refused(rewards):
    with pytest.raises(ValueError, match="prompt 'a cat' has none: use it with an image-to-video backbone"):
        rewards["dinov2"](torch.rand(1, 2, 3, 16, 16), ["a cat"])


def test_usable_in_weighted_sums(prompts):
    cfg = RewardConfig(name=None, terms={"image_consistency": 2.0, "brightness": 0.5},
                       options={"image_consistency": {"random_init": True, "config": TINY_DINOV2}})
    torch.manual_seed(0)
    total = build_reward(cfg)
    videos = conditioned_video(prompts)
    parts = total.terms
    want = 2.0 * parts["image_consistency"](videos, prompts) + 0.5 * parts["brightness"](videos, prompts)
    torch.testing.assert_close(total(videos, prompts), want)


def test_dinov2_preprocessing_matches_its_image_processor():
    tf = transformers_module()
    img = _image(120, 200)
    ref = tf.BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])(
        img, return_tensors="pt")["pixel_values"][0]
    ours = DINOV2_TRANSFORM(torch.from_numpy(img).float().div(255)[None])[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    # PIL rounds the resized image to uint8: 0.5/255 / std ~ 0.009 in normalised units
    assert (ours - ref).abs().max() < 0.04 and (ours - ref).abs().mean() < 0.006


def test_save_pretrained_round_trip_and_missing_folder(rewards, prompts, tmp_path):
    rewards["dinov2"].save_pretrained(tmp_path / "saved")
    loaded = ImageConsistencyReward(pretrained=str(tmp_path / "saved"), dtype="fp32").freeze()
    videos = conditioned_video(prompts)
    torch.testing.assert_close(loaded(videos, prompts), rewards["dinov2"](videos, prompts))
    assert loaded.transform == rewards["dinov2"].transform
    with pytest.raises(RewardWeightsError, match="does not exist"):
        ImageConsistencyReward(pretrained=str(tmp_path / "nowhere"))


def test_the_reference_is_the_image_the_backbone_saw(prompts):
    """Stretch and crop give different first frames: the reward compares with the right one."""
    stretched, cropped = ImagePrompt("p", prompts[0].image, "stretch"), ImagePrompt("p", prompts[0].image, "crop")
    torch.testing.assert_close(stretched.pixels(24, 24), prepare_image(prompts[0].image, 24, 24, "stretch"))
    assert not torch.allclose(stretched.pixels(24, 24), cropped.pixels(24, 24))
