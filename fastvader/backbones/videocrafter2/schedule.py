"""VideoCrafter2's noise schedule: the checkpoint's 13 schedule buffers and the diffusers
scheduler config that matches them.

VideoCrafter2 was trained with ``use_scale``: the forward process is
``x_t = sqrt(abar_t) * s_t * x0 + sqrt(1 - abar_t) * eps`` with ``s_t = scale_arr[t]`` falling
from 1 to 0.7 over t = 0..399 (and 0.7 above). LVDM's DDIM sampler undoes and re-applies that
scale at each step; a plain DDIM step does not, and drifts from the original's samples at the
low-noise end. :class:`LVDMScaledDDIMScheduler` is diffusers' DDIMScheduler with exactly that
step (in ``ddim.py``); the other samplers use the plain schedule (documented as an approximation).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from fastvader.backbones.videocrafter2.config import DiffusionConfig

def scale_array(cfg: DiffusionConfig) -> np.ndarray:
    """``scale_arr`` as LatentDiffusion builds it. The released model keeps the original's bug
    (``fix_scale_bug=False``): 400 ramp values then ``timesteps`` more, 1400 in all."""
    ramp = np.linspace(1.0, cfg.scale_b, 400)
    tail = cfg.timesteps - 400 if cfg.fix_scale_bug else cfg.timesteps
    return np.concatenate([ramp, np.full(tail, cfg.scale_b)])


def schedule_arrays(cfg: DiffusionConfig) -> dict[str, np.ndarray]:
    """The persistent buffers of ``LatentDiffusion.register_schedule`` (float64 before the cast)."""
    betas = np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    arrays = {
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }
    if cfg.use_scale:
        arrays["scale_arr"] = scale_array(cfg)
    return arrays


class LVDMNoiseSchedule(nn.Module):
    """Holds the schedule buffers (float32, as in the checkpoint). Deterministic from the config;
    they are kept because the checkpoint has them and strict loading expects them."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.config = cfg
        for name, values in schedule_arrays(cfg).items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32))

    def scheduler_config(self) -> dict:
        """The diffusers scheduler config of this schedule (DDIM 'leading' spacing with offset 1
        reproduces LVDM's uniform DDIM timesteps 1, 41, ..., 961 for 25 steps)."""
        cfg = self.config
        return dict(num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start, beta_end=cfg.linear_end,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                    timestep_spacing="leading",
                    prediction_type="v_prediction" if cfg.parameterization == "v" else "epsilon")
