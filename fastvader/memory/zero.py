"""DeepSpeed ZeRO-2 for the trainable weights, as the Trainer's accelerator's DeepSpeed plugin.

``memory.zero_stage=2`` partitions gradients and optimizer states over ranks;
``memory.zero_offload=optimizer`` moves the optimizer states to the CPU. With LoRA the trainable
state is small (ModelScope r16 on q/k/v/out: 6.6M parameters, ~110 MB of weights + gradients +
Adam moments), so on one GPU ZeRO saves about that much and costs a host round trip per step; it
pays for full fine-tuning and for many ranks. The planner's measurements say so; docs/memory.md
has the figures. Stage 3, which also partitions the parameters, is refused for now: the learn
signals, the LoRA file and the checkpoints read the LoRA weights outside DeepSpeed's gathering
hooks, where they are empty.

The accelerator prepares the denoiser and the optimizer into a DeepSpeed engine, but the sampler
keeps calling the denoiser module itself (ZeRO-2 leaves parameters whole). The engine reduces
gradients, clips, scales fp16 losses, skips steps whose gradients overflow, and steps inside the
accelerator's ``backward`` at the accumulation boundary.

A checkpoint holds each rank's ZeRO optimizer state (the one after ``prepare``: Adam moments of
the rank's partition, its fp32 master weights and the loss scale) as tensors and plain values
only, so that loading it never unpickles DeepSpeed objects.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from fastvader.config import ConfigError, TrainConfig

#: what a launcher (torchrun, accelerate) sets and DeepSpeed expects, set here for a single process
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: marks those variables as set by fastvader rather than by a launcher; it holds the port chosen,
#: so that a child process started by a launcher (which inherits the marker) keeps the launcher's
_SINGLE_PROCESS = "FASTVADER_SINGLE_PROCESS_ZERO"
#: entries of DeepSpeed's ZeRO optimizer state that are Python objects: the loss scaler is saved
#: as its attributes; the stage enum and the parameter-slice map (universal checkpoints only)
#: are rebuilt by DeepSpeed from the live optimizer
_OBJECT_ENTRIES = ("loss_scaler", "zero_stage", "param_slice_mappings")


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


def deepspeed_plugin(cfg: TrainConfig, amp_dtype: torch.dtype, device: torch.device, world_size: int):
    """The accelerator's DeepSpeed plugin, with the process environment DeepSpeed needs."""
    from accelerate.utils import DeepSpeedPlugin

    if cfg.memory.zero_stage == 3:
        raise ConfigError("config: memory.zero_stage=3 is not supported yet: the learn signals, the LoRA file and the "
                          "checkpoints read the LoRA weights, which ZeRO-3 partitions over ranks (they read as empty "
                          "tensors); use memory.zero_stage=2")
    if "WORLD_SIZE" not in os.environ:  # a single process not started by a launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), _SINGLE_PROCESS: str(port)})
    if device.type == "cpu":
        _cpu_ranks_talk_over_gloo()
    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, amp_dtype, world_size))


def forget_single_process_env() -> None:
    """Remove the launcher variables :func:`deepspeed_plugin` set for a single process: a later
    accelerator without DeepSpeed would take them for a multi-process CPU launch. Variables that a
    launcher set since (torchrun starting a child of such a process) are kept."""
    port = os.environ.pop(_SINGLE_PROCESS, None)
    if port is not None and os.environ.get("MASTER_PORT") == port:
        for key in _LAUNCH_VARIABLES:
            os.environ.pop(key, None)


def _cpu_ranks_talk_over_gloo() -> None:
    """On the CPU, DeepSpeed's process group is gloo plus an optional shared-memory all-reduce,
    a C++ op it compiles on first use: 109 s on two cores at load 3 (measured), ~7 min on two
    busier ones, ~60 s on a free machine. CPU training is for tests and debugging, where
    gloo alone does the job, so the op is marked unavailable: DeepSpeed then never builds it.
    ``deepspeed.ops.__compatible_ops__`` is DeepSpeed's per-process table of which ops may be
    built; it is probed once and kept, so this entry holds for the process."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer behind the accelerator's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def zero_state_dict(optimizer) -> dict[str, Any]:
    """This rank's ZeRO optimizer state as tensors and plain values (``torch.load(weights_only=True)``
    reads it back)."""
    zero = _zero_optimizer(optimizer)
    state = zero.state_dict()
    safe = {k: v for k, v in state.items() if k not in _OBJECT_ENTRIES}
    safe["loss_scaler"] = dict(vars(state["loss_scaler"]))
    safe["single_partition_of_fp32_groups"] = [t.detach().clone()
                                               for t in state["single_partition_of_fp32_groups"]]
    return safe


def load_zero_state_dicts(optimizer, states: list[dict[str, Any]]) -> None:
    """Restore the state :func:`zero_state_dict` saved, one dict per rank of the saving run: Adam
    moments, fp32 master weights (so the next update continues from the saved ones exactly) and
    the loss scale."""
    zero = _zero_optimizer(optimizer)
    if len(states) != zero.partition_count[0]:
        raise ConfigError(f"the checkpoint holds the ZeRO state of {len(states)} ranks; resume it with "
                         f"{len(states)} processes (this run has {zero.partition_count[0]})")
    scaler = zero.loss_scaler
    rank = torch.distributed.get_rank(group=zero.dp_process_group)
    vars(scaler).update(states[rank]["loss_scaler"])
    zero.load_state_dict([{**s, "loss_scaler": scaler} for s in states], load_optimizer_states=True,
                         load_from_fp32_weights=True)


class ZeroLossScale:
    """DeepSpeed's fp16 loss scale through the two GradScaler calls the numerical guard makes, so
    that its routine overflow skips count as the GradScaler's do."""

    def __init__(self, optimizer):
        self.zero = _zero_optimizer(optimizer)

    def is_enabled(self) -> bool:
        return bool(getattr(self.zero, "dynamic_loss_scale", False))

    def get_scale(self) -> float:
        return float(self.zero.loss_scale)
