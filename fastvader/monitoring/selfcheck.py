"""The startup self-check: after the first backward pass, confirm that every memory technique and
kernel the config asked for actually engaged, and that gradients reach the LoRA. A memory saver
that silently never ran costs a night of out-of-memory retries or a LoRA that learned nothing;
this turns it into an error at step 1.

What is checked:
- checkpointing (``memory.checkpointing``): the policy wrapped at least one module, and the
  wrappers ran with gradients on during the first step (their hit counters moved);
- activation offload (``memory.offload_activations``): the offload code reported moving
  something (it calls :func:`record_engagement`);
- kernels: every module ``fastvader.apply`` replaced (or whose processor / forward it swapped)
  ran during the first step, unless its parent did not run either (e.g. the VAE encoder);
- gradient: at least one LoRA parameter received a non-zero gradient.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn

#: engagement counters that memory techniques without a module to hook report into
ENGAGEMENT: Counter = Counter()


def record_engagement(technique: str, count: int = 1) -> None:
    """Called by a memory technique each time it acts (e.g. an activation offloaded to the CPU),
    so the self-check can tell that it engaged. Cheap: one counter increment."""
    ENGAGEMENT[technique] += count


class SelfCheckError(RuntimeError):
    """A configured technique did not engage, or no gradient reaches the LoRA."""


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, *_):
        self.n += 1


class KernelProbe:
    """Finds what ``apply`` changed in a model (replaced or added submodules, swapped attention
    processors, swapped instance forwards) and counts, with forward hooks, whether those modules
    and their parents run."""

    def __init__(self, where: str, model: nn.Module):
        self.where, self.model = where, model
        self.before = self._snapshot(model)
        self.changed: list[str] = []
        self.calls: dict[str, _Counter] = {}
        self.parent_calls: dict[str, _Counter] = {}
        self.handles: list[Any] = []
        self.reported = 0

    @staticmethod
    def _snapshot(model: nn.Module) -> dict[str, tuple[int, int, int]]:
        return {name: (id(m), id(getattr(m, "processor", None)), id(m.__dict__.get("forward")))
                for name, m in model.named_modules()}

    def after_apply(self, report) -> None:
        self.reported = int(getattr(report, "total", 0) or 0)
        after = self._snapshot(self.model)
        changed = [n for n, sig in after.items() if self.before.get(n) != sig]
        # a replaced module's own children are new too: keep the outermost changed paths
        self.changed = [n for n in changed if not any(n.startswith(c + ".") for c in changed if c != n)]
        modules = dict(self.model.named_modules())
        for name in self.changed:
            self.calls[name] = _Counter()
            self.handles.append(modules[name].register_forward_hook(self.calls[name]))
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent not in self.parent_calls:
                self.parent_calls[parent] = _Counter()
                self.handles.append(modules[parent].register_forward_hook(self.parent_calls[parent]))

    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings)."""
        if self.reported and not self.changed:
            return [], [f"[{self.where}] fastvader.apply reported {self.reported} patch(es) but no module, processor "
                        "or forward changed visibly; their use cannot be verified"]
        never = [n for n in self.changed
                 if self.calls[n].n == 0 and self.parent_calls[n.rsplit(".", 1)[0] if "." in n else ""].n > 0]
        if never:
            return [f"[{self.where}] {len(never)} module(s) patched by fastvader.apply never ran although the "
                    f"module holding them did, e.g. {never[:3]}: the model does not call them (it may use a "
                    "functional op or another attribute), so the kernel is not in use. Set kernels.ops to the ops that "
                    "fit this model or kernels.enabled=off"], []
        return [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class SelfCheck:
    """Collects probes while the trainer is built; ``verify`` runs once after the first backward."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.kernel_probes: list[KernelProbe] = []
        self.checkpoint_units: list[nn.Module] = []
        self.checkpoint_policy = "none"
        self.step_wrapper_calls = _Counter()
        self.engagement_start: Counter = Counter()
        self.done = False
        self.report: dict[str, Any] = {}
        #: where activation offload acts (fastvader.memory.offload moves CUDA tensors only)
        self.offload_devices: tuple[str, ...] = ("cuda",)

    # -- set-up hooks ----------------------------------------------------------------------------
    def watch_kernels(self, where: str, model: nn.Module, apply_fn: Callable[[nn.Module], Any]):
        """Run ``apply_fn(model)`` (fastvader.apply) and remember what it changed."""
        probe = KernelProbe(where, model)
        report = apply_fn(model)
        probe.after_apply(report)
        self.kernel_probes.append(probe)
        return report

    def watch_checkpointing(self, model: nn.Module, policy: str, sampler=None) -> None:
        from fastvader.memory.checkpointing import checkpoint_units

        self.checkpoint_policy = policy
        self.checkpoint_units = checkpoint_units(model, policy)
        self._hits_start = [self._hits(u) for u in self.checkpoint_units]
        if policy == "step" and sampler is not None and sampler.grad_step_wrapper is not None:
            inner, counter = sampler.grad_step_wrapper, self.step_wrapper_calls

            def counting_wrapper(fn):
                wrapped = inner(fn)

                def call(*args, **kwargs):
                    counter()
                    return wrapped(*args, **kwargs)
                return call
            sampler.grad_step_wrapper = counting_wrapper

    def arm(self) -> None:
        """Start counting engagement reports (call before the first step)."""
        self.engagement_start = Counter(ENGAGEMENT)

    def release(self) -> None:
        """No check will run (guards.self_check=false): drop the probes' hooks."""
        for probe in self.kernel_probes:
            probe.remove()
        self.done = True

    @staticmethod
    def _hits(unit: nn.Module) -> int | None:
        wrapper = unit.__dict__.get("forward")
        return getattr(wrapper, "checkpoint_hits", None) if wrapper is not None else None

    # -- the check -------------------------------------------------------------------------------
    def verify(self, lora_params: list[torch.Tensor]) -> dict[str, Any]:
        """Raise SelfCheckError listing every technique that did not engage; returns the report."""
        cfg, errors, notes = self.cfg, [], []
        report: dict[str, Any] = {}
        mem = cfg.memory

        policy = self.checkpoint_policy
        if policy in ("block", "sub_block"):
            hits = [self._hits(u) for u in self.checkpoint_units]
            ran = [h is not None and h > (s or 0) for h, s in zip(hits, self._hits_start)]
            report["checkpointing"] = {"policy": policy, "wrapped": len(self.checkpoint_units), "hit": sum(ran)}
            if not self.checkpoint_units:
                errors.append(f"memory.checkpointing={policy!r} wrapped no module of this denoiser (its block names "
                              "are unknown to the policy): nothing is recomputed and activation memory is not saved. "
                              "Use another memory.checkpointing policy (block, sub_block, step) or none")
            elif not any(ran):
                errors.append(f"memory.checkpointing={policy!r} wrapped {len(self.checkpoint_units)} module(s) but "
                              "none ran checkpointed during the first step (the wrappers were removed or bypassed "
                              "after set-up, e.g. by a later patch): activation memory is not saved")
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
            moved = ENGAGEMENT["offload_activations"] - self.engagement_start["offload_activations"]
            report["offload_activations"] = moved
            if moved <= 0:
                errors.append("memory.offload_activations=true but no activation was offloaded during the first step "
                              "(the offload hooks never ran); set memory.offload_activations=false or check that this "
                              "build of fastvader implements offload for the model")

        for probe in self.kernel_probes:
            errs, warns = probe.problems()
            errors += errs
            notes += warns
            report[f"kernels_{probe.where}"] = {"patched": probe.reported, "changed_modules": len(probe.changed),
                                                "ran": sum(1 for c in probe.calls.values() if c.n > 0)}
            probe.remove()

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
