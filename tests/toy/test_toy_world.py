"""The embedded world: its synthetic videos, its shipped weights, and its weightless rewards.

The checks on the shipped model are real: its VAE must reconstruct frames it never saw, and
its samples must show the colour their prompts name."""
from __future__ import annotations

import json

import pytest
import torch

from fastvader.rewards import build_reward_from_spec
from fastvader.rewards.toy import ObjectColorReward, TargetColorReward
from fastvader.toy import world as synthetic
from fastvader.toy.model import (WEIGHT_FILES, WEIGHTS_DIR, ToyWorldConfig, build_toy_world,
                                 load_toy_world, save_toy_world)
from fastvader.toy.sample import decode_latents, encode_latents, sample_videos

# Measured on the shipped weights (docs/toy_world.md): held-out reconstruction MSE about 0.0008
# (the VAE before stage 5: 0.0104).
VAE_MSE_LIMIT = 0.003


@pytest.fixture(scope="module")
def shipped():
    return load_toy_world()


# -- the synthetic world ---------------------------------------------------------------------
def test_generator_is_deterministic_and_seed_dependent():
    prompts_a, videos_a = synthetic.sample_batch(6, seed=3)
    prompts_b, videos_b = synthetic.sample_batch(6, seed=3)
    assert prompts_a == prompts_b
    assert torch.equal(videos_a, videos_b)
    _, videos_c = synthetic.sample_batch(6, seed=4)
    assert not torch.equal(videos_a, videos_c)
    assert videos_a.shape == (6, synthetic.FRAMES, 3, synthetic.HEIGHT, synthetic.WIDTH)
    assert videos_a.min() >= 0.0 and videos_a.max() <= 1.0


def test_videos_show_what_their_prompts_say():
    prompts, videos = synthetic.sample_batch(48, seed=11)
    for prompt, video in zip(prompts, videos):
        named, seen = synthetic.parse_prompt(prompt), synthetic.describe_video(video)
        for key, word in named.items():
            if word is not None:  # partial prompts leave motion or background out
                assert seen[key] == word, (prompt, key, seen)


def test_motion_goes_the_named_way_by_several_pixels():
    scene = synthetic.Scene("green", "circle", "up", "dark")
    video = synthetic.render(scene, start=(16.0, 24.0), speed=2.0, size=5.0,
                             color=synthetic.COLORS["green"], background=0.08)
    track = synthetic.centroid_track(video)
    assert torch.allclose(track[-1] - track[0], torch.tensor([0.0, -14.0]), atol=0.3)


def test_every_prompt_word_is_in_the_vocabulary():
    config = ToyWorldConfig()
    assert config.vocab == synthetic.VOCAB
    assert (config.frames, config.height, config.width) == (synthetic.FRAMES, synthetic.HEIGHT, synthetic.WIDTH)
    prompts, _ = synthetic.sample_batch(64, seed=0)
    world = build_toy_world(config)
    ids = world.tokenizer(prompts)
    assert (ids != 1).all(), "some prompt word tokenised as <unk>"
    longest = max(len(p.split()) for p in prompts)
    assert longest <= config.max_length
    # each excluded (colour, background) pair removes its 3 shapes x 4 directions
    assert len(synthetic.all_scenes()) == 5 * 3 * 4 * 3 - 12 * len(synthetic.EXCLUDED) == 168


# -- the shipped weights ---------------------------------------------------------------------
def test_shipped_weights_load_strictly_and_match_the_world(shipped):
    stored = json.loads((WEIGHTS_DIR / "world.json").read_text())
    assert stored["vocab"] == synthetic.VOCAB
    # load_toy_world loads strictly; check every tensor is really there and trained (not init).
    fresh = build_toy_world(shipped.config, seed=123)
    for name in ("text_encoder", "unet", "vae"):
        trained, init = getattr(shipped, name).state_dict(), getattr(fresh, name).state_dict()
        assert trained.keys() == init.keys()
        changed = sum(not torch.equal(trained[k], init[k]) for k in trained)
        assert changed > 0.9 * len(trained), f"{name}: most weights look untrained"
    # latents of the synthetic world have about unit std after scaling
    assert 0.2 < shipped.vae.config.scaling_factor < 5.0
    total_bytes = sum((WEIGHTS_DIR / n).stat().st_size for n in WEIGHT_FILES)
    assert total_bytes < 8 * 2**20


def test_vae_reconstructs_held_out_frames(shipped):
    _, videos = synthetic.sample_batch(6, seed=987_654)  # a seed training never draws
    with torch.no_grad():
        latents = encode_latents(shipped.vae, videos)
        assert latents.shape == (6, 4, synthetic.FRAMES, synthetic.HEIGHT // 4, synthetic.WIDTH // 4)
        assert 0.5 < float(latents.std()) < 2.0
        reconstruction = decode_latents(shipped.vae, latents)
    mse = float(((reconstruction - videos) ** 2).mean())
    assert mse < VAE_MSE_LIMIT, f"VAE reconstruction MSE {mse:.5f} >= {VAE_MSE_LIMIT}"


def test_vae_keeps_the_colour_shape_and_motion_its_frames_show(shipped):
    """What the denoiser can learn is bounded by what survives the VAE. Measured on 48 held-out
    videos, after a round trip through the shipped VAE: colour, direction and background 48/48,
    shape 41/48. The VAE before stage 5 (5x the KL weight) kept colour 28/48 and shape 17/48."""
    from fastvader.toy.quality import vae_round_trip_accuracy

    kept = vae_round_trip_accuracy(shipped, videos=48)
    assert kept["color"] >= 46 / 48 and kept["direction"] >= 46 / 48 and kept["background"] >= 46 / 48, kept
    assert kept["shape"] >= 38 / 48, kept


def test_samples_follow_the_prompted_background_colour_and_shape(shipped):
    """Over 16 prompts spread across the scenes (chance: 1/3 background, 1/5 colour, 1/3 shape).
    Measured on the shipped weights: background 16/16, colour 16/16, shape 13/16; the stage-4
    weights scored 16, 9 and 4, stage 3 scored 9/16 and 2/16 for background and colour."""
    from fastvader.toy.quality import evaluation_prompts, prompt_accuracy

    accuracy, videos = prompt_accuracy(shipped, evaluation_prompts(16, seed=0), seed=0, steps=15)
    assert videos.shape == (16, synthetic.FRAMES, 3, synthetic.HEIGHT, synthetic.WIDTH)
    assert accuracy["background"] >= 0.9, accuracy
    assert accuracy["color"] >= 0.85, accuracy
    assert accuracy["shape"] >= 0.65, accuracy


def test_samples_show_the_prompted_colour(shipped):
    prompts = ["a red square moving right on a gray background",
               "a green circle moving up on a dark background",
               "a blue triangle moving left on a light background",
               "a yellow circle moving down on a gray background"]
    videos = sample_videos(shipped, prompts, seed=0, steps=15, guidance=7.5)
    assert videos.shape == (4, synthetic.FRAMES, 3, synthetic.HEIGHT, synthetic.WIDTH)
    seen = [synthetic.dominant_color(v) for v in videos]
    assert seen == [synthetic.parse_prompt(p)["color"] for p in prompts]
    backgrounds = [synthetic.background_name(v) for v in videos]
    assert backgrounds == [synthetic.parse_prompt(p)["background"] for p in prompts]


def test_sampling_is_reproducible(shipped):
    first = sample_videos(shipped, ["a white square"], seed=5, steps=4)
    again = sample_videos(shipped, ["a white square"], seed=5, steps=4)
    assert torch.equal(first, again)


def test_missing_weights_raise_file_not_found_naming_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_toy_world(tmp_path / "nowhere")
    for name in WEIGHT_FILES:
        assert name in str(error.value)
    assert "fastvader.toy.train_world" in str(error.value)


def test_save_and_load_round_trip_in_fp16(tmp_path):
    world = build_toy_world(seed=1)
    save_toy_world(world, tmp_path)
    loaded = load_toy_world(tmp_path)
    ids = world.tokenizer(["a red square moving left"])
    expected = world.text_encoder(ids)
    assert torch.allclose(loaded.text_encoder(ids), expected, atol=2e-2)
    assert next(loaded.unet.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory


# -- rewards ---------------------------------------------------------------------------------
def _recolour_object(videos: torch.Tensor, rgb) -> torch.Tensor:
    mask = synthetic.foreground_mask(videos).unsqueeze(2)
    return torch.where(mask, torch.tensor(rgb).view(1, 1, 3, 1, 1), videos)


def test_target_color_red_is_clearly_improvable_in_this_world():
    prompts, videos = synthetic.sample_batch(8, seed=2)
    reward = TargetColorReward("red")
    before = reward(videos, prompts)
    assert (before < -0.1).all()  # backgrounds are far from red
    # halfway to red quarters the squared distance
    redder = 0.5 * videos + 0.5 * torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1)
    assert torch.allclose(reward(redder, prompts), before / 4, atol=1e-3)
    assert (reward(redder, prompts) > before + 0.07).all()


def test_object_color_scores_the_object_not_the_background():
    scene = synthetic.Scene("blue", "square", "left", "gray")
    video = synthetic.render(scene, (20.0, 16.0), 2.0, 5.0, synthetic.COLORS["blue"], 0.5)[None]
    red_object = _recolour_object(video, (1.0, 0.0, 0.0))
    reward = ObjectColorReward("red")
    blue_score, red_score = reward(video, ["p"]), reward(red_object, ["p"])
    assert red_score > blue_score + 0.3
    assert red_score > -0.05  # nearly the maximum of 0: only the soft edge is off-colour
    # the background alone does not move it: a redder background with a blue object scores ~ the same
    tinted = video.clone()
    background = ~synthetic.foreground_mask(video).unsqueeze(2).expand_as(video)
    tinted[background] = tinted[background] * 0.9
    assert torch.allclose(reward(tinted, ["p"]), blue_score, atol=0.02)
    # gradients reach only the (soft) foreground pixels
    frames = video.clone().requires_grad_(True)
    reward(frames, ["p"]).sum().backward()
    grad = frames.grad.abs().sum(dim=2)[0]
    mask = synthetic.foreground_mask(video)[0]
    assert grad[mask].mean() > 100 * grad[~mask].mean()


def test_object_color_without_foreground_falls_back_to_the_whole_frame():
    flat = torch.full((1, 2, 3, 8, 8), 0.5)
    reward = ObjectColorReward("red")
    assert torch.allclose(reward(flat, ["p"]), TargetColorReward("red")(flat, ["p"]))


def test_toy_rewards_are_registered_and_weightless():
    for name in ("target_color", "object_color", "brightness", "contrast", "temporal_smoothness"):
        reward = build_reward_from_spec({name: 1.0})
        assert type(reward).weightless
        videos = torch.rand(2, 3, 3, 8, 8)
        assert reward(videos, ["a", "b"]).shape == (2,)
    with pytest.raises(ValueError, match="object_color.color"):
        ObjectColorReward("mauve")


# -- the world's training script -------------------------------------------------------------
def test_train_world_continues_a_world_and_saves_progress_along_the_way(tmp_path, shipped, monkeypatch):
    from fastvader.toy import train_world as script
    from fastvader.toy.train_world import TrainSettings, train_world

    saved_unets = []
    original_save = script.save_toy_world

    def recording_save(world, path, *args, **kwargs):
        saved_unets.append({k: v.clone() for k, v in world.unet.state_dict().items()})
        original_save(world, path, *args, **kwargs)

    monkeypatch.setattr(script, "save_toy_world", recording_save)
    settings = TrainSettings(seed=5, vae_steps=0, denoiser_steps=3, batch_size=2, pool_videos=4,
                             warmup_steps=1, save_every=2, log_every=1, offset_noise=0.1,
                             # the stage-5 options, so the loop runs through each of them
                             high_noise_weight=20.0, frame_position_init=0.1, sentence_gate_init=0.5,
                             contrast_weight=0.01, contrast_min_timestep=0)
    out = tmp_path / "world"
    trained = train_world(settings, out, init=WEIGHTS_DIR)
    record = json.loads((tmp_path / "world_training.json").read_text())
    assert not (out / "training.json").exists()  # the log is not part of the weights
    assert record["denoiser"]["steps"] == 3 and record["settings"]["offset_noise"] == 0.1
    reloaded = load_toy_world(out)
    # the VAE (and so the latent space) is kept; the denoiser moved and what was saved is it
    assert torch.equal(reloaded.vae.decoder.conv_out.weight, shipped.vae.decoder.conv_out.weight)
    gate_moved = (reloaded.text_encoder.sentence_gate - shipped.text_encoder.sentence_gate).detach()
    assert float(gate_moved.abs().mean()) > 0.1  # opened by about 0.5 * |N(0, 1)|
    for key, value in reloaded.unet.state_dict().items():
        assert torch.equal(value, trained.unet.state_dict()[key].half().float()), key
    moved = sum(not torch.equal(v, shipped.unet.state_dict()[k]) for k, v in reloaded.unet.state_dict().items())
    assert moved > 0.5 * len(shipped.unet.state_dict())
    # one save at step 2 (the EMA so far), one at the end; the EMA went on moving in between
    assert len(saved_unets) == 2
    assert any(not torch.equal(saved_unets[0][k], saved_unets[1][k]) for k in saved_unets[0])


def test_offset_noise_shifts_each_video_and_channel_by_one_shared_constant():
    from fastvader.toy.train_world import training_noise

    shape = (64, 4, 8, 8, 8)   # 512 values per (video, channel)
    plain = training_noise(shape, 0.0, torch.Generator().manual_seed(0))
    offset = training_noise(shape, 0.5, torch.Generator().manual_seed(0))
    # the same underlying draw, plus a constant over frames and pixels
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1, :1].expand_as(shift), atol=1e-6)
    # per-(video, channel) means: about 1/sqrt(512) = 0.044 apart without offset, about 0.5 with it
    assert float(plain.mean(dim=(2, 3, 4)).std()) < 0.08
    assert 0.38 < float(offset.mean(dim=(2, 3, 4)).std()) < 0.62


def test_high_noise_weight_is_the_v_loss_capped_and_normalised():
    from diffusers import DDPMScheduler

    from fastvader.toy.train_world import timestep_loss_weights

    alphas = DDPMScheduler.from_config(ToyWorldConfig().scheduler).alphas_cumprod
    assert torch.equal(timestep_loss_weights(alphas, 0.0), torch.ones_like(alphas))
    weights = timestep_loss_weights(alphas, 20.0)
    assert abs(float(weights.mean()) - 1.0) < 1e-5
    inverse_snr = (1 - alphas) / alphas
    raw = 1 + inverse_snr.clamp(max=20.0)
    # proportional to 1 + 1/SNR below the cap, flat at the cap above it
    ratio = weights / raw
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    low, high = int((inverse_snr < 0.1).nonzero().max()), int((inverse_snr > 20).nonzero().min())
    assert float(weights[high] / weights[low]) == pytest.approx(21.0 / (1 + float(inverse_snr[low])), rel=1e-4)
    assert torch.all(weights[high:] == weights[high])


def test_sentence_gate_puts_every_word_into_every_token_and_starts_closed(tmp_path):
    from safetensors.torch import load_file, save_file

    world = build_toy_world(ToyWorldConfig(), seed=0)
    encoder = world.text_encoder
    ids = world.tokenizer(["a red square moving left", "a red square moving up", ""])
    with torch.no_grad():
        ungated = encoder.norm(encoder.encoder(encoder.token(ids) + encoder.position))
        assert torch.allclose(encoder(ids), ungated, atol=1e-6)  # a new gate is closed
        encoder.sentence_gate.fill_(1.0)
        gated = encoder(ids)
    words = (ids[0] != 0).sum()
    assert torch.allclose(gated[0], ungated[0] + ungated[0, :words].mean(dim=0), atol=1e-5)
    assert torch.allclose(gated[2], ungated[2], atol=1e-6)  # the empty prompt has no words to pool
    # "red" (position 1) now differs between the two prompts by far more than through attention alone
    assert (gated[0, 1] - gated[1, 1]).abs().max() > 3 * (ungated[0, 1] - ungated[1, 1]).abs().max()

    # a world saved before the gate existed loads with the gate closed
    encoder.sentence_gate.data.zero_()
    save_toy_world(world, tmp_path, dtype=None)
    state = load_file(str(tmp_path / "text_encoder.safetensors"))
    del state["sentence_gate"]
    save_file(state, str(tmp_path / "text_encoder.safetensors"))
    loaded = load_toy_world(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder(ids), ungated, atol=1e-6)


def test_frame_positions_start_closed_and_then_tell_frames_apart(tmp_path):
    from safetensors.torch import load_file, save_file

    from fastvader.toy.model import FramePosition

    config = ToyWorldConfig()
    world = build_toy_world(config, seed=0)
    blocks = [m for m in world.unet.modules() if isinstance(getattr(m, "pos_embed", None), FramePosition)]
    assert len(blocks) == 5  # transformer_in, down 0, mid, up 1 (two)
    latents = torch.randn(2, 4, config.frames, 8, 8, generator=torch.Generator().manual_seed(0))
    text = world.text_encoder(world.tokenizer(["a red square moving left", "a blue circle"]))
    run = lambda: world.unet(latents, torch.tensor([500, 500]), encoder_hidden_states=text).sample  # noqa: E731
    with torch.no_grad():
        with_positions = run()
        saved = [block.pos_embed for block in blocks]
        for block in blocks:
            block.pos_embed = None
        plain = run()
        for block, position in zip(blocks, saved):
            block.pos_embed = position
        assert torch.equal(with_positions, plain)  # zero-initialised: the plain UNet3D exactly
        # time-reversed input gives time-reversed output without positions, not with them
        reversed_plain = world.unet(latents.flip(2), torch.tensor([500, 500]), encoder_hidden_states=text).sample
        for block in blocks:
            block.pos_embed.table.normal_(0, 0.5)
        moved = run()
        reversed_moved = world.unet(latents.flip(2), torch.tensor([500, 500]), encoder_hidden_states=text).sample
    assert not torch.allclose(moved, plain, atol=1e-3)
    symmetric_gap = (reversed_plain.flip(2) - plain).abs().max()
    assert (reversed_moved.flip(2) - moved).abs().max() > 10 * symmetric_gap + 1e-3
    with pytest.raises(ValueError, match="cover 8 frames .*got a video of 9: set video.frames <= 8"):
        blocks[0].pos_embed(torch.zeros(1, 9, blocks[0].pos_embed.table.shape[-1]))

    # a world saved before frame positions existed loads with them at zero
    for block in blocks:
        block.pos_embed.table.data.zero_()
    save_toy_world(world, tmp_path, dtype=None)
    state = load_file(str(tmp_path / "unet.safetensors"))
    save_file({k: v for k, v in state.items() if "pos_embed" not in k}, str(tmp_path / "unet.safetensors"))
    loaded = load_toy_world(tmp_path)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in loaded.unet.named_parameters() if "pos_embed" in n)


def test_open_frame_positions_adds_seeded_noise_of_the_given_std_to_every_table():
    from fastvader.toy.model import FramePosition
    from fastvader.toy.train_world import open_frame_positions

    unet = build_toy_world(ToyWorldConfig(), seed=0).unet
    tables = [m.table for m in unet.modules() if isinstance(m, FramePosition)]
    assert all(float(t.detach().abs().sum()) == 0 for t in tables)
    assert open_frame_positions(unet, 0.1, torch.Generator().manual_seed(0)) == len(tables) == 5
    values = torch.cat([t.detach().flatten() for t in tables])
    assert 0.08 < float(values.std()) < 0.12 and abs(float(values.mean())) < 0.02
    again = build_toy_world(ToyWorldConfig(), seed=0).unet
    open_frame_positions(again, 0.1, torch.Generator().manual_seed(0))
    assert all(torch.equal(a.table, b.table) for a, b in zip(
        [m for m in unet.modules() if isinstance(m, FramePosition)],
        [m for m in again.modules() if isinstance(m, FramePosition)]))


def test_swap_one_attribute_changes_exactly_one_named_word_within_its_attribute():
    from fastvader.toy.train_world import ATTRIBUTE_WORDS, swap_one_attribute

    generator = torch.Generator().manual_seed(0)
    prompt = "a red square moving left on a gray background"
    changed_groups = set()
    for _ in range(60):
        swapped = swap_one_attribute(prompt, generator)
        differences = [(a, b) for a, b in zip(prompt.split(), swapped.split()) if a != b]
        assert len(differences) == 1 and len(swapped.split()) == len(prompt.split()), swapped
        before, after = differences[0]
        group = next(g for g in ATTRIBUTE_WORDS if before in g)
        assert after in group
        changed_groups.add(group)
    assert len(changed_groups) == 4  # colour, shape, direction and background all get swapped
    short = swap_one_attribute("a blue circle", generator)
    assert len(short.split()) == 3 and short != "a blue circle"
    assert swap_one_attribute("", generator) is None


def test_contrast_loss_is_a_relative_hinge_that_pushes_the_wrong_prompt_away():
    from fastvader.toy.train_world import contrast_loss

    right = torch.tensor([1.0, 1.0, 2.0], requires_grad=True)
    wrong = torch.tensor([1.5, 1.1, 2.0], requires_grad=True)
    loss = contrast_loss(right, wrong, margin=0.2)
    # gaps 0.5 (met), 0.1 (0.1 short), 0.0 (0.2 short) -> mean of 0, 0.1, 0.2
    assert float(loss.detach()) == pytest.approx(0.1)
    loss.backward()
    assert wrong.grad[0] == 0 and wrong.grad[1] < 0 and wrong.grad[2] < 0  # lowering the loss raises them
    assert right.grad[0] == 0 and right.grad[1] > 0 and right.grad[2] > 0


@pytest.mark.parametrize("flag, value, rule", [
    ("--lr", "0", "> 0"), ("--vae-lr", "-1e-3", "> 0"), ("--offset-noise", "-0.1", ">= 0"),
    ("--high-noise-weight", "-1", ">= 0"), ("--vae-kl-weight", "-1e-5", ">= 0"),
    ("--frame-position-init", "-0.1", ">= 0"), ("--sentence-gate-init", "-0.5", ">= 0"),
    ("--contrast-weight", "-0.01", ">= 0"), ("--contrast-margin", "-0.2", ">= 0"),
])
def test_train_world_cli_names_the_bad_flag_and_the_rule(flag, value, rule, capsys, tmp_path):
    from fastvader.toy.train_world import main

    # no steps and a scratch --out: should the check go missing, this fails fast and harms nothing
    with pytest.raises(SystemExit):
        main(["--init", str(WEIGHTS_DIR), "--out", str(tmp_path), "--vae-steps", "0",
              "--denoiser-steps", "0", f"{flag}={value}"])
    assert f"{flag} must be {rule}; got {float(value)}" in capsys.readouterr().err
