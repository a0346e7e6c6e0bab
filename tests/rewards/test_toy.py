"""The embedded world's better-posed rewards: object_recolor (recolour the object, keep the rest)
and object_compactness (the hacking detector), against hand-built frames whose answers are known."""
import pytest
import torch

from fastvader.rewards.toy import (ObjectColorReward, ObjectCompactnessReward, ObjectRecolorReward,
                                   TargetColorReward, largest_component)
from fastvader.toy import world as synthetic

RED = (1.0, 0.0, 0.0)


def _video(color, shape="square", background=0.5, size=5.0):
    """One still 2-frame video (1, 2, 3, 32, 32) of a shape in the middle of a plain background."""
    scene = synthetic.Scene("blue", shape, "left", "gray")
    return synthetic.render(scene, (16.0, 16.0), 0.0, size, color, background, frames=2)[None]


def _with_spots(video, color, spots=((3, 3), (3, 27), (27, 4))):
    """The video with 2x2 spots of ``color`` in three corners, far from the object."""
    spotted = video.clone()
    for y, x in spots:
        spotted[..., y:y + 2, x:x + 2] = torch.tensor(color).view(3, 1, 1)
    return spotted


def test_largest_component_keeps_the_biggest_8_connected_region():
    masks = torch.zeros(2, 7, 7, dtype=torch.bool)
    masks[0, 2:5, 2:5] = True   # 9 pixels
    masks[0, 5, 5] = True       # touches the block diagonally: same region
    masks[0, 0, 6] = True       # a lone pixel elsewhere
    kept = largest_component(masks)
    expected = masks.clone()
    expected[0, 0, 6] = False
    assert torch.equal(kept, expected)
    assert not kept[1].any()  # an empty mask stays empty


def test_object_recolor_scores_the_object_colour():
    blue, red = _video(synthetic.COLORS["blue"]), _video(RED)
    reward = ObjectRecolorReward("red")
    blue_score, red_score = reward(blue, ["p"]), reward(red, ["p"])
    assert red_score > -0.05  # only the anti-aliased edge is off-colour
    assert red_score > blue_score + 0.3
    # on the object alone it agrees with object_color (which has no background term)
    assert torch.allclose(blue_score, ObjectColorReward("red")(blue, ["p"]), atol=0.03)


def test_object_recolor_does_not_pay_for_red_spots_that_object_color_pays_for():
    blue = _video(synthetic.COLORS["blue"])
    spotted = _with_spots(blue, RED)
    # object_color averages over everything away from the background: red spots raise it
    assert ObjectColorReward("red")(spotted, ["p"]) > ObjectColorReward("red")(blue, ["p"]) + 0.02
    # object_recolor counts them as a changed background
    recolor = ObjectRecolorReward("red")
    assert recolor(spotted, ["p"]) < recolor(blue, ["p"]) - 0.02
    # and its gradient pulls a spot back toward the background colour (0.5), not toward red
    frames = spotted.clone().requires_grad_(True)
    recolor(frames, ["p"]).sum().backward()
    ascent = frames.grad[0, 0, :, 3, 3]  # the spot's pixel, RGB (1, 0, 0)
    assert ascent[0] < 0 and ascent[1] > 0 and ascent[2] > 0


def test_object_recolor_background_term_and_fallbacks():
    red = _video(RED)
    tinted = red.clone()
    background = ~synthetic.foreground_mask(red[0]).unsqueeze(1).expand_as(red[0])
    tinted[0][background] += 0.05  # a uniform tint moves the median with it: no cost
    assert torch.allclose(ObjectRecolorReward()(tinted, ["p"]), ObjectRecolorReward()(red, ["p"]), atol=1e-4)
    assert torch.allclose(ObjectRecolorReward(background_weight=0.0)(_with_spots(red, (0.0, 1.0, 0.0)), ["p"]),
                          ObjectRecolorReward()(red, ["p"]), atol=1e-4)
    flat = torch.full((1, 2, 3, 8, 8), 0.5)  # no object: the whole-frame distance, so erasing never pays
    assert torch.allclose(ObjectRecolorReward()(flat, ["p"]), TargetColorReward("red")(flat, ["p"]))
    with pytest.raises(ValueError, match="object_recolor.background_weight"):
        ObjectRecolorReward(background_weight=-1.0)
    with pytest.raises(ValueError, match="object_recolor.color"):
        ObjectRecolorReward("mauve")


def test_object_compactness_ranks_shapes_and_flags_spots():
    compact = ObjectCompactnessReward()
    disc, square, triangle = (float(compact(_video(RED, shape, size=6.0), ["p"]))
                              for shape in ("circle", "square", "triangle"))
    assert disc == pytest.approx(1.0, abs=0.02)
    assert square == pytest.approx(0.955, abs=0.02)
    assert 0.75 < triangle < square
    assert float(compact(_with_spots(_video(RED), RED), ["p"])) < 0.5 * square  # spread-out foreground
    assert float(compact(torch.full((1, 2, 3, 8, 8), 0.5), ["p"])) == 0.0  # nothing drawn


def test_object_recolor_anchored_on_the_base_video_pays_only_for_recolouring_it():
    base = _video(synthetic.COLORS["blue"])
    reward = ObjectRecolorReward("red", anchor="base")
    assert reward.needs_reference
    recoloured = _video(RED)                                   # the base's object, painted red
    reshaped = _video(RED, shape="circle", size=6.5)           # red, but another outline
    moved = torch.roll(recoloured, shifts=4, dims=-1)          # red, but elsewhere
    scores = {name: float(reward(v, ["p"], reference=base))
              for name, v in (("base", base), ("recoloured", recoloured), ("reshaped", reshaped), ("moved", moved))}
    assert scores["recoloured"] > -0.05, scores                # only the anti-aliased edge is off
    # anchored on itself, the reward cannot tell a red square from a red circle or a moved square
    on_itself = ObjectRecolorReward("red")
    assert abs(float(on_itself(reshaped, ["p"])) - float(on_itself(recoloured, ["p"]))) < 0.05
    # anchored on the base, a changed outline or place costs, and more than it gains in colour
    assert scores["reshaped"] < scores["recoloured"] - 0.1, scores
    assert scores["moved"] < scores["recoloured"] - 0.1, scores
    assert scores["base"] < min(scores.values()) + 1e-6, scores  # and the base's blue object costs most
    # the gradient on a pixel the base drew as background pulls it back to the base's pixel
    frames = reshaped.clone().requires_grad_(True)
    reward(frames, ["p"], reference=base).sum().backward()
    corner = (slice(None), 16, 16 + 6)  # inside the big circle, outside the base's square
    assert reshaped[0, 0][corner].tolist() == list(RED)
    assert (frames.grad[0, 0][corner] * (base[0, 0][corner] - reshaped[0, 0][corner])).sum() > 0


def test_a_reward_that_scores_a_change_refuses_to_score_without_the_base_video():
    video = _video(RED)
    with pytest.raises(ValueError, match="object_recolor scores a change against the base model's video"):
        ObjectRecolorReward(anchor="base")(video, ["p"])
    with pytest.raises(ValueError, match="object_recolor.anchor"):
        ObjectRecolorReward(anchor="prompt")
