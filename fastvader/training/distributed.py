"""Several processes (GPUs, nodes) through accelerate's process-group set-up.

Launch with ``accelerate launch -m fastvader.cli train ...`` or ``torchrun --nproc_per_node N
-m fastvader.cli train ...``: both set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR, and
``DistContext.from_env`` lets accelerate's ``PartialState`` create the process group (NCCL on
GPUs, gloo on CPUs).

How the work is shared: the global batch of a step is ``world_size x train.batch_size`` videos,
drawn as :mod:`fastvader.training.draws` says. LoRA gradients (a few MB) are averaged with one
flat all-reduce per optimizer step; only rank 0 logs, validates and writes checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> "DistContext":
        """A single process unless launched by accelerate/torchrun with WORLD_SIZE > 1."""
        if not _launched():
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            from accelerate import PartialState

            # cpu=True keeps accelerate on gloo for CPU runs; on GPUs it picks NCCL.
            PartialState(cpu=device_type == "cpu")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank."""
        if self.enabled and device.type == "cuda" and device.index is None:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_mean(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks (one flat buffer, one collective)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def broadcast_(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank start from rank 0's weights."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()
