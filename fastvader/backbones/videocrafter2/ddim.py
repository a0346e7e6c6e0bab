"""LVDM's DDIM step with ``use_scale`` as a diffusers scheduler (see ``schedule.py``)."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastvader.backbones.videocrafter2.config import DiffusionConfig
from fastvader.backbones.videocrafter2.schedule import scale_array


class LVDMScaledDDIMScheduler(DDIMScheduler):
    """DDIM with LVDM's ``use_scale`` step:
    ``x_prev = sqrt(abar_prev) * s_prev * x0_hat / s_t + dir_xt + sigma_t * z``,
    where ``x0_hat`` is the usual DDIM estimate (which carries the factor ``s_t``). With
    ``scale_b=1`` it is exactly diffusers' DDIM step (tests check this). Build it with
    :meth:`from_ddim_config`."""

    scale_arr: torch.Tensor

    @classmethod
    def from_ddim_config(cls, config: dict, scale_b: float, fix_scale_bug: bool) -> "LVDMScaledDDIMScheduler":
        # DDIMScheduler's own __init__ keeps its explicit signature (from_config relies on it);
        # the scale settings are recorded in the config afterwards.
        scheduler = cls.from_config({k: v for k, v in dict(config).items() if not k.startswith("_")})
        scheduler.register_to_config(scale_b=scale_b, fix_scale_bug=fix_scale_bug)
        cfg = DiffusionConfig(timesteps=scheduler.config.num_train_timesteps, scale_b=scale_b,
                              fix_scale_bug=fix_scale_bug)
        scheduler.scale_arr = torch.tensor(scale_array(cfg), dtype=torch.float32)
        return scheduler

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        elif self.config.prediction_type == "v_prediction":
            x0 = abar_t ** 0.5 * sample - (1 - abar_t) ** 0.5 * model_output
            eps = abar_t ** 0.5 * model_output + (1 - abar_t) ** 0.5 * sample
        else:
            raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported here")
        variance = self._get_variance(t, prev_t)
        std = eta * variance ** 0.5
        direction = (1 - abar_prev - std ** 2) ** 0.5 * eps
        scale_t = self.scale_arr[t]
        scale_prev = self.scale_arr[prev_t] if prev_t >= 0 else self.scale_arr[0]
        x0 = x0 / scale_t
        prev = abar_prev ** 0.5 * scale_prev * x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev = prev + std * variance_noise
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
