"""The Trainer's one ``accelerate.Accelerator``: mixed precision and fp16 loss scaling, gradient
accumulation, clipping, the process group of a multi-process run, and DeepSpeed ZeRO.

Launch several processes with ``accelerate launch -m fastvader.cli train ...`` or ``torchrun
--nproc_per_node N -m fastvader.cli train ...``: the accelerator creates the process group (NCCL
on GPUs, gloo on CPUs). The global batch of a step is ``world_size x train.batch_size`` videos,
drawn as :mod:`fastvader.training.draws` says; only rank 0 logs, validates and writes the
LoRA file.

Why the denoiser is not wrapped in DistributedDataParallel: the sampler calls it ~25 times per
step, K of those with gradients and under activation checkpointing, before one backward. DDP's
reducer expects each parameter's gradient to become ready once per forward; K gradient-carrying
calls per backward (and checkpointing's re-forwards) break that contract. So the accelerator
reduces the LoRA gradients itself, once per optimizer step, in one collective of a few MB
(:func:`average_gradients`). Under DeepSpeed ZeRO the engine reduces them instead.
"""
from __future__ import annotations

import os

import torch

from fastvader.config import ConfigError, TrainConfig

_MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate, torchrun) started; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype):
    """The accelerator for one Trainer (``memory.zero_stage`` > 0 adds the DeepSpeed plugin)."""
    from accelerate import Accelerator

    if amp_dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"config: train.precision='fp16' needs a CUDA device (accelerate scales fp16 losses on "
                          f"GPUs only; this run is on {device.type}): use train.precision=bf16 or fp32")
    plugin, handlers = None, []
    if cfg.memory.zero_stage:
        from accelerate.utils import InitProcessGroupKwargs

        from fastvader.memory.zero import deepspeed_plugin

        plugin = deepspeed_plugin(cfg, amp_dtype, device, launched_world_size())
        if device.type == "cpu":  # accelerate names no backend for DeepSpeed on CPUs and then sees one rank
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    _clear_accelerate_state(deepspeed=plugin is not None)
    return Accelerator(mixed_precision=_MIXED_PRECISION[amp_dtype], gradient_accumulation_steps=cfg.optim.grad_accum,
                       cpu=device.type == "cpu" and plugin is None, deepspeed_plugin=plugin, kwargs_handlers=handlers)


def _clear_accelerate_state(deepspeed: bool) -> None:
    """accelerate keeps one state per process (shared dictionaries behind ``AcceleratorState``,
    ``PartialState`` and ``GradientState``, and ``ACCELERATE_USE_DEEPSPEED`` in the environment)
    and refuses a second Accelerator whose precision or plugin differ. A process may build several
    Trainers (tests, notebooks, a sweep), each with its own settings, so the previous one's
    state is cleared first; a process group, once created, stays and is reused. The settings
    stay per process, so the newest Trainer is the one that may train."""
    from accelerate.state import AcceleratorState, GradientState

    from fastvader.memory.zero import forget_single_process_env

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if not deepspeed:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        forget_single_process_env()


def training_device(accelerator, configured: torch.device) -> torch.device:
    """One GPU per local rank in a multi-process or DeepSpeed run; the configured device otherwise."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes > 1 or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.device
    return configured


def broadcast_from_main(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Make every rank start from rank 0's weights."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        with torch.no_grad():
            broadcast([p.data for p in params], from_process=0)


def average_gradients(accelerator, params: list[torch.nn.Parameter], finite: bool) -> bool:
    """Average the gradients of ``params`` over ranks (one flat buffer, one collective) and
    return whether every rank's loss was finite: a flag rides in the same buffer, so that all
    ranks skip a step together when any of them saw a NaN/Inf loss."""
    if accelerator.num_processes == 1:
        return finite
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flag = torch.tensor([0.0 if finite else 1.0], device=grads[0].device)
    flat = accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads] + [flag]), reduction="mean")
    for p, averaged in zip(params, flat[:-1].split([g.numel() for g in grads])):
        p.grad = averaged.view_as(p).to(p.dtype)
    return bool(flat[-1] == 0)


def on_any_process(accelerator, *flags: bool) -> list[bool]:
    """Each flag, true when it is true on any rank: every rank then decides alike (stop on a
    signal that reached one rank, checkpoint when one rank's clock says it is time)."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(votes, reduction="sum")]
