"""Sampling with gradients only where they belong.

The sampler runs the whole denoising chain; the first ``T - K`` steps run under ``no_grad`` and
the last ``K`` keep the latent chain attached, so the reward's gradient flows back through
exactly those denoiser calls (VADER's truncated backprop). ``TruncationPolicy`` decides K.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from fastvader.backbones.base import Backbone, PromptEmbeddings
from fastvader.config import parse_truncation

# name -> (diffusers class, config overrides)
_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_flow": ("FlowMatchEulerDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler of family ``name`` built from a scheduler config dict (keys the
    class does not know are ignored, as diffusers' ``from_config`` does)."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"sampler.name={name!r} is not a known sampler; choose one of {sorted(_SCHEDULERS)}")
    cls_name, overrides = _SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    # the signature, not __code__.co_varnames: @register_to_config wraps __init__ as
    # (self, *args, **kwargs), so co_varnames would drop every key (DDIM fell back to linear betas)
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in dict(config).items() if k in accepted}
    kwargs.update({k: v for k, v in overrides.items() if k in accepted})
    return cls(**kwargs)


@dataclass
class TruncationPolicy:
    """How many of the last denoising steps carry gradients: K in [k_min, k_max], drawn once
    per video (``rand``, ``range``) or fixed (``last`` = 1, ``specific:K``). ``x0`` draws K the
    same way but stops the chain there: the K-th step from the end is the only gradient call, and
    the reward scores the clean latents it predicts."""

    mode: str
    k_min: int
    k_max: int

    @property
    def predicts_x0(self) -> bool:
        return self.mode == "x0"

    @classmethod
    def parse(cls, spec: str, steps: int) -> "TruncationPolicy":
        return cls(*parse_truncation(spec, steps))

    def draw(self, generator: torch.Generator) -> int:
        if self.k_min == self.k_max:
            return self.k_min
        return int(torch.randint(self.k_min, self.k_max + 1, (1,), generator=generator).item())


def classifier_free_guidance(backbone: Backbone, latents: torch.Tensor, t, embeds: PromptEmbeddings,
                             guidance_scale: float | torch.Tensor,
                             denoise: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """One guided prediction: uncond + g * (cond - uncond), batched into a single call of
    ``denoise`` (default ``backbone.denoise``). ``g`` is a number or a tensor that broadcasts over
    the latents (a per-frame ramp)."""
    denoise = denoise or backbone.denoise
    timestep = torch.as_tensor(t, device=latents.device)
    if float(torch.as_tensor(guidance_scale).max()) <= 1.0 or embeds.uncond is None:
        return denoise(latents, timestep.expand(latents.shape[0]), embeds.cond, **embeds.extra)
    context = torch.cat([embeds.uncond, embeds.cond])
    out = denoise(torch.cat([latents, latents]), timestep.expand(2 * latents.shape[0]), context,
                  **embeds.guided_extra())
    uncond, cond = out.chunk(2)
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = guidance_scale.to(cond.device, cond.dtype)
    return uncond + guidance_scale * (cond - uncond)


StepWrapper = Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]


class Sampler:
    """Runs a scheduler's chain with classifier-free guidance.

    ``grad_step_wrapper`` wraps each gradient-carrying denoiser call (e.g. per-step
    checkpointing from ``fastvader.memory``); no-grad steps are never wrapped. They call
    ``nograd_denoise`` instead of ``backbone.denoise`` when it is set (the compiled,
    graph-replayed call of ``fastvader.speed``).
    """

    def __init__(self, backbone: Backbone, name: str, steps: int, guidance_scale: float,
                 eta: float = 0.0, grad_step_wrapper: StepWrapper | None = None,
                 nograd_denoise: Callable[..., torch.Tensor] | None = None):
        self.backbone = backbone
        self.scheduler = backbone.make_scheduler(name)
        self.name = name
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.grad_step_wrapper = grad_step_wrapper
        self.nograd_denoise = nograd_denoise

    def initial_noise(self, batch: int, shape: tuple[int, ...], generator: torch.Generator,
                      device, dtype=torch.float32) -> torch.Tensor:
        """Noise drawn on the CPU generator, so runs are reproducible across devices."""
        noise = torch.randn((batch, *shape), generator=generator, dtype=torch.float32)
        # the schedule first: Euler's initial sigma (SVD's 700) comes from it, not from the training betas
        self.scheduler.set_timesteps(self.steps)
        # flow-matching schedulers start from unit noise and have no init_noise_sigma
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        return (noise * sigma).to(device=device, dtype=dtype)

    def sample(self, embeds: PromptEmbeddings, latents: torch.Tensor, grad_steps: int = 0,
               generator: torch.Generator | None = None, predict_x0: bool = False) -> torch.Tensor:
        """Denoise ``latents`` over ``self.steps``; the last ``grad_steps`` calls carry gradients.
        With ``predict_x0`` the chain ends at the first of those calls and returns the clean
        latents it predicts (the scheduler's ``pred_original_sample``)."""
        if not 0 <= grad_steps <= self.steps:
            raise ValueError(f"grad_steps={grad_steps} must be in [0, {self.steps}]")
        if predict_x0 and grad_steps < 1:
            raise ValueError("predict_x0 needs the step that predicts them: grad_steps >= 1")
        self.scheduler.set_timesteps(self.steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        first_grad = len(timesteps) - grad_steps
        step_kwargs = {"generator": generator}
        if self.name == "ddim":
            step_kwargs["eta"] = self.eta
        guidance = self.backbone.guidance_scales(self.guidance_scale, latents.shape[2])

        def denoise_step(x: torch.Tensor, t, denoise=None) -> torch.Tensor:
            scale = getattr(self.scheduler, "scale_model_input", None)  # absent on flow schedulers
            x_in = scale(x, t) if scale is not None else x
            return classifier_free_guidance(self.backbone, x_in, t, embeds, guidance, denoise)

        grad_step = self.grad_step_wrapper(denoise_step) if self.grad_step_wrapper else denoise_step
        # under an outer no_grad (a reference chain) no call carries gradients: nothing to wrap
        wrap_grad_steps = torch.is_grad_enabled()
        for i, t in enumerate(timesteps):
            with_grad = i >= first_grad
            ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
            with ctx:
                model_out = (grad_step(latents, t) if with_grad and wrap_grad_steps
                             else denoise_step(latents, t, self.nograd_denoise))
                if predict_x0 and with_grad:
                    predicted = getattr(self.scheduler.step(model_out, t, latents, **step_kwargs), "pred_original_sample", None)
                    if predicted is None:
                        raise ValueError(f"sampler {self.name} does not predict the clean latents; "
                                         "sampler.truncation=x0:A-B needs ddim or euler")
                    return predicted
                latents = self.scheduler.step(model_out, t, latents, **step_kwargs, return_dict=False)[0]
            if i + 1 == first_grad:
                latents = latents.detach()
        return latents
