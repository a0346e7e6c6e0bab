"""Train the embedded world from scratch on the synthetic videos of fastvader.toy.world.

    python -m fastvader.toy.train_world [--out DIR] [--minutes M] [--seed S]

Three phases (the shipped weights took about 6 hours of 2-core CPU in five continued stages, see
docs/toy_world.md):

1. The VAE, on single frames in [-1, 1]: mean squared reconstruction error plus a small KL
   term, fresh synthetic videos every step. Its ``scaling_factor`` is then set to 1 / std of
   the posterior samples of held-out frames, so the denoiser sees latents of about unit std.
2. Optionally the decoder alone, on the frozen encoder's latents (same latent space).
3. The text encoder and the UNet3DConditionModel together, on scaled VAE latents of a fixed
   pool of encoded videos (a fresh posterior sample each time a video is drawn), with the
   epsilon-prediction DDPM loss under the noise schedule of ``ToyWorldConfig.scheduler``, each
   video weighted by 1 + min(1/SNR, 20) of its timestep (``timestep_loss_weights``), and offset
   noise. 10% of prompts are replaced by the empty prompt so classifier-free guidance works. An
   exponential moving average of both models is what gets saved.

Everything is seeded; ``--minutes`` caps the wall time (shared between the phases that run, see
PHASE_SHARES; each stops early when its share runs out), so a capped run is reproducible only given its step
counts, which the run's log records: ``<out>_training.json`` beside the ``--out`` folder (a log is
documentation, not part of the weights; the shipped world's logs are in docs/toy_world/).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvader.toy import world as synthetic
from fastvader.toy.model import WEIGHTS_DIR, ToyWorld, ToyWorldConfig, build_toy_world, load_toy_world, save_toy_world


@dataclass
class TrainSettings:
    seed: int = 0
    vae_steps: int = 600
    vae_videos_per_step: int = 8       # 4 random frames of each: 32 frames a step
    vae_frames_per_video: int = 4
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 2e-5        # per latent element, against per-pixel MSE (1e-4 blurred shapes away)
    decoder_steps: int = 0             # decoder-only fine-tuning on the frozen encoder's latents
    decoder_lr: float = 1e-3
    pool_videos: int = 2048            # encoded once for the denoiser phase
    denoiser_steps: int = 1500
    batch_size: int = 16
    denoiser_lr: float = 8e-4
    prompt_dropout: float = 0.1
    offset_noise: float = 0.1          # std of a per-video, per-channel constant added to the noise
    high_noise_weight: float = 20.0    # cap of the 1/SNR term in the loss weight (0: plain epsilon loss)
    frame_position_init: float = 0.0   # std of random values added to the frame positions
    sentence_gate_init: float = 0.0    # std of random values added to the text encoder's sentence gate
    contrast_weight: float = 0.0       # weight of the wrong-word hinge (0: off), see contrast_loss
    contrast_margin: float = 0.2       # how much worse (relative) a wrong word must explain the video
    contrast_min_timestep: int = 300   # the hinge applies where the noisy video does not show it all
    ema_decay: float = 0.995
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    minutes: float | None = None       # wall-clock cap for both phases together
    log_every: int = 25
    save_every: int = 0                # write the EMA world to --out every N denoiser steps (0: only at the end)


def _lr_factor(step: int, total: int, warmup: int, started: float, deadline: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak. Under a wall-clock cap, progress is
    whichever is further along, steps or time, so a cut-short run still ends annealed."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if math.isfinite(deadline):
        progress = max(progress, (time.time() - started) / max(1e-9, deadline - started))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Log:
    """Prints a line every ``every`` steps with the loss averaged since the last line."""

    def __init__(self, phase: str, total: int, every: int):
        self.phase, self.total, self.every = phase, total, every
        self.start = self.last = time.time()
        self.losses: list[float] = []
        self.history: list[tuple[int, float]] = []

    def step(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            mean = sum(self.losses) / len(self.losses)
            now = time.time()
            per_step = (now - self.last) / len(self.losses)
            print(f"[{self.phase}] step {step + 1}/{self.total} loss {mean:.5f} "
                  f"{per_step:.2f} s/step elapsed {now - self.start:.0f} s", flush=True)
            self.history.append((step + 1, mean))
            self.losses, self.last = [], now


# Shares of --minutes per phase, renormalised over the phases that run.
PHASE_SHARES = dict(vae=0.2, decoder=0.2, denoiser=0.6)


def _phase_deadlines(settings: TrainSettings, start: float) -> dict[str, float]:
    """When each phase must stop (they run in the order vae, decoder, denoiser)."""
    running = {name: share for name, share in PHASE_SHARES.items()
               if getattr(settings, f"{name}_steps") > 0}
    deadlines, used = {}, 0.0
    for name, share in running.items():
        used += share / sum(running.values())
        deadlines[name] = math.inf if settings.minutes is None else start + settings.minutes * 60 * used
    return deadlines


def _frame_batch(settings: TrainSettings, step: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh synthetic frames in [-1, 1]: a few random frames of each of a few new videos."""
    _, videos = synthetic.sample_batch(settings.vae_videos_per_step, seed=settings.seed * 1_000_003 + step)
    picks = torch.rand(videos.shape[:2], generator=generator).argsort(dim=1)[:, : settings.vae_frames_per_video]
    return torch.stack([v[p] for v, p in zip(videos, picks)]).flatten(0, 1) * 2.0 - 1.0


@torch.no_grad()
def _heldout_vae_check(vae, settings: TrainSettings, generator: torch.Generator) -> tuple[float, float]:
    """Reconstruction MSE of held-out frames (pixels in [0, 1], a seed training never draws)
    and 1 / std of their posterior samples (the scaling factor that gives unit-std latents)."""
    _, videos = synthetic.sample_batch(64, seed=settings.seed * 1_000_003 - 1)
    frames = videos.flatten(0, 1) * 2.0 - 1.0
    posterior = vae.encode(frames).latent_dist
    reconstruction = vae.decode(posterior.mean).sample
    mse = F.mse_loss((reconstruction + 1) / 2, (frames + 1) / 2).item()
    samples = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    return mse, float(1.0 / samples.std())


def train_vae(world: ToyWorld, settings: TrainSettings, deadline: float = math.inf) -> dict:
    """Phase 1. Returns a summary (steps run, final loss, held-out error, scaling factor)."""
    vae = world.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 1)
    log = _Log("vae", settings.vae_steps, settings.log_every)
    steps_run = 0
    for step in range(settings.vae_steps):
        if time.time() > deadline:
            print(f"[vae] wall-clock share used up after {step} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * _lr_factor(step, settings.vae_steps, settings.warmup_steps,
                                                         log.start, deadline)
        frames = _frame_batch(settings, step, generator)
        posterior = vae.encode(frames).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(reconstruction, frames) + settings.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), settings.grad_clip)
        optimizer.step()
        log.step(step, loss.item())
        steps_run = step + 1
    vae.eval()

    heldout_mse, scaling_factor = _heldout_vae_check(vae, settings, generator)
    vae.register_to_config(scaling_factor=scaling_factor)
    world.config.vae["scaling_factor"] = scaling_factor
    print(f"[vae] held-out reconstruction MSE (pixels in [0,1]) {heldout_mse:.5f}; "
          f"scaling_factor {scaling_factor:.4f}", flush=True)
    return dict(steps=steps_run, history=log.history, heldout_mse=heldout_mse,
                scaling_factor=scaling_factor, seconds=time.time() - log.start)


def finetune_decoder(world: ToyWorld, settings: TrainSettings, deadline: float = math.inf) -> dict:
    """Decoder-only training on posterior samples of the frozen encoder: sharper frames without
    moving the latent space, so a denoiser trained on these latents stays valid."""
    vae = world.vae
    vae.eval()
    vae.decoder.train()
    parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.decoder_lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 3)
    log = _Log("decoder", settings.decoder_steps, settings.log_every)
    steps_run = 0
    for step in range(settings.decoder_steps):
        if time.time() > deadline:
            print(f"[decoder] wall-clock share used up after {step} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.decoder_lr * _lr_factor(step, settings.decoder_steps, settings.warmup_steps,
                                                             log.start, deadline)
        # A stream of frames the VAE phase did not draw (offset seeds).
        frames = _frame_batch(settings, 10_000_000 + step, generator)
        with torch.no_grad():
            posterior = vae.encode(frames).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, frames)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        log.step(step, loss.item())
        steps_run = step + 1
    vae.eval()
    heldout_mse, _ = _heldout_vae_check(vae, settings, generator)
    print(f"[decoder] held-out reconstruction MSE (pixels in [0,1]) {heldout_mse:.5f}", flush=True)
    return dict(steps=steps_run, history=log.history, heldout_mse=heldout_mse,
                seconds=time.time() - log.start)


@torch.no_grad()
def encode_pool(world: ToyWorld, settings: TrainSettings) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The denoiser's training set: prompts and the posterior mean/std (unscaled) of each frame,
    as (N, C, F, h, w) tensors."""
    start = time.time()
    prompts, means, stds = [], [], []
    chunk = 64
    for first in range(0, settings.pool_videos, chunk):
        n = min(chunk, settings.pool_videos - first)
        chunk_prompts, videos = synthetic.sample_batch(n, seed=settings.seed * 7919 + 2 + first)
        posterior = world.vae.encode(videos.flatten(0, 1) * 2.0 - 1.0).latent_dist
        to_video = lambda t: t.unflatten(0, (n, videos.shape[1])).transpose(1, 2)  # noqa: E731
        prompts += chunk_prompts
        means.append(to_video(posterior.mean))
        stds.append(to_video(posterior.std))
    print(f"[pool] encoded {settings.pool_videos} videos in {time.time() - start:.0f} s", flush=True)
    return prompts, torch.cat(means), torch.cat(stds)


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise for latents (B, C, F, h, w), plus ``offset`` times one standard-normal
    constant per video and channel (offset noise).

    The schedule's last step still carries ~7% of the signal, so a model trained on zero-mean
    noise learns to copy the mean colour from x_T, and at sampling time (where x_T has none)
    every frame drifts to mid-gray. The shared shift teaches it to set frame-wide colour itself:
    backgrounds, object colours."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1, 1), generator=generator)
    return noise


def timestep_loss_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep weights for the epsilon loss: 1 + min(1/SNR, cap), normalised to mean 1.

    The epsilon error at high noise is tiny even when the predicted clean video is wrong, so a
    plain epsilon loss barely teaches what is decided there: where the shape is, which way it
    moves, what outline it has (measured: swapping the direction word in the prompt left the
    stage-4 loss unchanged at every noise level). Weighting by 1 + 1/SNR is the loss of
    v-prediction, i.e. the clean-video error at high noise, while the epsilon parameterisation
    (and every sampler) stays as it is; the cap keeps the last steps from dominating.
    ``cap = 0`` gives the plain epsilon loss."""
    if cap <= 0:
        return torch.ones_like(alphas_cumprod)
    weights = 1.0 + ((1.0 - alphas_cumprod) / alphas_cumprod).clamp(max=cap)
    return weights / weights.mean()


def open_frame_positions(unet: torch.nn.Module, std: float, generator: torch.Generator) -> int:
    """Add normal(0, std) values to every ``FramePosition`` table of ``unet``; returns how many.

    Positions that start at (or near) zero sit on a saddle: a direction word can only matter
    through frame positions, and positions only get a gradient once a word makes them matter, so
    both stay put (measured: 1,100 steps from zero left the tables below 0.01 and the direction
    words without any effect). Small random positions (and an opened sentence gate, the text side
    of the same saddle) move the model off it; on the 2-core CPU that was not yet enough for the
    direction words to take effect (docs/toy_world.md)."""
    from fastvader.toy.model import FramePosition

    opened = 0
    for module in unet.modules():
        if isinstance(module, FramePosition):
            with torch.no_grad():
                module.table.add_(std * torch.randn(module.table.shape, generator=generator))
            opened += 1
    return opened


ATTRIBUTE_WORDS = (tuple(synthetic.COLORS), tuple(synthetic.SHAPES), tuple(synthetic.DIRECTIONS),
                   tuple(synthetic.BACKGROUNDS))


def swap_one_attribute(prompt: str, generator: torch.Generator) -> str | None:
    """``prompt`` with one of the attributes it names (picked at random) replaced by another value
    of the same attribute: "a red square moving left" -> "a red square moving up". None when the
    prompt names none (the empty prompt)."""
    words = prompt.split()
    slots = [(i, options) for i, word in enumerate(words) for options in ATTRIBUTE_WORDS if word in options]
    if not slots:
        return None
    i, options = slots[int(torch.randint(len(slots), (1,), generator=generator))]
    others = [option for option in options if option != words[i]]
    words[i] = others[int(torch.randint(len(others), (1,), generator=generator))]
    return " ".join(words)


def contrast_loss(right: torch.Tensor, wrong: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on how much worse the prompt with a wrong word explains the same noisy video:
    mean of relu(margin - (wrong - right) / right), per-video errors ``right`` and ``wrong``.

    The plain loss rewards using a word only as much as the word tells about the noisy video, and
    the stage-4 world's loss did not change at all when the direction word was swapped. The hinge
    asks for the difference directly and is zero once a word makes it. Used for 300 steps of
    stage 5 (docs/toy_world.md): it widened the colour gap, not the direction one."""
    gap = (wrong - right) / right.detach().clamp(min=1e-8)
    return F.relu(margin - gap).mean()


def _wrong_word_hinge(world: ToyWorld, settings: TrainSettings, prompts: list[str], noisy: torch.Tensor,
                      noise: torch.Tensor, timesteps: torch.Tensor, right: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """contrast_loss over the batch's videos at timesteps >= contrast_min_timestep, each against
    its prompt with one attribute swapped (zero when none qualifies)."""
    swapped = [swap_one_attribute(p, generator) for p in prompts]
    chosen = [i for i, (p, t) in enumerate(zip(swapped, timesteps.tolist()))
              if p is not None and t >= settings.contrast_min_timestep]
    if not chosen:
        return right.new_zeros(())
    text = world.text_encoder(world.tokenizer([swapped[i] for i in chosen]))
    wrong = world.unet(noisy[chosen], timesteps[chosen], encoder_hidden_states=text, return_dict=False)[0]
    wrong_per_video = ((wrong - noise[chosen]) ** 2).flatten(1).mean(dim=1)
    return contrast_loss(right[chosen], wrong_per_video, settings.contrast_margin)


def train_denoiser(world: ToyWorld, settings: TrainSettings, deadline: float = math.inf,
                   out: Path | None = None) -> dict:
    """Phase 2: text encoder + UNet on the encoded pool. Leaves the EMA weights in ``world``
    (and, with ``settings.save_every``, writes them to ``out`` along the way, so a run stopped
    early keeps its progress)."""
    from diffusers import DDPMScheduler

    prompts, means, stds = encode_pool(world, settings)
    if settings.frame_position_init:
        filled = open_frame_positions(world.unet, settings.frame_position_init,
                                      torch.Generator().manual_seed(settings.seed * 1000 + 4))
        print(f"[denoiser] opened {filled} frame-position tables (std {settings.frame_position_init})", flush=True)
    if settings.sentence_gate_init:
        with torch.no_grad():  # the text side of the same saddle (see ToyTextEncoder)
            gate = world.text_encoder.sentence_gate
            gate.add_(settings.sentence_gate_init * torch.randn(
                gate.shape, generator=torch.Generator().manual_seed(settings.seed * 1000 + 5)))
    noise_schedule = DDPMScheduler.from_config(world.config.scheduler)
    scaling = world.vae.config.scaling_factor
    loss_weights = timestep_loss_weights(noise_schedule.alphas_cumprod, settings.high_noise_weight)
    models = torch.nn.ModuleDict(dict(text_encoder=world.text_encoder, unet=world.unet))
    models.train()
    ema = copy.deepcopy(models).requires_grad_(False)
    optimizer = torch.optim.AdamW(models.parameters(), lr=settings.denoiser_lr,
                                  weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 2)
    log = _Log("denoiser", settings.denoiser_steps, settings.log_every)
    steps_run = 0
    for step in range(settings.denoiser_steps):
        if time.time() > deadline:
            print(f"[denoiser] wall-clock share used up after {step} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.denoiser_lr * _lr_factor(step, settings.denoiser_steps,
                                                              settings.warmup_steps, log.start, deadline)
        index = torch.randint(len(prompts), (settings.batch_size,), generator=generator)
        drop = torch.rand(settings.batch_size, generator=generator) < settings.prompt_dropout
        batch_prompts = ["" if d else prompts[i] for i, d in zip(index.tolist(), drop.tolist())]
        mean, std = means[index], stds[index]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        noise = training_noise(latents.shape, settings.offset_noise, generator)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (settings.batch_size,),
                                  generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        text = world.text_encoder(world.tokenizer(batch_prompts))
        prediction = world.unet(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        per_video = ((prediction - noise) ** 2).flatten(1).mean(dim=1)
        loss = (loss_weights[timesteps] * per_video).mean()
        if settings.contrast_weight:
            loss = loss + settings.contrast_weight * _wrong_word_hinge(
                world, settings, batch_prompts, noisy, noise, timesteps, per_video, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), settings.grad_clip)
        optimizer.step()
        # EMA with a warm-up (decay grows from 0.5 towards ema_decay) so short runs still average.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), models.parameters()):
                averaged.lerp_(live, 1.0 - decay)
        log.step(step, loss.item())
        steps_run = step + 1
        if out is not None and settings.save_every and steps_run % settings.save_every == 0:
            save_toy_world(ToyWorld(world.config, world.tokenizer, ema["text_encoder"], ema["unet"], world.vae), out)
            print(f"[denoiser] saved the EMA world to {out} at step {steps_run}", flush=True)
    models.load_state_dict(ema.state_dict())
    models.eval()
    return dict(steps=steps_run, history=log.history, seconds=time.time() - log.start)


def training_log_path(out: Path) -> Path:
    """Where a run writing its world to ``out`` logs settings, step counts and losses: next to the
    folder, never inside it, so retraining the shipped world adds no file to the package."""
    folder = Path(out).resolve()
    return folder.with_name(f"{folder.name}_training.json")


def train_world(settings: TrainSettings, out: Path = WEIGHTS_DIR, init: Path | None = None) -> ToyWorld:
    """Run the phases with steps > 0 (vae, decoder, denoiser, in that order), from random
    weights or from the world in ``init``; write the weights to ``out`` and the run's log beside
    it (``training_log_path``)."""
    torch.manual_seed(settings.seed)
    start = time.time()
    world = load_toy_world(init) if init is not None else build_toy_world(ToyWorldConfig(), seed=settings.seed)
    for module in (world.vae, world.unet, world.text_encoder):
        module.requires_grad_(True)
    if init is None and settings.vae_steps == 0:
        raise ValueError("training from scratch needs vae_steps > 0 (or start from --init DIR)")
    deadlines = _phase_deadlines(settings, start)
    summary: dict = dict(settings=asdict(settings), init=None if init is None else str(init))
    if settings.vae_steps:
        summary["vae"] = train_vae(world, settings, deadlines["vae"])
    if settings.decoder_steps:
        summary["decoder"] = finetune_decoder(world, settings, deadlines["decoder"])
    if settings.denoiser_steps:
        summary["denoiser"] = train_denoiser(world, settings, deadlines["denoiser"], out)
    for module in (world.vae, world.unet, world.text_encoder):
        module.requires_grad_(False)
    save_toy_world(world, out)
    summary.update(wall_seconds=time.time() - start, torch=torch.__version__, threads=torch.get_num_threads())
    training_log_path(out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} after {summary['wall_seconds'] / 60:.1f} minutes", flush=True)
    return world


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m fastvader.toy.train_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help="folder for world.json + safetensors (default: the shipped weights, %(default)s)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock cap for the whole run (default: none, run all steps)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="(default: %(default)s)")
    parser.add_argument("--decoder-steps", type=int, default=defaults.decoder_steps,
                        help="decoder-only fine-tuning after the VAE phase (default: %(default)s)")
    parser.add_argument("--denoiser-steps", type=int, default=defaults.denoiser_steps, help="(default: %(default)s)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this toy world folder instead of random weights; "
                             "pass --vae-steps 0 to keep its VAE (and latent scale) as it is")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument("--pool-videos", type=int, default=defaults.pool_videos, help="(default: %(default)s)")
    parser.add_argument("--offset-noise", type=float, default=defaults.offset_noise,
                        help="std of the per-channel noise offset (0 switches it off; default: %(default)s)")
    parser.add_argument("--high-noise-weight", type=float, default=defaults.high_noise_weight,
                        help="weight the epsilon loss by 1 + min(1/SNR, this), normalised to mean 1 "
                             "(0: unweighted; default: %(default)s)")
    parser.add_argument("--frame-position-init", type=float, default=defaults.frame_position_init,
                        help="add normal(0, this) to the frame positions before training "
                             "(0: leave them; default: %(default)s)")
    parser.add_argument("--sentence-gate-init", type=float, default=defaults.sentence_gate_init,
                        help="add normal(0, this) to the text encoder's sentence gate before training "
                             "(0: leave it; default: %(default)s)")
    parser.add_argument("--contrast-weight", type=float, default=defaults.contrast_weight,
                        help="weight of the hinge asking a prompt with one wrong word to explain the video "
                             "worse by --contrast-margin (0: off; default: %(default)s)")
    parser.add_argument("--contrast-margin", type=float, default=defaults.contrast_margin, help="(default: %(default)s)")
    parser.add_argument("--vae-lr", type=float, default=defaults.vae_lr, help="(default: %(default)s)")
    parser.add_argument("--vae-kl-weight", type=float, default=defaults.vae_kl_weight,
                        help="KL weight per latent element against per-pixel MSE (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.denoiser_lr, help="denoiser peak lr (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=defaults.save_every,
                        help="write the EMA world to --out every N denoiser steps (default: %(default)s, only at the end)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name, least in (("vae_steps", 0), ("decoder_steps", 0), ("denoiser_steps", 0),
                        ("batch_size", 1), ("pool_videos", 1), ("save_every", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}; got {getattr(args, name)}")
    if args.init is None and args.vae_steps == 0:
        parser.error("--vae-steps 0 needs --init DIR (a world whose VAE to keep)")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be > 0; got {args.minutes}")
    for name in ("offset_noise", "high_noise_weight", "vae_kl_weight", "frame_position_init",
                 "sentence_gate_init", "contrast_weight", "contrast_margin"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")
    for name in ("lr", "vae_lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(seed=args.seed, vae_steps=args.vae_steps, decoder_steps=args.decoder_steps,
                             denoiser_steps=args.denoiser_steps, batch_size=args.batch_size,
                             pool_videos=args.pool_videos, minutes=args.minutes,
                             offset_noise=args.offset_noise, denoiser_lr=args.lr,
                             high_noise_weight=args.high_noise_weight, vae_lr=args.vae_lr,
                             vae_kl_weight=args.vae_kl_weight, frame_position_init=args.frame_position_init,
                             sentence_gate_init=args.sentence_gate_init, contrast_weight=args.contrast_weight,
                             contrast_margin=args.contrast_margin, save_every=args.save_every)
    train_world(settings, args.out, args.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
