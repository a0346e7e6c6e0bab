"""Memory techniques as named, composable pieces around the training loop.

``saved_bytes`` / ``record_saved`` (accounting), per-step and sub-block checkpointing
(checkpointing), activation offload and on-demand frozen models (offload), optimizers and
DeepSpeed ZeRO (optim, zero), and the planner (planner; ``fastvader plan``)."""
from fastvader.memory.accounting import record_saved, saved_bytes

__all__ = ["saved_bytes", "record_saved"]
