"""The training loop on the embedded world's architecture (random weights, tiny schedules)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastvader.config import load_config
from fastvader.lora import adapters_disabled
from fastvader.rewards.base import Reward
from fastvader.training.draws import BatchDraws
from fastvader.training.frames import FrameSelector
from fastvader.memory.decode import decode_frames
from fastvader.training.sampling import TruncationPolicy, classifier_free_guidance
from fastvader.training.trainer import Trainer


def tiny_overrides(tmp_path, *overrides):
    return ["prompts.items=[a red square moving left, a blue circle moving up]",
            "backbone.random_init=true", "sampler.steps=3", "train.steps=2", "train.progress=false",
            f"train.output_dir={tmp_path}", "train.run_name=run", "validation.save_videos=false",
            "validation.prompts=[a green square moving right]", "reward.name=brightness", "optim.lr=1e-3",
            *overrides]


def tiny_config(tmp_path, *overrides):
    return load_config(None, tiny_overrides(tmp_path, *overrides))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(tiny_config(tmp_path_factory.mktemp("loop"), "sampler.steps=4", "sampler.truncation=specific:2"))


def _record_denoiser_calls(trainer):
    """Hook the denoiser: remember each call's output and which calls receive gradient."""
    calls, got_grad = [], set()

    def hook(module, args, output):
        output = output[0] if isinstance(output, tuple) else output.sample
        index = len(calls)
        calls.append(output.requires_grad)
        if output.requires_grad:
            output.register_hook(lambda g: got_grad.add(index))
    return calls, got_grad, trainer.backbone.denoiser.register_forward_hook(hook)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_reach_lora_only_from_the_last_k_steps(trainer, k):
    calls, got_grad, handle = _record_denoiser_calls(trainer)
    try:
        embeds = trainer.prompt_cache(["a red square moving left"])
        noise = trainer.sampler.initial_noise(1, trainer.latent_shape, torch.Generator().manual_seed(0), "cpu")
        latents = trainer.sampler.sample(embeds, noise, grad_steps=k)
        latents.mean().backward()
    finally:
        handle.remove()
        trainer.optimizer.zero_grad(set_to_none=True)
    steps = trainer.sampler.steps
    assert len(calls) == steps  # CFG batches cond and uncond into one call per step
    assert calls == [False] * (steps - k) + [True] * k
    assert got_grad == set(range(steps - k, steps))


def test_rand_truncation_draws_k_once_per_video_within_bounds():
    g = torch.Generator().manual_seed(0)
    draws = [TruncationPolicy.parse("rand", 5).draw(g) for _ in range(200)]
    assert set(draws) == {1, 2, 3, 4, 5}
    draws = [TruncationPolicy.parse("range:2-3", 5).draw(g) for _ in range(50)]
    assert set(draws) == {2, 3}
    assert TruncationPolicy.parse("last", 5).draw(g) == 1
    assert TruncationPolicy.parse("specific:4", 5).draw(g) == 4


def test_frame_selector_modes():
    g = torch.Generator().manual_seed(0)
    frames, grad = FrameSelector("random:3", "same", 8).draw(g)
    assert len(frames) == 3 and frames == sorted(set(frames)) and grad == frames
    assert FrameSelector("stride:3", "same", 8).draw(g) == ([0, 3, 6], [0, 3, 6])
    assert FrameSelector("list:1,5", "list:5", 8).draw(g) == ([1, 5], [5])
    frames, grad = FrameSelector("all", "random:2", 8).draw(g)
    assert frames == list(range(8)) and len(grad) == 2 and set(grad) <= set(frames)


def test_decode_frames_carries_gradients_only_for_grad_frames(trainer):
    vae = trainer.backbone.vae
    latents = torch.randn(1, 4, 6, 8, 8, requires_grad=True)
    video = decode_frames(vae, latents, frames=[1, 3, 5], grad_frames=[3])
    assert video.shape == (1, 3, 3, 32, 32)
    video.sum().backward()
    per_frame = latents.grad.abs().sum(dim=(0, 1, 3, 4))
    assert per_frame[3] > 0
    assert torch.count_nonzero(per_frame) == 1
    with torch.no_grad():  # values equal the plain decode of the same frames
        plain = vae.decode(latents[:, :, 1] / vae.config.scaling_factor).sample
    torch.testing.assert_close(video[:, 0].detach(), (plain / 2 + 0.5).clamp(0, 1))


def test_training_changes_lora_only(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    base = {n: p.detach().clone() for n, p in trainer.backbone.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.backbone.named_parameters() if "lora_" in n}
    trainer.train_step()
    trainer.train_step()
    after = dict(trainer.backbone.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "a base weight changed"
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "no LoRA weight changed"
    trainable = {n for n, p in trainer.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.backbone.denoiser.named_parameters() if "lora_" in n}


def test_resume_continues_exactly(tmp_path):
    common = ["sampler.truncation=rand", "frames.reward=random:2", "sampler.eta=0.5", "sampler.steps=2"]
    straight = Trainer(tiny_config(tmp_path / "a", "train.steps=8", *common))
    straight.fit()

    first = Trainer(tiny_config(tmp_path / "b", "train.steps=4", "train.checkpoint_every=4", *common))
    first.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", "train.steps=8", *common), resume=tmp_path / "b" / "run")
    assert resumed.step == 4
    resumed.fit()
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


KILLED_WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from fastvader.config import load_config
from fastvader.training.trainer import train
train(load_config(None, json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_resume_after_sigkill_continues_as_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL (at whatever point of a step or a save it was) resumes from its
    latest complete checkpoint and ends where an uninterrupted run ends."""
    torch.set_num_threads(1)
    common = ["train.steps=8", "sampler.truncation=rand", "frames.reward=random:2", "sampler.steps=2",
              "train.checkpoint_every=1"]
    straight = Trainer(tiny_config(tmp_path / "a", *common))
    start = _lora(straight)
    straight.fit()

    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    worker = subprocess.Popen([sys.executable, str(script), json.dumps(tiny_overrides(tmp_path / "b", *common))],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text() >= "step_0000002") and worker.poll() is None:
        assert time.monotonic() < deadline, "the worker wrote no second checkpoint in 5 minutes"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = Trainer(tiny_config(tmp_path / "b", *common), resume=tmp_path / "b" / "run")
    assert 2 <= resumed.step < 8
    resumed.fit()
    a, b = _lora(straight), _lora(resumed)
    assert max(float((a[n] - start[n]).abs().max()) for n in a) > 1e-5  # trained: not two inits compared
    for name in a:  # another process computed the first steps: equal to rounding
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-8)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_crash_mid_checkpoint_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    from fastvader.io import checkpoint as ckpt

    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    good = trainer.save_checkpoint()
    good_lora = _lora(trainer)
    trainer.train_step()

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(trainer.run_dir) == good
    assert not list((trainer.run_dir / "checkpoints").glob("*.tmp*"))
    again = Trainer(tiny_config(tmp_path), resume=trainer.run_dir)
    assert again.step == 1
    for name, value in good_lora.items():
        torch.testing.assert_close(_lora(again)[name], value, rtol=0, atol=0)


def test_grad_accumulation_averages_the_micro_batches_gradients(tmp_path):
    """optim.grad_accum=2: one update from the mean of the two micro-batches' gradients (the
    accelerator divides each loss by 2 and steps only at the step's end)."""
    from fastvader.training.draws import BatchDraws

    lr, eps = 0.05, 1.0  # with eps >> |g|, Adam's first update is -lr * g / (|g| + eps): close to -lr * g
    trainer = Trainer(tiny_config(tmp_path, "optim.grad_accum=2", f"optim.lr={lr}", f"optim.eps={eps}",
                                  "optim.weight_decay=0", "optim.max_grad_norm=0", "guards.self_check=false"))
    before = [p.detach().clone() for p in trainer.lora_params]
    grads = []
    for micro in range(2):  # the draws the step will make
        draws = BatchDraws.for_step(trainer.cfg.train.seed, 0, micro, 0, 1)
        prompts = [trainer.prompts.sample(1, g)[0] for g in draws.videos]
        reward, _ = trainer.forward_reward(prompts, {}, draws)
        grads.append(torch.autograd.grad(-reward.mean(), trainer.lora_params))
    result = trainer.train_step()
    assert result.step == 1 and not result.skipped
    assert {"sample", "decode", "reward", "backward"} <= set(result.timings)
    mean = [(a + b) / 2 for a, b in zip(*grads)]
    assert result.grad_norm == pytest.approx(float(torch.cat([g.flatten() for g in mean]).norm()), rel=1e-4)
    for p, p0, g in zip(trainer.lora_params, before, mean):
        torch.testing.assert_close(p.detach() - p0, -lr * g / (g.abs() + eps), rtol=1e-4, atol=1e-9)
    assert max(float(g.abs().max()) for g in mean) > 0


class _RecordingChangeReward(Reward):
    """Scores a change (needs the base model's video) and remembers what it was given."""

    name = "recording_change_test_reward"
    weightless = True
    needs_reference = True

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score_videos(self, videos, prompts, reference):
        self.seen.append((videos.detach().clone(), reference.clone()))
        return -((videos - reference) ** 2).mean(dim=(1, 2, 3, 4))


def test_a_reward_that_scores_a_change_gets_the_base_models_video_from_the_same_noise(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "sampler.steps=3", "sampler.truncation=specific:2",
                                  "frames.reward=list:0,2", "train.batch_size=2"))
    try:
        with torch.no_grad():  # a LoRA that changes the videos (a fresh one starts as the base model)
            for name, p in trainer.backbone.denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        reward = trainer.rollout.reward = _RecordingChangeReward()
        prompts = ["a red square moving left", "a blue circle moving up"]
        rewards, _ = trainer.rollout(prompts, BatchDraws.for_step(0, 0, 0, 0, 2), {})
        rewards.sum().backward()
        video, reference = reward.seen[0]
        # what the base model draws from the same noise (the same draws, replayed)
        draws = BatchDraws.for_step(0, 0, 0, 0, 2)
        noise = torch.cat([trainer.sampler.initial_noise(1, trainer.latent_shape, g, "cpu") for g in draws.videos])
        with torch.no_grad(), adapters_disabled(trainer.backbone.denoiser):
            base = trainer.sampler.sample(trainer.prompt_cache(prompts), noise)
            expected = trainer.backbone.decode_frames(base, [0, 2])
        torch.testing.assert_close(reference, expected)
        assert (video - reference).abs().max() > 1e-3  # the trained video is the LoRA's, not the base's
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.lora_params)
        # validation scores against the base model's videos from the validation seed
        reward.seen.clear()
        trainer.rollout.score(prompts, seeds=[3])
        video, reference = reward.seen[0]
        with adapters_disabled(trainer.backbone.denoiser):
            torch.testing.assert_close(reference, trainer.rollout.sample_videos(prompts, 3))
        torch.testing.assert_close(video, trainer.rollout.sample_videos(prompts, 3))
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.close()


def test_x0_truncation_stops_the_chain_and_scores_the_clean_latents_one_gradient_call_predicts(trainer):
    """sampler.truncation=x0:A-B (ReFL): no-grad steps up to the K-th step from the end, then one
    call with gradients, whose DDIM prediction of the clean latents is what gets decoded."""
    embeds = trainer.prompt_cache(["a red square moving left"])
    noise = trainer.sampler.initial_noise(1, trainer.latent_shape, torch.Generator().manual_seed(0), "cpu")
    steps, k = trainer.sampler.steps, 3
    calls, got_grad, handle = _record_denoiser_calls(trainer)
    try:
        predicted = trainer.sampler.sample(embeds, noise, grad_steps=k, predict_x0=True)
        predicted.mean().backward()
    finally:
        handle.remove()
        trainer.optimizer.zero_grad(set_to_none=True)
    assert calls == [False] * (steps - k) + [True] and got_grad == {steps - k}
    # the reference: the same chain by hand, and x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) at its last step
    scheduler = trainer.sampler.scheduler
    scheduler.set_timesteps(steps)
    latents = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[:steps - k + 1]):
            eps = classifier_free_guidance(trainer.backbone, latents, t, embeds, trainer.sampler.guidance_scale)
            if i == steps - k:
                alpha = scheduler.alphas_cumprod[int(t)].double()
                expected = (latents.double() - (1 - alpha).sqrt() * eps.double()) / alpha.sqrt()
            else:
                latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    torch.testing.assert_close(predicted.detach().double(), expected, rtol=1e-4, atol=1e-4)
    # the plain chain, for contrast, goes on to the end
    with torch.no_grad():
        assert (trainer.sampler.sample(embeds, noise) - predicted).abs().max() > 1e-3
    assert TruncationPolicy.parse("x0:2-3", steps).predicts_x0
    assert {TruncationPolicy.parse("x0:2-3", steps).draw(torch.Generator().manual_seed(s)) for s in range(20)} == {2, 3}
