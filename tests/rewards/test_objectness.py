"""objectness: YOLOS target-class confidence, as VADER computes it."""
from __future__ import annotations

import pytest
import torch

from fastvader.rewards._hf import RewardWeightsError, transformers_module
from fastvader.rewards.objectness import ObjectnessReward
from tests.helpers.tiny_rewards import PROMPTS, TINY_YOLOS, assert_differentiable_and_frozen, videos

SIZE = {"shortest_edge": 32, "longest_edge": 64}


@pytest.fixture(scope="module")
def remove():
    torch.manual_seed(0)
    reward = ObjectnessReward(random_init=True, config=TINY_YOLOS, target="dog", **SIZE)
    # random weights detect nothing in particular: lean the class head toward "dog" (id 2) so that
    # most, not all, detection tokens pick it and the reward has a gradient
    with torch.no_grad():
        reward.model.class_labels_classifier.layers[-1].bias[2] += 1.0
    return reward.freeze()


@pytest.mark.parametrize("batch", [1, 3])
def test_differentiable_shapes_frozen(remove, batch):
    scores = assert_differentiable_and_frozen(remove, batch)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_confidence_matches_post_process_object_detection(remove):
    """VADER: post_process_object_detection(threshold=0), mean score of the target's boxes, 0 if none."""
    tf = transformers_module()
    images = videos(4, frames=1).detach().flatten(0, 1)
    ours = remove.confidence(images)
    outputs = remove.model(pixel_values=remove.transform(images))
    results = tf.YolosImageProcessorPil().post_process_object_detection(outputs, threshold=0.0)
    expected = []
    for r in results:
        hits = r["scores"][r["labels"] == remove.target]
        expected.append(hits.mean() if len(hits) else torch.tensor(0.0))
    torch.testing.assert_close(ours, torch.stack(expected))


def test_confidence_on_mixed_detections_matches_post_processing(remove):
    """Logits where some tokens pick the target, some another class, some nothing."""
    tf = transformers_module()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, 5, generator=g) * 3  # 6 images, 5 tokens, 4 classes + "no object"
    logits[0, :, 2] = -20  # image 0: the target never wins
    logits[1, :, 2] = 20  # image 1: every token is the target
    outputs = type("Out", (), {"logits": logits, "pred_boxes": torch.rand(6, 5, 4, generator=g)})()
    results = tf.YolosImageProcessorPil().post_process_object_detection(outputs, threshold=0.0)
    expected = torch.stack([r["scores"][r["labels"] == 2].mean() if (r["labels"] == 2).any() else torch.tensor(0.0)
                            for r in results])
    counts = [int((r["labels"] == 2).sum()) for r in results]
    assert counts[0] == 0 and counts[1] == 5 and any(0 < c < 5 for c in counts[2:])
    torch.testing.assert_close(remove.confidence_from_logits(logits), expected)


def test_remove_and_add_are_complementary(remove):
    add = ObjectnessReward(random_init=True, config=TINY_YOLOS, target="dog", mode="add", **SIZE)
    add.load_state_dict(remove.state_dict())
    add.freeze()
    x = videos(2).detach()
    torch.testing.assert_close(add(x, PROMPTS[:2]), 1.0 - remove(x, PROMPTS[:2]))


def test_nothing_detected_gives_zero_gradient():
    """The documented limit: with no detection of the target the reward is constant."""
    reward = ObjectnessReward(random_init=True, config=TINY_YOLOS, target="dog", threshold=1.0, **SIZE).freeze()
    x = videos(2)
    score = reward(x, PROMPTS[:2])
    score.sum().backward()
    torch.testing.assert_close(score, torch.ones(2))
    assert x.grad is not None and x.grad.abs().sum() == 0


def test_target_and_mode_errors():
    with pytest.raises(ValueError, match="'dog'"):
        ObjectnessReward(random_init=True, config=TINY_YOLOS, target="dogs")
    with pytest.raises(ValueError, match="remove or add"):
        ObjectnessReward(random_init=True, config=TINY_YOLOS, mode="erase")


def test_default_preprocessing_is_yolos_processor():
    reward = ObjectnessReward(random_init=True, config=TINY_YOLOS)
    assert reward.transform.resized_size(320, 512) == (800, 1280)  # what YolosImageProcessor produces


def test_save_pretrained_round_trip_and_missing(remove, tmp_path):
    remove.save_pretrained(tmp_path)
    loaded = ObjectnessReward(pretrained=str(tmp_path), target="dog").freeze()
    assert loaded.transform == remove.transform
    x = videos(2).detach()
    torch.testing.assert_close(loaded(x, PROMPTS[:2]), remove(x, PROMPTS[:2]))
    with pytest.raises(RewardWeightsError, match="does not exist"):
        ObjectnessReward(pretrained=str(tmp_path / "nowhere"))
