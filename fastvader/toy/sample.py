"""Sampling the embedded world without the training machinery: DDIM with classifier-free
guidance, then the VAE decode. Small on purpose (tests and the world's training script use it);
fastvader.training.sampling is the general sampler with gradients and truncation."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def encode_latents(vae, videos: torch.Tensor, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Videos (B, F, 3, H, W) in [0, 1] -> scaled latents (B, C, F, h, w), frame by frame.
    ``sample`` draws from the posterior instead of taking its mean."""
    b, f = videos.shape[:2]
    posterior = vae.encode(videos.flatten(0, 1) * 2.0 - 1.0).latent_dist
    if sample:
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    else:
        z = posterior.mean
    z = z * vae.config.scaling_factor
    return z.unflatten(0, (b, f)).transpose(1, 2).contiguous()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, F, h, w) -> videos (B, F, 3, H, W) in [0, 1]. The VAE works in
    [-1, 1] like every diffusers VAE; frames are decoded independently."""
    b, _, f = latents.shape[:3]
    z = latents.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor
    pixels = vae.decode(z).sample
    return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).unflatten(0, (b, f))


@torch.no_grad()
def sample_videos(world, prompts: Sequence[str], seed: int, steps: int = 25,
                  guidance: float = 7.5) -> torch.Tensor:
    """Generate one video per prompt: DDIM (eta 0) for ``steps`` steps with classifier-free
    guidance ``guidance`` (1.0 switches guidance off). Returns (B, F, 3, H, W) in [0, 1].

    The initial noise for the whole batch comes from ``torch.Generator().manual_seed(seed)``
    on the CPU, so results do not depend on the device."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"sample_videos needs steps >= 1; got {steps}")
    cfg = world.config
    device = next(world.unet.parameters()).device
    scheduler = DDIMScheduler.from_config(cfg.scheduler)
    scheduler.set_timesteps(steps)

    prompts = list(prompts)
    use_guidance = guidance != 1.0
    ids = world.tokenizer(prompts + ([""] if use_guidance else [])).to(device)
    embeddings = world.text_encoder(ids)
    cond = embeddings[: len(prompts)]
    if use_guidance:
        uncond = embeddings[len(prompts):].expand_as(cond)
        cond = torch.cat([uncond, cond])

    shape = (len(prompts), world.vae.config.latent_channels, cfg.frames, cfg.height // 4, cfg.width // 4)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if use_guidance else latents
        noise = world.unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
        if use_guidance:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return decode_latents(world.vae, latents)


def save_grid(videos: torch.Tensor, path: str | Path, scale: int = 3) -> None:
    """Write videos (B, F, 3, H, W) in [0, 1] as one PNG: a row per video, a column per frame,
    one white pixel between tiles, each pixel enlarged ``scale`` times."""
    import imageio.v2 as imageio

    b, f, _, h, w = videos.shape
    canvas = torch.ones(b, f, 3, h + 2, w + 2)
    canvas[..., 1:-1, 1:-1] = videos.detach().float().cpu().clamp(0, 1)
    image = canvas.permute(0, 3, 1, 4, 2).reshape(b * (h + 2), f * (w + 2), 3)
    image = (image * 255).round().to(torch.uint8).numpy()
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    imageio.imwrite(str(path), image)
