"""Open-Sora 1.2's rectified-flow sampler as a diffusers FlowMatchEulerDiscreteScheduler.

Open-Sora samples at ``t_i = 1 - i / n`` (i = 0..n-1, then 0), each warped by
``t' = s t / (1 + (s - 1) t)`` with a shift ``s = sqrt(H W / 512^2) * sqrt(frames // 17 * 5)``
(its ``timestep_transform``). diffusers' flow scheduler applies the same warp with its
``shift``; only the grid differs (it spaces sigmas from 1 to 1/1000), so ``set_timesteps``
passes Open-Sora's grid. The Euler step is the same.
"""
from __future__ import annotations

import math

from diffusers import FlowMatchEulerDiscreteScheduler


def opensora_shift(num_frames: int, height: int, width: int, base_resolution: int = 512 * 512) -> float:
    """The resolution/length-dependent shift of Open-Sora's timestep_transform. Open-Sora counts
    ``frames // 17 * 5`` latent frames (0 below 17 frames, which would zero every timestep);
    fastvader uses at least 1 there."""
    latent_frames = 1 if num_frames == 1 else max(num_frames // 17 * 5, 1)
    return math.sqrt(height * width / base_resolution) * math.sqrt(latent_frames)


class OpenSoraFlowScheduler(FlowMatchEulerDiscreteScheduler):
    #: the DDPM-style attributes samplers expect (diffusers' flow scheduler lacks them):
    #: flow latents start as unit Gaussian noise and are fed to the model unscaled
    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]
        return super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                                     timesteps=timesteps)
