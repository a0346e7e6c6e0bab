"""The VADER training loop.

One step: draw prompts and noise -> sample with gradients through the last K denoising steps
-> decode the chosen frames -> reward (:mod:`fastvader.training.rollout`) -> loss = -reward ->
backward into LoRA -> average over ranks -> clip -> step. One ``accelerate.Accelerator``
(:mod:`fastvader.training.distributed`) owns mixed precision and fp16 loss scaling, gradient
accumulation, clipping, the processes of a multi-GPU run and DeepSpeed ZeRO. Memory techniques,
kernels and the trust pieces (guards, self-check, safeguards) are named pieces set up around the
loop; the loop itself only strings the data flow together.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fastvader.backbones import Backbone, build_backbone
from fastvader.config import TrainConfig
from fastvader.inference import write_samples
from fastvader.io import checkpoint as ckpt
from fastvader.io.loggers import Loggers, metrics_line
from fastvader.lora import init_lora, load_lora_state, lora_metadata, lora_state_dict, save_lora
from fastvader.memory.checkpointing import enable_checkpointing
from fastvader.memory.fp8 import Fp8Storage
from fastvader.memory.frozen_weights import FrozenWeights
from fastvader.memory.offload import grad_step_wrapper
from fastvader.memory.optim import build_optimizer
from fastvader.monitoring.guards import NumericalGuard, check_finite_state, is_finite
from fastvader.monitoring.learn_signals import LearnMonitor
from fastvader.monitoring.safeguards import Safeguards
from fastvader.monitoring.selfcheck import SelfCheck
from fastvader.precision import resolve_device, resolve_dtype
from fastvader.rewards import Reward, build_reward
from fastvader.speed import SpeedPath
from fastvader.training.distributed import (average_gradients, broadcast_from_main, build_accelerator,
                                            on_any_process, training_device)
from fastvader.training.draws import BatchDraws
from fastvader.training.interrupt import RunInterrupted, StopRequests
from fastvader.training.prompts import PromptSource, validation_prompts
from fastvader.training.rollout import Rollout, autocast_for, embed_prompts_up_front
from fastvader.training.run_folder import RunFolder, begin_invocation, total_wall_time, update_invocation

#: the numerical guard's reason for a step whose fp16 gradients overflowed
FP16_OVERFLOW = "fp16 gradient overflow"


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on CUDA and fp32 on CPU unless the config says otherwise."""
    return resolve_dtype(spec, "train.precision", device)


@dataclass
class StepResult:
    step: int
    reward: float
    loss: float
    grad_norm: float
    lr: float
    grad_steps: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    #: "did it learn?" signals and guard notes (fastvader.monitoring.learn_signals)
    signals: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update({f"time_{k}": v for k, v in d.pop("timings").items()})
        d.update(d.pop("signals"))
        return d


class _MicroBatch(NamedTuple):
    reward: float
    loss: float
    grad_steps: int
    finite: bool


class Trainer:
    """Builds everything a config names and runs the loop. ``backbone``/``reward`` may be passed
    in prebuilt (tests, notebooks); ``resume`` is a run folder to continue, or one of its
    checkpoints (``RUN/checkpoints/step_N``); ``overwrite`` empties the run folder when training
    starts (docs/runs.md). Every check on the config and the folder happens before any model is
    built. accelerate's settings are per process, so of several Trainers in one process the
    newest one trains."""

    def __init__(self, cfg: TrainConfig, *, backbone: Backbone | None = None,
                 reward: Reward | None = None, resume: str | Path | None = None, overwrite: bool = False):
        cfg = cfg.validate()
        if cfg.memory.gpu_memory or cfg.memory.block_swap == "auto":
            from fastvader.memory.planner import apply_best_plan

            cfg = apply_best_plan(cfg)
        self.run, cfg = RunFolder.open(cfg, resume=resume, overwrite=overwrite)
        self.cfg = cfg
        t = cfg.train
        configured = resolve_device(t.device)
        self.amp_dtype = resolve_precision(t.precision, configured)
        self.accelerator = build_accelerator(cfg, configured, self.amp_dtype)
        self.device = training_device(self.accelerator, configured)
        if t.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads)
        self.weight_dtype = self._weight_dtype()
        self.run_dir = self.run.path
        self.generator = torch.Generator().manual_seed(t.seed)
        torch.manual_seed(t.seed)

        storage = Fp8Storage.from_config(cfg.memory)
        self.backbone = (backbone or build_backbone(cfg.backbone, storage=storage)).freeze()
        # fp8 storage and block swap, before the move: swapped blocks never have to fit on the GPU
        self.frozen_weights = FrozenWeights(self.backbone.denoiser, cfg.memory, self.device,
                                            passed_in=backbone is not None)
        self.backbone.to(self.device, self.weight_dtype)
        self.reward = (reward or build_reward(cfg.reward)).freeze().to(self.device)
        self.selfcheck = SelfCheck(cfg)
        self.rollout = Rollout.from_config(cfg, self.backbone, self.reward, self.device, self.weight_dtype,
                                           self._autocast(), grad_step_wrapper=self._step_wrapper())
        self.lora_params = self._add_lora()
        self.kernel_report = self._apply_kernels()
        self.checkpoint_wrappers = enable_checkpointing(self.backbone.denoiser, cfg.memory.checkpointing)
        self.speed = SpeedPath.for_rollout(cfg.speed, self.backbone, self.sampler, self.device)

        self.prompts = PromptSource.from_config(cfg.prompts)
        self.val_prompts = validation_prompts(cfg, self.prompts)
        embed_prompts_up_front(self.prompt_cache, self.backbone, self.prompts.prompts + self.val_prompts, self.device)
        self.optimizer, self.lr_scheduler = self._prepare_optimizer()
        self.step = 0
        self.history: dict[str, Any] = {"rewards": [], "validation": {}}
        #: this invocation's record in ``history["invocations"]`` once fit() starts, and its start
        self.invocation: dict[str, Any] | None = None
        self._fit_start = time.perf_counter()
        self._setup_trust()
        if self.run.checkpoint is not None:
            self.resume(self.run.checkpoint)
            self.run.checkpoint = None  # its tensors are in the model and optimizer now

    # -- setup pieces ----------------------------------------------------------------------------
    @property
    def sampler(self):
        return self.rollout.sampler

    @property
    def prompt_cache(self):
        return self.rollout.prompt_cache

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.rollout.latent_shape

    @property
    def zero(self) -> bool:
        """Whether DeepSpeed ZeRO owns the optimizer (``memory.zero_stage`` > 0)."""
        return bool(self.cfg.memory.zero_stage)

    def _autocast(self):
        """The accelerator's autocast. Under DeepSpeed accelerate leaves precision to the engine,
        which casts only the denoiser it wraps: the sampler's latents, the VAE and the reward then
        run under torch's autocast at the same dtype."""
        if self.zero:
            return autocast_for(self.device, self.amp_dtype)
        return self.accelerator.autocast

    def _add_lora(self) -> list[torch.nn.Parameter]:
        from diffusers.training_utils import cast_training_params

        params, lora = init_lora(self.backbone.denoiser, self.cfg.lora, self.backbone.family,
                                 self.backbone.default_lora_targets)
        self.cfg = self.cfg.replace(lora=lora)  # lora.init_from: the file's rank, alpha and modules
        cast_training_params(self.backbone.denoiser, torch.float32)  # LoRA trains in fp32 whatever the base is
        broadcast_from_main(self.accelerator, params)
        return params

    def _prepare_optimizer(self):
        """The optimizer through the accelerator (with its GradScaler under fp16; under ZeRO, the
        DeepSpeed engine around the denoiser) and a constant learning rate schedule."""
        from diffusers.optimization import get_scheduler

        optimizer = build_optimizer(self.cfg.optim, self.lora_params)
        if self.zero:
            _, optimizer = self.accelerator.prepare(self.backbone.denoiser, optimizer)
        else:
            optimizer = self.accelerator.prepare(optimizer)
        return optimizer, get_scheduler("constant", optimizer)

    @property
    def loss_scale(self):
        """The fp16 loss scaler the guard consults: the accelerator's GradScaler, DeepSpeed's
        loss scale under ZeRO, or None."""
        if self.zero:
            from fastvader.memory.zero import ZeroLossScale

            return ZeroLossScale(self.optimizer)
        return self.accelerator.scaler

    def _setup_trust(self) -> None:
        """Guards, "did it learn?" signals, the startup self-check and reward-hacking safeguards
        (docs/trust.md)."""
        cfg = self.cfg
        self.guard = NumericalGuard(cfg.guards.max_bad_steps, cfg.train.precision)
        self.learn = LearnMonitor(self.backbone.denoiser, self.lora_params, cfg.guards,
                                  store=lambda: self.history.setdefault("learn", {}))
        self.selfcheck.watch_checkpointing(self.checkpoint_wrappers, cfg.memory.checkpointing, self.sampler)
        self.selfcheck.watch_speed(self.speed)
        if cfg.guards.self_check:
            self.selfcheck.arm()
        else:
            self.selfcheck.release()
        self.safeguards = Safeguards(cfg, self.prompts.prompts, self.val_prompts, self.device)
        self.sampler.grad_step_wrapper = self.safeguards.step_wrapper(self.backbone.denoiser,
                                                                      self.sampler.grad_step_wrapper)
        self.loggers = None

    def _weight_dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.backbone.dtype, "backbone.dtype", self.device)

    def _apply_kernels(self):
        from fastvader.patching.core import apply

        enabled = str(self.cfg.kernels.enabled).lower()
        if enabled in ("off", "false") or (enabled == "auto" and self.device.type != "cuda"):
            return None
        ops = self.cfg.kernels.ops or None
        reports = {where: self.selfcheck.watch_kernels(where, model, lambda m: apply(m, ops))
                   for where, model in (("denoiser", self.backbone.denoiser), ("vae", self.backbone.vae))}
        for where, report in reports.items():
            print(f"[{where}] {report}")
        return reports

    def _step_wrapper(self):
        return grad_step_wrapper(self.cfg.memory.checkpointing, self.cfg.memory.offload_activations,
                                 stats=self.selfcheck.offload_stats)

    # -- the step --------------------------------------------------------------------------------
    def forward_reward(self, prompts: list[str], timings: dict[str, float],
                       draws: BatchDraws | None = None) -> tuple[torch.Tensor, int]:
        """Sample, decode and score one micro-batch: (rewards (B,), grad steps K). ``draws`` gives
        each video its own random stream; without it every draw comes from ``self.generator``."""
        return self.rollout(prompts, draws or BatchDraws.from_generator(self.generator, len(prompts)), timings)

    def train_step(self) -> StepResult:
        """One optimizer step; a CUDA out-of-memory error is re-raised saying what to change."""
        try:
            return self._train_step()
        except torch.cuda.OutOfMemoryError as err:
            from fastvader.memory.planner import oom_message

            for p in self.lora_params:  # the partial step's gradients (mid-accumulation, zero_grad waits)
                p.grad = None
            raise torch.cuda.OutOfMemoryError(oom_message(self.cfg, err, self.device)) from err

    def _train_step(self) -> StepResult:
        """One optimizer step over ``optim.grad_accum`` micro-batches of ``train.batch_size`` videos
        per rank; a step whose loss or gradients are NaN/Inf on any rank is skipped on all."""
        start, timings = time.perf_counter(), {}
        micro = [self._micro_batch(m, timings) for m in range(self.cfg.optim.grad_accum)]
        finite = all(m.finite for m in micro)
        if finite and self.cfg.guards.self_check and not self.selfcheck.done:
            self.selfcheck.verify(self.lora_params)
        if not self.zero:  # DeepSpeed reduces the gradients itself
            finite = average_gradients(self.accelerator, self.lora_params, finite)
        grad_norm = self._clip_gradients() if finite else float("nan")
        loss_scale = self.loss_scale
        skip = self.guard.classify(finite, is_finite(grad_norm), loss_scale)
        if skip is None or skip == FP16_OVERFLOW:
            self.optimizer.step()  # on an overflow the GradScaler skips the update and lowers its scale
        if skip is None:
            self.lr_scheduler.step()
        self.guard.record(skip, loss_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._step_result(micro, grad_norm, skip, time.perf_counter() - start, timings)

    def _micro_batch(self, micro: int, timings: dict[str, float]) -> _MicroBatch:
        """Forward and backward of one micro-batch inside the accelerator's accumulation window.
        Every micro-batch runs, even after a NaN/Inf one, so that the accelerator (and DeepSpeed)
        reach the accumulation boundary at the step's end. A NaN/Inf loss is not back-propagated,
        except under ZeRO, whose engine must see every backward; its own overflow check then
        skips the update."""
        cfg = self.cfg
        draws = BatchDraws.for_step(cfg.train.seed, self.step, micro, self.accelerator.process_index,
                                    cfg.train.batch_size)
        prompts = [self.prompts.sample(1, g)[0] for g in draws.videos]
        with self.accelerator.accumulate():  # the last micro-batch of a step syncs (and steps, under ZeRO)
            reward, k = self.forward_reward(prompts, timings, draws)
            loss = -reward.mean()
            penalty = self.safeguards.penalty()  # keeps the model near the base (safeguards.regularizer)
            if penalty is not None:
                loss = loss + penalty
            finite = is_finite(loss) and is_finite(reward.detach())
            if loss.requires_grad and (finite or self.zero):  # a detached graph is the self-check's report
                t0 = self.rollout.clock()
                self.accelerator.backward(loss)  # divides by optim.grad_accum; scales fp16 losses
                timings["backward"] = timings.get("backward", 0.0) + self.rollout.clock() - t0
        self.rollout.frozen.park()
        return _MicroBatch(reward.detach().mean().item(), loss.item(), k, finite)

    def _clip_gradients(self) -> float:
        """Unscale (fp16) and clip the LoRA gradients; returns their norm before clipping. Under ZeRO
        the engine clipped them inside the last backward, and this reads the norm it used."""
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(self.lora_params, max_norm)
        return float("nan") if norm is None else float(norm)

    def _step_result(self, micro: list[_MicroBatch], grad_norm: float, skip: str | None, seconds: float,
                     timings: dict[str, float]) -> StepResult:
        result = StepResult(self.step, sum(m.reward for m in micro) / len(micro),
                            sum(m.loss for m in micro) / len(micro), grad_norm,
                            self.optimizer.param_groups[0]["lr"], max(m.grad_steps for m in micro), seconds,
                            timings, skipped=skip is not None)
        result.signals = self.learn.observe(result.reward, grad_norm, result.skipped)
        if self.safeguards.regularizer is not None:
            result.signals["reg_penalty"] = self.safeguards.regularizer.last_value
        if skip is not None:
            result.signals["skip_reason"] = skip
        return result

    # -- validation ------------------------------------------------------------------------------
    def sample_videos(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Full no-grad sampling and decoding of every frame: (B, F, 3, H, W) in [0, 1]."""
        return self.rollout.sample_videos(prompts, seed)

    def validate(self, tag: str, save_videos: bool = False) -> dict[str, Any]:
        """Mean reward over the validation prompts and seeds (and sample videos under samples/)."""
        seeds = self.cfg.validation.seeds
        scores, videos = self.rollout.score(self.val_prompts, seeds, desc=f"validation ({tag})")
        result = {"tag": tag, "step": self.step, **scores}
        if save_videos:
            write_samples(videos, self.val_prompts, seeds, self.run_dir / "samples", self.cfg.video.fps,
                          prefix=f"{tag}_")
        self.safeguards.after_validation(self, tag, videos, result)
        self.history["validation"][tag] = result
        return result

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the LoRA weights to continue exactly (under ZeRO the
        optimizer state is each rank's own: see :meth:`save_checkpoint`)."""
        state = {"step": self.step, "lr_scheduler": self.lr_scheduler.state_dict(),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "history": json.dumps(self.history)}
        if not self.zero:
            state["optimizer"] = self.optimizer.state_dict()
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Every rank calls this (under ZeRO each one saves its part of the optimizer state). The
        history it holds includes this invocation's record, brought up to this step."""
        from fastvader.memory.zero import zero_state_dict

        self._update_invocation()
        lora, state = lora_state_dict(self.backbone.denoiser), self.state_dict()
        shard = zero_state_dict(self.optimizer) if self.zero else None
        check_finite_state(lora, "a checkpoint")
        check_finite_state({"optimizer": shard if self.zero else state["optimizer"]}, "a checkpoint")
        return ckpt.save_checkpoint(self.run_dir, self.step, lora, state, keep=self.cfg.train.keep_checkpoints,
                                    lora_metadata=self.lora_file_metadata(), rank_state=shard,
                                    rank=self.accelerator.process_index, barrier=self.accelerator.wait_for_everyone,
                                    config_yaml=self.cfg.to_yaml())

    def resume(self, checkpoint: ckpt.LoadedCheckpoint) -> None:
        """Continue from a verified checkpoint (:class:`RunFolder` finds and checks it): LoRA
        weights, optimizer, schedule, loss scale, random streams and the run's history."""
        from fastvader.memory.zero import load_zero_state_dicts

        path, state = checkpoint.path, checkpoint.state
        load_lora_state(self.backbone.denoiser, checkpoint.lora, path)
        if self.zero:  # after the weights: the fp32 master copies are loaded over them
            load_zero_state_dicts(self.optimizer, ckpt.load_rank_states(path))
        elif "optimizer" not in state:
            raise ckpt.CheckpointError(f"checkpoint {path} was written under DeepSpeed ZeRO; resume it with the "
                                       "same memory.zero_stage")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        self.safeguards.restore(self.history)
        self.step = int(state["step"])
        print(f"fastvader: resuming from {path} at step {self.step}")

    def lora_file_metadata(self) -> dict[str, str]:
        """What a LoRA file of this run says of itself: family, base model, rank, alpha, targets,
        reward, steps (the loaders check a file against it)."""
        cfg = self.cfg
        return lora_metadata(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules or self.backbone.default_lora_targets,
                             backbone=cfg.backbone.name, base_model=cfg.backbone.pretrained or cfg.backbone.name,
                             reward=json.dumps(cfg.reward_terms), steps=self.step)

    def save_lora(self, path: str | Path | None = None) -> Path:
        check_finite_state(lora_state_dict(self.backbone.denoiser), "the LoRA file")
        return save_lora(self.backbone.denoiser, path or self.run_dir / "lora.safetensors", self.lora_file_metadata())

    # -- the run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``, validating before and after; returns the summary. Every rank
        trains and saves its part of each checkpoint; rank 0 alone owns the run folder, logs,
        validates and writes the LoRA file and the summary. SIGINT/SIGTERM stop the run after the
        step in progress, saving its work (:class:`RunInterrupted`); any other error still leaves
        summary.json saying what failed."""
        main = self.accelerator.is_main_process
        self._fit_start = time.perf_counter()
        if main:
            self.run.claim()
        try:
            with StopRequests() as stop:
                self.invocation = begin_invocation(self.history, self.step, self.run.resumed_from, self.run.changes)
                if main:
                    self._open_run()
                status = self._loop(stop)
                return self._finish(status, stop.signal_name)
        except Exception as err:
            found = ckpt.storage_error(err, getattr(err, "filename", None) or self.run_dir)
            if main:
                self._write_failure_summary(found or err)
            if found is not None:
                raise found from err
            raise
        finally:
            if main:
                self.run.release()

    def _loop(self, stop: StopRequests) -> str:
        """Steps until ``train.steps``, an early stop or a stop request (agreed by every rank after
        each step); checkpoints by steps and by time. Returns the run's status."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        main = self.accelerator.is_main_process
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), unit="step",
                   dynamic_ncols=True)
        last_save = time.monotonic()
        if main:
            self._validate_if_due()  # a run resumed where its previous invocation ended
        stopping, early = on_any_process(self.accelerator, stop.requested, self.safeguards.stop_reason is not None)
        while self.step < t.steps and not (stopping or early):
            result = self.train_step()
            if main:
                self._log_step(result)
            bar.update(1)
            bar.set_postfix(reward=f"{result.reward:.4f}", loss=f"{result.loss:.4f}", s_step=f"{result.seconds:.2f}")
            self.guard.raise_if_stuck(self.step)
            if main:
                self._validate_if_due()
            stopping, due, early = on_any_process(self.accelerator, stop.requested, self._checkpoint_due(last_save),
                                                  self.safeguards.stop_reason is not None)
            if due and not stopping:  # a stop request saves once, at the end
                self.save_checkpoint()
                last_save = time.monotonic()
        bar.close()
        if stopping:
            return "interrupted"
        if early and main:
            print(f"fastvader: stopping early at step {self.step}: {self.safeguards.stop_reason}")
        return "stopped_early" if early else "completed"

    def _validate_if_due(self) -> None:
        """A held-out round every ``validation.every`` steps, the last step excepted (the "after"
        validation scores it), once: a resumed run that ended its previous invocation on such a
        step has its round now, as an uninterrupted run would have had."""
        every = self.cfg.validation.every
        if (every and 0 < self.step < self.cfg.train.steps and self.step % every == 0
                and f"step{self.step}" not in self.history["validation"]):
            self.validate(f"step{self.step}")

    def _checkpoint_due(self, last_save: float) -> bool:
        t = self.cfg.train
        by_steps = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0
        by_time = bool(t.checkpoint_minutes) and time.monotonic() - last_save >= t.checkpoint_minutes * 60
        return by_steps or by_time

    def _open_run(self) -> None:
        """The run's config.yaml (the settings of the latest invocation; each checkpoint keeps its
        own), the loggers, the "before" validation (once per run)."""
        cfg = self.cfg
        with ckpt.atomic_path(self.run_dir / "config.yaml") as tmp:
            tmp.write_text(cfg.to_yaml())
        self.loggers = Loggers.from_config(cfg, self.run_dir)
        if "before" not in self.history["validation"]:
            self.validate("before", save_videos=cfg.validation.save_videos)

    def _log_step(self, result: StepResult) -> None:
        self.history["rewards"].append(result.reward)
        record = result.as_dict()
        with open(self.run_dir / "metrics.jsonl", "a") as log:
            log.write(metrics_line(record))
        self.loggers.log_step(self.step, record)

    def _update_invocation(self, status: str | None = None) -> None:
        if self.invocation is not None:
            update_invocation(self.invocation, self.step, time.perf_counter() - self._fit_start, status,
                              self.selfcheck.report)

    def _finish(self, status: str, signal_name: str | None) -> dict[str, Any]:
        """The end of an invocation, on every rank: the "after" validation (not when interrupted),
        the LoRA file, a last checkpoint holding the closed history, the reward curve and the
        summary. An interrupted run then raises RunInterrupted."""
        from fastvader.io.media import plot_curve

        main = self.accelerator.is_main_process
        after = None
        if main and status != "interrupted":
            after = self.validate("after", save_videos=self.cfg.validation.save_videos)
        if main:
            self.save_lora()
        self._update_invocation(status)
        saved = self.save_checkpoint()
        if not main:
            return {"run": str(self.run_dir), "steps": self.step, "rank": self.accelerator.process_index}
        held_out = [(r["step"], r["reward"]) for r in self.history["validation"].values()]
        plot_curve(self.history["rewards"], self.run_dir / "reward_curve.png", title="reward", validation=held_out)
        summary = self.summary(status, after)
        self.loggers.log_summary(self.step, self.run_dir / "reward_curve.png", summary["learn"])
        self.loggers.close()
        ckpt.write_json(self.run_dir / "summary.json", summary)
        if status == "interrupted":
            raise RunInterrupted(f"{signal_name}: stopped after step {self.step}; saved {saved}, the LoRA and "
                                 f"summary.json. Continue with: fastvader train --resume {self.run_dir}", summary)
        return summary

    def summary(self, status: str, after: dict[str, Any] | None = None,
                error: BaseException | None = None) -> dict[str, Any]:
        """What summary.json holds: one history across every invocation of the run (wall time,
        invocations, validation rounds, safeguards) and this invocation's trust signals."""
        validation = self.history["validation"]
        summary = {"run": str(self.run_dir), "steps": self.step, "status": status}
        if "before" in validation:
            summary["reward_before"] = validation["before"]["reward"]
        if after is not None:
            summary["reward_after"] = after["reward"]
        summary.update({
            "validation": validation, "wall_time_s": total_wall_time(self.history),
            "invocations": self.history.get("invocations", []),
            "peak_memory_bytes": peak_memory(self.device), "device": str(self.device),
            "kernels": {k: str(v) for k, v in (self.kernel_report or {}).items()},
            "speed": self.speed.summary(),
        })
        summary.update(self.trust_summary(error))
        return summary

    def trust_summary(self, error: BaseException | None = None) -> dict[str, Any]:
        """Learn signals, guard counts, self-check and held-out results for summary.json; the
        learn warnings are also printed."""
        import warnings

        learn = self.learn.summary()
        for message in learn["warnings"]:
            warnings.warn(f"fastvader did-it-learn check: {message}", stacklevel=2)
        out = {"learn": learn, "guards": self.guard.summary(), "self_check": self.selfcheck.report,
               "safeguards": self.safeguards.summary()}
        if error is not None:
            out["error"] = f"{type(error).__name__}: {error}"
        return out

    def _write_failure_summary(self, error: BaseException) -> None:
        """summary.json for a run that failed (a guard, the self-check, a full disk, a bug): what
        failed and the signals so far. Written only once the run owns its folder, and never
        raising over the error that brought it here."""
        import warnings

        if self.invocation is None:
            return
        self._update_invocation("failed")
        try:
            ckpt.write_json(self.run_dir / "summary.json", self.summary("failed", error=error))
        except OSError as err:
            warnings.warn(f"fastvader: could not write {self.run_dir / 'summary.json'}: {err}", stacklevel=2)
        if self.loggers is not None:
            self.loggers.close()

    def close(self) -> None:
        """Take the trainer's patches off the models (self-check hooks, speed settings, checkpoint
        wrappers, kernels, block swap, the fp8 layers of a backbone passed in), so that a backbone
        passed in runs as it did before. What stays: the LoRA adapters (peft layers wrapping the
        original Linear objects, holding the trained weights, and peft's ``peft_config`` on the
        denoiser), and what set-up did to the base weights: frozen, eval mode, moved to the run's
        device and dtype. Calling it again does nothing."""
        from fastvader.patching.core import revert

        self.selfcheck.release()
        self.speed.revert()
        self.checkpoint_wrappers.revert()
        if self.kernel_report is not None:
            revert(self.backbone.denoiser)
            revert(self.backbone.vae)
        self.frozen_weights.revert()
        if self.loggers is not None:
            self.loggers.close()
        self.run.release()
        self.accelerator.free_memory()  # drops the accelerator's references (the DeepSpeed engine)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(cfg: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          **kwargs) -> dict[str, Any]:
    """Run a whole training job from a config; returns the summary (also in summary.json).
    ``resume``: a run folder or one of its checkpoints; ``overwrite``: empty the run folder first.
    Raises RunInterrupted (a KeyboardInterrupt) after saving when SIGINT/SIGTERM stops it."""
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
