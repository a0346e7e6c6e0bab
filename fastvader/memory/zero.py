"""DeepSpeed ZeRO-2/3 for the trainable weights, through accelerate.

``memory.zero_stage`` 2 partitions gradients and optimizer states over ranks; 3 also partitions
the parameters. ``memory.zero_offload`` moves optimizer states (``optimizer``) and, at stage 3,
parameters (``optimizer+params``) to the CPU. With LoRA the trainable state is small (ModelScope
r16 on q/k/v/out: 6.6M parameters, ~110 MB of weights + gradients + Adam moments), so on one GPU
ZeRO saves about that much and costs a host round trip per step; it pays for full fine-tuning
and for many ranks. The planner's measurements say so; docs/memory.md has the figures.

Only the optimizer side goes through DeepSpeed: the sampler keeps calling the denoiser module
itself (ZeRO-2 leaves parameters whole; at stage 3 DeepSpeed's hooks sit on the module's
sub-modules and gather parameters for any caller).
"""
from __future__ import annotations

from typing import Any

import torch

from fastvader.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, amp_dtype: torch.dtype, world_size: int = 1) -> dict[str, Any]:
    m, o = cfg.memory, cfg.optim
    zero: dict[str, Any] = {"stage": m.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if m.zero_offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if m.zero_offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": cfg.train.batch_size * o.grad_accum * world_size,
        "gradient_clipping": o.max_grad_norm if o.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": amp_dtype == torch.bfloat16},
        "fp16": {"enabled": amp_dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }


class ZeroOptimizer:
    """The DeepSpeed engine behind the loop's three optimizer calls: ``backward(loss)``,
    ``step()`` (clip + update + zero grads) and ``grad_norm()``."""

    def __init__(self, cfg: TrainConfig, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 amp_dtype: torch.dtype, world_size: int = 1):
        import os
        import socket

        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        if "WORLD_SIZE" not in os.environ:  # a single process not started by a launcher
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
                os.environ.setdefault(key, value)
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.accum = cfg.optim.grad_accum
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, amp_dtype, world_size))
        self.accelerator = Accelerator(deepspeed_plugin=plugin)
        self.engine, self.optimizer = self.accelerator.prepare(denoiser, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` as the loop computes it (already divided by grad_accum): DeepSpeed divides by
        its gradient_accumulation_steps itself, and steps at the accumulation boundary."""
        self.accelerator.backward(loss * self.accum)

    def step(self) -> float:
        """The update already happened inside the last ``backward`` (DeepSpeed steps at the
        accumulation boundary); returns the gradient norm it clipped with."""
        norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()
