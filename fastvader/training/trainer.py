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
from fastvader.config import ConfigError, TrainConfig
from fastvader.inference import write_samples
from fastvader.io import checkpoint as ckpt
from fastvader.io.loggers import Loggers
from fastvader.lora import add_lora, lora_metadata, lora_state_dict, save_lora
from fastvader.memory.checkpointing import enable_checkpointing
from fastvader.memory.offload import grad_step_wrapper
from fastvader.memory.optim import build_optimizer
from fastvader.monitoring.guards import NonFiniteError, NumericalGuard, check_finite_state, is_finite
from fastvader.monitoring.learn_signals import LearnMonitor
from fastvader.monitoring.safeguards import Safeguards
from fastvader.monitoring.selfcheck import SelfCheck, SelfCheckError
from fastvader.precision import resolve_device, resolve_dtype
from fastvader.rewards import Reward, build_reward
from fastvader.speed import SpeedPath
from fastvader.training.distributed import (average_gradients, broadcast_from_main, build_accelerator,
                                            training_device)
from fastvader.training.draws import BatchDraws
from fastvader.training.prompts import PromptSource, validation_prompts
from fastvader.training.rollout import Rollout, autocast_for, embed_prompts_up_front

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
    in prebuilt (tests, notebooks); ``resume`` is a run directory to continue. accelerate's
    settings are per process, so of several Trainers in one process the newest one trains."""

    def __init__(self, cfg: TrainConfig, *, backbone: Backbone | None = None,
                 reward: Reward | None = None, resume: str | Path | None = None):
        cfg = cfg.validate()
        if cfg.memory.gpu_memory:
            from fastvader.memory.planner import apply_best_plan

            cfg = apply_best_plan(cfg)
        self.cfg = cfg
        t = cfg.train
        configured = resolve_device(t.device)
        self.amp_dtype = resolve_precision(t.precision, configured)
        self.accelerator = build_accelerator(cfg, configured, self.amp_dtype)
        self.device = training_device(self.accelerator, configured)
        if t.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads)
        self.weight_dtype = self._weight_dtype()
        self.run_dir = cfg.run_dir
        self.generator = torch.Generator().manual_seed(t.seed)
        torch.manual_seed(t.seed)

        self.backbone = (backbone or build_backbone(cfg.backbone)).freeze()
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
        self._setup_trust()
        if resume is not None:
            self.resume(resume)

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

        lora = self.cfg.lora
        params = add_lora(self.backbone.denoiser, lora.rank, lora.alpha, lora.dropout,
                          lora.target_modules or self.backbone.default_lora_targets, lora.init_weights)
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
        scores, videos = self.rollout.score(self.val_prompts, seeds)
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
        """Every rank calls this (under ZeRO each one saves its part of the optimizer state)."""
        from fastvader.memory.zero import zero_state_dict

        lora, state = lora_state_dict(self.backbone.denoiser), self.state_dict()
        shard = zero_state_dict(self.optimizer) if self.zero else None
        check_finite_state(lora, "a checkpoint")
        check_finite_state({"optimizer": shard if self.zero else state["optimizer"]}, "a checkpoint")
        return ckpt.save_checkpoint(self.run_dir, self.step, lora, state, keep=self.cfg.train.keep_checkpoints,
                                    rank_state=shard, rank=self.accelerator.process_index,
                                    barrier=self.accelerator.wait_for_everyone)

    def resume(self, run_dir: str | Path) -> None:
        from peft.utils import set_peft_model_state_dict

        from fastvader.memory.zero import load_zero_state_dicts

        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / ckpt.CHECKPOINT_DIR}; "
                                    "set train.checkpoint_every > 0 to write them")
        lora, state = ckpt.load_checkpoint(path)
        set_peft_model_state_dict(self.backbone.denoiser, {k: v.to(self.device) for k, v in lora.items()})
        if self.zero:  # after the weights: the fp32 master copies are loaded over them
            load_zero_state_dicts(self.optimizer, ckpt.load_rank_states(path))
        elif "optimizer" not in state:
            raise ConfigError(f"checkpoint {path} was written under DeepSpeed ZeRO; resume it with the same "
                              "memory.zero_stage")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        self.step = int(state["step"])
        if self.accelerator.is_main_process:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        print(f"fastvader: resumed from {path} at step {self.step}")

    def save_lora(self, path: str | Path | None = None) -> Path:
        cfg = self.cfg
        meta = lora_metadata(cfg.lora.rank, cfg.lora.alpha,
                             cfg.lora.target_modules or self.backbone.default_lora_targets,
                             base_model=cfg.backbone.pretrained or cfg.backbone.name,
                             reward=json.dumps(cfg.reward_terms), steps=self.step)
        check_finite_state(lora_state_dict(self.backbone.denoiser), "the LoRA file")
        return save_lora(self.backbone.denoiser, path or self.run_dir / "lora.safetensors", meta)

    # -- the run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``, validating before and after; returns the summary. Every rank
        trains and saves its part of each checkpoint; rank 0 alone logs, validates and writes the
        LoRA file and the summary."""
        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.train
        main = self.accelerator.is_main_process
        start = time.perf_counter()
        if main:
            self._open_run()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), unit="step",
                   dynamic_ncols=True)
        while self.step < t.steps:
            result = self.train_step()
            if main:
                self._log_step(result)
            bar.update(1)
            bar.set_postfix(reward=f"{result.reward:.4f}", loss=f"{result.loss:.4f}", s_step=f"{result.seconds:.2f}")
            self.guard.raise_if_stuck(self.step)
            if main and cfg.validation.every and self.step % cfg.validation.every == 0 and self.step < t.steps:
                self.validate(f"step{self.step}")
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
            if self.safeguards.stop_reason:
                print(f"fastvader: stopping early at step {self.step}: {self.safeguards.stop_reason}")
                break
        bar.close()
        if not main:
            self._save_last_checkpoint()
            return {"run": str(self.run_dir), "steps": self.step, "rank": self.accelerator.process_index}
        return self._close_run(start)

    def _open_run(self) -> None:
        """The run folder, its config.yaml, a clean metrics log, the loggers, the "before" validation."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)  # a fresh run reusing the folder starts clean
        self.loggers = Loggers.from_config(cfg, self.run_dir)
        if "before" not in self.history["validation"]:
            self.validate("before", save_videos=cfg.validation.save_videos)

    def _log_step(self, result: StepResult) -> None:
        self.history["rewards"].append(result.reward)
        record = result.as_dict()
        with open(self.run_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        self.loggers.log_step(self.step, record)

    def _save_last_checkpoint(self) -> None:
        every = self.cfg.train.checkpoint_every
        if not (every and self.step % every == 0):  # not saved by the loop already
            self.save_checkpoint()

    def _close_run(self, start: float) -> dict[str, Any]:
        """The "after" validation, the LoRA file, the last checkpoint, the reward curve and the summary."""
        from fastvader.io.media import plot_curve

        cfg = self.cfg
        after = self.validate("after", save_videos=cfg.validation.save_videos)
        self.save_lora()
        self._save_last_checkpoint()
        plot_curve(self.history["rewards"], self.run_dir / "reward_curve.png", title="training reward")
        summary = {
            "run": str(self.run_dir), "steps": self.step,
            "reward_before": self.history["validation"]["before"]["reward"],
            "reward_after": after["reward"],
            "validation": self.history["validation"],
            "wall_time_s": round(time.perf_counter() - start, 2),
            "peak_memory_bytes": peak_memory(self.device), "device": str(self.device),
            "kernels": {k: str(v) for k, v in (self.kernel_report or {}).items()},
            "speed": self.speed.summary(),
        }
        summary.update(self.trust_summary())
        self.loggers.log_summary(self.step, self.run_dir / "reward_curve.png", summary["learn"])
        self.loggers.close()
        ckpt.write_json(self.run_dir / "summary.json", summary)
        return summary

    def trust_summary(self, error: BaseException | None = None) -> dict[str, Any]:
        """Learn signals, guard counts, self-check and held-out results for summary.json; the
        learn warnings are also printed."""
        import warnings

        learn = self.learn.summary()
        for message in learn["warnings"]:
            warnings.warn(f"fastvader did-it-learn check: {message}", stacklevel=2)
        status = "failed" if error is not None else ("stopped_early" if self.safeguards.stop_reason else "completed")
        out = {"status": status, "learn": learn, "guards": self.guard.summary(),
               "self_check": self.selfcheck.report, "safeguards": self.safeguards.summary()}
        if error is not None:
            out["error"] = f"{type(error).__name__}: {error}"
        return out

    def write_failure_summary(self, error: BaseException) -> None:
        """summary.json for a run a guard stopped: what failed and the signals so far (no LoRA)."""
        summary = {"run": str(self.run_dir), "steps": self.step, **self.trust_summary(error)}
        ckpt.write_json(self.run_dir / "summary.json", summary)
        if self.loggers is not None:
            self.loggers.close()

    def close(self) -> None:
        """Take the trainer's patches off the models (self-check hooks, speed settings, checkpoint
        wrappers, kernels), so that a backbone passed in runs as it did before. What stays: the LoRA
        adapters (peft layers wrapping the original Linear objects, holding the trained weights,
        and peft's ``peft_config`` on the denoiser), and what set-up did to the base weights:
        frozen, eval mode, moved to the run's device and dtype. Calling it again does nothing."""
        from fastvader.patching.core import revert

        self.selfcheck.release()
        self.speed.revert()
        self.checkpoint_wrappers.revert()
        if self.kernel_report is not None:
            revert(self.backbone.denoiser)
            revert(self.backbone.vae)
        if self.loggers is not None:
            self.loggers.close()
        self.accelerator.free_memory()  # drops the accelerator's references (the DeepSpeed engine)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with ckpt.atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(cfg: TrainConfig, *, resume: str | Path | None = None, **kwargs) -> dict[str, Any]:
    """Run a whole training job from a config; returns the summary (also in summary.json)."""
    trainer = Trainer(cfg, resume=resume, **kwargs)
    try:
        return trainer.fit()
    except (NonFiniteError, SelfCheckError) as err:
        trainer.write_failure_summary(err)
        raise
    finally:
        trainer.close()
