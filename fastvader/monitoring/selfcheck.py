"""The startup self-check: after the first backward pass, confirm that every memory technique and
kernel the config asked for actually engaged, and that gradients reach the LoRA. A memory saver
that silently never ran costs a night of out-of-memory retries or a LoRA that learned nothing;
this turns it into an error at step 1.

What is checked:
- checkpointing (``memory.checkpointing``): the policy wrapped at least one module, and the
  wrappers ran with gradients on during the first step (the wrappers' handle counts their hits);
- activation offload (``memory.offload_activations``): the offloaders moved something (they
  count into ``SelfCheck.offload_stats``, which the trainer hands them);
- kernels: every module ``fastvader.apply`` replaced (or whose processor / forward it swapped,
  as its report lists) ran during the first step, unless the module holding it did not run
  either (e.g. the VAE encoder);
- gradient: at least one LoRA parameter received a non-zero gradient;
- speed (``speed.*``): which settings engaged and why the others did not. The compiled blocks
  and CUDA graphs start only once the check is over (or known not to run): the kernel probes'
  Python counters would otherwise be traced into the compiled blocks and recorded graphs.

The self-check holds no module-level state: it learns what engaged only through the objects it
owns or is handed (offload counters, the checkpoint wrappers, apply's report).
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from fastvader.patching.checkpoint import CheckpointWrappers
    from fastvader.speed import SpeedPath


class SelfCheckError(RuntimeError):
    """A configured technique did not engage, or no gradient reaches the LoRA."""


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, *_):
        self.n += 1


def _holder(name: str, modules: dict[str, nn.Module]) -> str:
    """The module whose forward calls module ``name``: its parent, or further up when the parent
    is a ModuleList / ModuleDict (containers never run themselves)."""
    holder = name
    while holder:
        holder = holder.rsplit(".", 1)[0] if "." in holder else ""
        if not isinstance(modules[holder], (nn.ModuleList, nn.ModuleDict)):
            break
    return holder


class KernelProbe:
    """Counts, with forward hooks, whether the modules ``fastvader.apply`` changed (its report's
    ``modules``) run, and whether the modules holding them do."""

    def __init__(self, where: str, model: nn.Module, report):
        self.where, self.reported = where, report.total
        modules = dict(model.named_modules())
        path_of = {id(m): path for path, m in modules.items()}
        changed = [path_of[id(m)] for m in report.modules if id(m) in path_of]
        self.holders = {path: _holder(path, modules) for path in changed}
        self.calls = {path: _Counter() for path in changed}
        self.holder_calls = {holder: _Counter() for holder in self.holders.values()}
        self.handles = [modules[path].register_forward_hook(counter)
                        for counters in (self.calls, self.holder_calls) for path, counter in counters.items()]

    def problems(self) -> list[str]:
        never = [path for path, holder in self.holders.items()
                 if self.calls[path].n == 0 and self.holder_calls[holder].n > 0]
        if never:
            return [f"[{self.where}] {len(never)} module(s) patched by fastvader.apply never ran although the "
                    f"module holding them did, e.g. {never[:3]}: the model does not call them (it may use a "
                    "functional op or another attribute), so the kernel is not in use. Set kernels.ops to the ops that "
                    "fit this model or kernels.enabled=off"]
        return []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class SelfCheck:
    """Collects probes while the trainer is built; ``verify`` runs once after the first backward."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.kernel_probes: list[KernelProbe] = []
        self.checkpoint_wrappers: CheckpointWrappers | None = None
        self.checkpoint_policy = "none"
        self.step_wrapper_calls = _Counter()
        #: the trainer hands this to its activation offloaders, which count what they move into it
        self.offload_stats: Counter = Counter()
        self._start = {"hits": [], "offloaded": 0}
        self.done = False
        self.report: dict[str, Any] = {}
        #: where activation offload acts (fastvader.memory.offload moves CUDA tensors only)
        self.offload_devices: tuple[str, ...] = ("cuda",)
        self.speed: SpeedPath | None = None

    # -- set-up hooks ----------------------------------------------------------------------------
    def watch_kernels(self, where: str, model: nn.Module, apply_fn: Callable[[nn.Module], Any]):
        """Run ``apply_fn(model)`` (fastvader.apply) and watch the modules its report says it changed."""
        report = apply_fn(model)
        self.kernel_probes.append(KernelProbe(where, model, report))
        return report

    def watch_checkpointing(self, wrappers: CheckpointWrappers, policy: str, sampler=None) -> None:
        """``wrappers``: the handle ``enable_checkpointing`` returned (it counts its hits); for the
        ``step`` policy the sampler's per-step wrapper is counted instead."""
        self.checkpoint_policy, self.checkpoint_wrappers = policy, wrappers
        if policy == "step" and sampler is not None and sampler.grad_step_wrapper is not None:
            inner, counter = sampler.grad_step_wrapper, self.step_wrapper_calls

            def counting_wrapper(fn):
                wrapped = inner(fn)

                def call(*args, **kwargs):
                    counter()
                    return wrapped(*args, **kwargs)
                return call
            sampler.grad_step_wrapper = counting_wrapper

    def watch_speed(self, speed: SpeedPath) -> None:
        """Report ``speed``'s settings, and activate them once the probes are off the model."""
        self.speed = speed

    def _start_speed(self) -> None:
        if self.speed is not None:
            self.speed.activate()

    def arm(self) -> None:
        """Start counting engagement (call before the first step)."""
        hits = self.checkpoint_wrappers.hits() if self.checkpoint_wrappers is not None else []
        self._start = {"hits": hits, "offloaded": self.offload_stats["tensors"]}

    def release(self) -> None:
        """No check will run (guards.self_check=false, or the trainer closes): drop the probes'
        hooks from the models."""
        for probe in self.kernel_probes:
            probe.remove()
        self.done = True
        self._start_speed()

    # -- the check -------------------------------------------------------------------------------
    def verify(self, lora_params: list[torch.Tensor]) -> dict[str, Any]:
        """Raise SelfCheckError listing every technique that did not engage; returns the report."""
        cfg, errors, notes = self.cfg, [], []
        report: dict[str, Any] = {}
        mem = cfg.memory

        policy = self.checkpoint_policy
        if policy in ("block", "sub_block"):
            ran = [now > then for now, then in zip(self.checkpoint_wrappers.hits(), self._start["hits"])]
            report["checkpointing"] = {"policy": policy, "wrapped": len(ran), "hit": sum(ran)}
            if not ran:
                errors.append(f"memory.checkpointing={policy!r} wrapped no module of this denoiser (its block names "
                              "are unknown to the policy): nothing is recomputed and activation memory is not saved. "
                              "Use another memory.checkpointing policy (block, sub_block, step) or none")
            elif not any(ran):
                errors.append(f"memory.checkpointing={policy!r} wrapped {len(ran)} module(s) but "
                              "none ran checkpointed during the first step (the wrappers were removed or bypassed "
                              "after set-up): activation memory is not saved")
            elif not all(ran):
                notes.append(f"memory.checkpointing={policy!r}: {len(ran) - sum(ran)} of {len(ran)} wrapped modules "
                             "did not run with gradients during the first step")
        elif policy == "step":
            report["checkpointing"] = {"policy": policy, "hit": self.step_wrapper_calls.n}
            if self.step_wrapper_calls.n == 0:
                errors.append("memory.checkpointing='step' but no gradient-carrying denoiser call went through the "
                              "per-step checkpoint wrapper during the first step")

        on_offload_device = bool(lora_params) and lora_params[0].device.type in self.offload_devices
        if mem.offload_activations and not on_offload_device:
            report["offload_activations"] = "not applicable: activations are offloaded from CUDA devices only"
        elif mem.offload_activations:
            moved = self.offload_stats["tensors"] - self._start["offloaded"]
            report["offload_activations"] = moved
            if moved <= 0:
                errors.append("memory.offload_activations=true but no activation was offloaded during the first step "
                              "(the offload hooks never ran); set memory.offload_activations=false or check that this "
                              "build of fastvader implements offload for the model")

        for probe in self.kernel_probes:
            errors += probe.problems()
            report[f"kernels_{probe.where}"] = {"patched": probe.reported, "changed_modules": len(probe.calls),
                                                "ran": sum(1 for c in probe.calls.values() if c.n > 0)}
            probe.remove()

        if self.speed is not None:
            report["speed"] = {name: item["detail"] if item["engaged"] else f"off: {item['detail']}"
                               for name, item in self.speed.summary().items()}
            self._start_speed()

        grads = [p.grad for p in lora_params if p.grad is not None]
        reached = any(bool((g != 0).any()) for g in grads)
        report["gradient_reaches_lora"] = reached
        if not reached and cfg.guards.require_gradient:
            errors.append("no gradient reached the LoRA weights in the first backward pass (a detached latent, a "
                          "frozen path, or lora.target_modules that are not on the gradient path); nothing can be "
                          "learned. Set guards.require_gradient=false to run anyway")
        for note in notes:
            warnings.warn(f"fastvader self-check: {note}", stacklevel=2)
        report["warnings"] = notes
        self.done, self.report = True, report
        if errors:
            raise SelfCheckError("startup self-check failed:\n  - " + "\n  - ".join(errors) +
                                 "\n(guards.self_check=false skips this check)")
        return report
