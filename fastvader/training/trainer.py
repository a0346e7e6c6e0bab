"""The VADER training loop.

One step: draw prompts and noise -> sample with gradients through the last K denoising steps
-> decode the chosen frames -> reward -> loss = -reward -> backward into LoRA -> clip -> step.
Memory techniques (checkpointing, chunked decode) and kernels are named pieces set up around
the loop; the loop itself only strings the data flow together.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvader.io import checkpoint as ckpt
from fastvader.backbones import Backbone, build_backbone
from fastvader.config import TrainConfig
from fastvader.training.distributed import DistContext
from fastvader.training.draws import BatchDraws
from fastvader.training.frames import FrameSelector
from fastvader.monitoring.guards import NonFiniteError, NumericalGuard, check_finite_state, is_finite
from fastvader.monitoring.learn_signals import LearnMonitor
from fastvader.io.loggers import Loggers
from fastvader.lora import add_lora, lora_metadata, lora_state_dict, save_lora
from fastvader.memory.checkpointing import enable_checkpointing
from fastvader.memory.fp8 import Fp8Storage
from fastvader.memory.frozen_weights import FrozenWeights
from fastvader.memory.offload import FrozenPlacement, grad_step_wrapper
from fastvader.memory.optim import build_optimizer
from fastvader.training.prompts import PromptCache, PromptSource
from fastvader.rewards import Reward, build_reward
from fastvader.precision import resolve_device, resolve_dtype
from fastvader.monitoring.safeguards import Safeguards
from fastvader.training.sampling import Sampler, TruncationPolicy
from fastvader.monitoring.selfcheck import SelfCheck, SelfCheckError

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


class Trainer:
    """Builds everything a config names and runs the loop. ``backbone``/``reward`` may be passed
    in prebuilt (tests, notebooks); ``resume`` is a run directory to continue."""

    def __init__(self, cfg: TrainConfig, *, backbone: Backbone | None = None,
                 reward: Reward | None = None, resume: str | Path | None = None):
        cfg = cfg.validate()
        if cfg.memory.gpu_memory or cfg.memory.block_swap == "auto":
            from fastvader.memory.planner import apply_best_plan

            cfg = apply_best_plan(cfg)
        self.cfg = cfg
        t = cfg.train
        self.dist = DistContext.from_env(resolve_device(t.device).type)
        self.device = self.dist.device(resolve_device(t.device))
        if t.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads)
        self.amp_dtype = resolve_precision(t.precision, self.device)
        self.weight_dtype = self._weight_dtype()
        self.run_dir = cfg.run_dir
        self.generator = torch.Generator().manual_seed(t.seed)
        torch.manual_seed(t.seed)

        storage = Fp8Storage.from_config(cfg.memory)
        self.backbone = (backbone or build_backbone(cfg.backbone, storage=storage)).freeze()
        # fp8 storage and block swap, before the move: swapped blocks never have to fit on the GPU
        self.frozen_weights = FrozenWeights(self.backbone.denoiser, cfg.memory, self.device,
                                            passed_in=backbone is not None)
        self.backbone.to(self.device, self.weight_dtype)
        self.reward = (reward or build_reward(cfg.reward)).freeze().to(self.device)
        self.frozen = FrozenPlacement([self.backbone.vae, self.reward], self.device, cfg.memory.frozen_placement)
        self.lora_params = add_lora(self.backbone.denoiser, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                    cfg.lora.target_modules or self.backbone.default_lora_targets,
                                    cfg.lora.init_weights)
        for p in self.lora_params:  # LoRA trains in fp32 whatever the base weights are
            p.data = p.data.float()
        self.dist.broadcast_(self.lora_params)
        self.selfcheck = SelfCheck(cfg)
        self.kernel_report = self._apply_kernels()
        self.checkpoint_wrappers = enable_checkpointing(self.backbone.denoiser, cfg.memory.checkpointing)

        self.sampler = Sampler(self.backbone, cfg.sampler.name, cfg.sampler.steps, cfg.sampler.guidance_scale,
                               cfg.sampler.eta, grad_step_wrapper=self._step_wrapper())
        self.truncation = TruncationPolicy.parse(cfg.sampler.truncation, cfg.sampler.steps)
        self.frames = FrameSelector(cfg.frames.reward, cfg.frames.grad, cfg.video.frames)
        self.prompts = PromptSource.from_config(cfg.prompts, getattr(cfg, "_base_dir", None))
        self.val_prompts = list(cfg.validation.prompts) or self.prompts.prompts[:2]
        self.prompt_cache = PromptCache(self.backbone, self.device, self.weight_dtype)
        self._embed_all_prompts()
        self.latent_shape = self.backbone.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)

        self.optimizer = build_optimizer(cfg.optim, self.lora_params)
        self.zero = None
        if cfg.memory.zero_stage:  # DeepSpeed ZeRO owns gradient reduction and the update
            from fastvader.memory.zero import ZeroOptimizer

            self.zero = ZeroOptimizer(cfg, self.backbone.denoiser, self.optimizer, self.amp_dtype, self.dist.world_size)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.history: dict[str, Any] = {"rewards": [], "validation": {}}
        self._setup_trust()
        if resume is not None:
            self.resume(resume)

    # -- setup pieces ----------------------------------------------------------------------------
    def _setup_trust(self) -> None:
        """Guards, "did it learn?" signals, the startup self-check and reward-hacking safeguards
        (docs/trust.md)."""
        cfg = self.cfg
        self.guard = NumericalGuard(cfg.guards.max_bad_steps, cfg.train.precision)
        self.learn = LearnMonitor(self.backbone.denoiser, self.lora_params, cfg.guards,
                                  store=lambda: self.history.setdefault("learn", {}))
        self.selfcheck.watch_checkpointing(self.checkpoint_wrappers, cfg.memory.checkpointing, self.sampler)
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

    def _embed_all_prompts(self) -> None:
        if len(self.prompts.prompts) <= 4096:
            self.prompt_cache.warm(self.prompts.prompts + self.val_prompts)
            if self.device.type == "cuda":  # embeddings are cached: the encoder leaves the GPU
                offload = getattr(self.backbone, "offload_text_encoder", None)
                text_encoder = getattr(self.backbone, "text_encoder", None)
                if offload is not None:
                    offload()
                elif isinstance(text_encoder, torch.nn.Module):
                    text_encoder.to("cpu")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    # -- the step --------------------------------------------------------------------------------
    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def forward_reward(self, prompts: list[str], timings: dict[str, float],
                       draws: BatchDraws | None = None) -> tuple[torch.Tensor, int]:
        """Sample, decode and score one micro-batch; returns (rewards (B,), grad steps K).
        ``draws`` gives each video its own noise stream (see fastvader.training.distributed)."""
        cfg = self.cfg
        embeds = self.prompt_cache(prompts)
        shared = draws.shared if draws is not None else self.generator
        if draws is not None:
            noise = torch.cat([self.sampler.initial_noise(1, self.latent_shape, g, self.device, self.weight_dtype)
                               for g in draws.videos])
        else:
            noise = self.sampler.initial_noise(len(prompts), self.latent_shape, self.generator, self.device,
                                               self.weight_dtype)
        k = self.truncation.draw(shared)
        frames, grad_frames = self.frames.draw(shared)
        t0 = self._sync()
        with self.autocast():
            latents = self.sampler.sample(embeds, noise, grad_steps=k, generator=shared)
            t1 = self._sync()
            self.frozen.load()
            video = self.backbone.decode_frames(latents, frames, grad_frames, chunk=cfg.memory.decode_chunk)
            t2 = self._sync()
        rewards = self.reward(video.float(), prompts)
        t3 = self._sync()
        for key, dt in (("sample", t1 - t0), ("decode", t2 - t1), ("reward", t3 - t2)):
            timings[key] = timings.get(key, 0.0) + dt
        return rewards, k

    def train_step(self) -> StepResult:
        """One optimizer step; a CUDA out-of-memory error is re-raised saying what to change."""
        try:
            return self._train_step()
        except torch.cuda.OutOfMemoryError as err:
            from fastvader.memory.planner import oom_message

            self.optimizer.zero_grad(set_to_none=True)
            raise torch.cuda.OutOfMemoryError(oom_message(self.cfg, err, self.device)) from err

    def _train_step(self) -> StepResult:
        """One optimizer step over ``optim.grad_accum`` micro-batches (of ``train.batch_size`` per
        rank; gradients are averaged over ranks)."""
        cfg, start = self.cfg, time.perf_counter()
        accum = cfg.optim.grad_accum
        timings: dict[str, float] = {}
        rewards, losses, ks = [], [], []
        loss_ok, grad_norm = True, float("nan")
        for micro in range(accum):
            draws = BatchDraws.for_step(cfg.train.seed, self.step, micro, self.dist.rank, cfg.train.batch_size)
            prompts = [self.prompts.sample(1, g)[0] for g in draws.videos]
            reward, k = self.forward_reward(prompts, timings, draws)
            loss = -reward.mean() / accum
            penalty = self.safeguards.penalty()  # keeps the model near the base (safeguards.regularizer)
            if penalty is not None:
                loss = loss + penalty / accum
            rewards.append(reward.detach().mean().item())
            losses.append(loss.item() * accum)
            ks.append(k)
            if not (is_finite(loss) and is_finite(reward.detach())):
                loss_ok = False  # guard: no backward, no update from a NaN/Inf loss
                break
            t0 = self._sync()
            if loss.requires_grad:  # a detached graph is reported by the self-check, not a crash
                if self.zero is not None:
                    self.zero.backward(loss)
                else:
                    self.scaler.scale(loss).backward()
            timings["backward"] = timings.get("backward", 0.0) + self._sync() - t0
            self.frozen.park()
        if loss_ok and self.cfg.guards.self_check and not self.selfcheck.done:
            self.selfcheck.verify(self.lora_params)
        if self.zero is not None:
            # DeepSpeed owns reduction, clipping, fp16 loss scaling and its own overflow skips
            if loss_ok:
                grad_norm = self.zero.step()
                self.lr_scheduler.step()
            skip = self.guard.classify(loss_ok, True, None)
        else:
            if self.dist.enabled:
                if not loss_ok:  # poison the average, so that every rank skips this step together
                    for p in self.lora_params:
                        p.grad = torch.full_like(p, float("nan"))
                self.dist.all_reduce_mean(self.lora_params)
            if loss_ok:
                self.scaler.unscale_(self.optimizer)
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.lora_params, max_norm))
            skip = self.guard.classify(loss_ok, is_finite(grad_norm), self.scaler)
            if skip is None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
            elif loss_ok and self.scaler.is_enabled():
                self.scaler.update()  # fp16 overflow: lower the loss scale, exactly as scaler.step would skip
        self.guard.record(skip, self.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        result = StepResult(self.step, sum(rewards) / len(rewards), sum(losses) / len(losses), grad_norm,
                            self.optimizer.param_groups[0]["lr"], max(ks), time.perf_counter() - start, timings,
                            skipped=skip is not None)
        result.signals = self.learn.observe(result.reward, grad_norm, result.skipped)
        if self.safeguards.regularizer is not None:
            result.signals["reg_penalty"] = self.safeguards.regularizer.last_value
        if skip is not None:
            result.signals["skip_reason"] = skip
        return result

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_videos(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Full no-grad sampling and decoding of every frame: (B, F, 3, H, W) in [0, 1]."""
        generator = torch.Generator().manual_seed(seed)
        embeds = self.prompt_cache(prompts)
        noise = self.sampler.initial_noise(len(prompts), self.latent_shape, generator, self.device, self.weight_dtype)
        with self.autocast():
            latents = self.sampler.sample(embeds, noise, grad_steps=0, generator=generator)
            self.frozen.load()
            return self.backbone.decode_frames(latents).float()

    def validate(self, tag: str, save_videos: bool = False) -> dict[str, Any]:
        """Mean reward over the validation prompts and seeds (and sample videos under samples/)."""
        from fastvader.io.media import frame_grid, write_video

        scores, videos = [], []
        for seed in self.cfg.validation.seeds:
            video = self.sample_videos(self.val_prompts, seed)
            scores.append(self.reward(video, self.val_prompts).float().cpu())
            videos.append(video.cpu())
        self.frozen.park()
        per_prompt = torch.stack(scores).mean(0)
        result = {"tag": tag, "step": self.step, "reward": float(per_prompt.mean()),
                  "per_prompt": {p: float(s) for p, s in zip(self.val_prompts, per_prompt)}}
        if save_videos:
            out = self.run_dir / "samples"
            for s, seed in enumerate(self.cfg.validation.seeds):
                for i, prompt in enumerate(self.val_prompts):
                    name = f"{tag}_seed{seed}_{i:02d}_" + "_".join(prompt.split())[:40]
                    write_video(videos[s][i], out / name, fps=self.cfg.video.fps)
            frame_grid([v for batch in videos for v in batch], out / f"{tag}_grid.png")
        self.safeguards.after_validation(self, tag, videos, result)
        self.history["validation"][tag] = result
        return result

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "history": json.dumps(self.history)}

    def save_checkpoint(self) -> Path:
        lora, state = lora_state_dict(self.backbone.denoiser), self.state_dict()
        check_finite_state(lora, "a checkpoint")
        check_finite_state({"optimizer": state["optimizer"]}, "a checkpoint")
        return ckpt.save_checkpoint(self.run_dir, self.step, lora, state, keep=self.cfg.train.keep_checkpoints)

    def resume(self, run_dir: str | Path) -> None:
        from peft.utils import set_peft_model_state_dict

        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / ckpt.CHECKPOINT_DIR}; "
                                    "set train.checkpoint_every > 0 to write them")
        lora, state = ckpt.load_checkpoint(path)
        set_peft_model_state_dict(self.backbone.denoiser, {k: v.to(self.device) for k, v in lora.items()})
        for p in self.lora_params:
            p.data = p.data.float()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        self.step = int(state["step"])
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
        """Train to ``train.steps``, validating before and after; returns the summary."""
        from tqdm.auto import tqdm

        from fastvader.io.media import plot_curve

        cfg, t = self.cfg, self.cfg.train
        if not self.dist.is_main:
            return self._fit_worker()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)  # a fresh run reusing the folder starts clean
        self.loggers = Loggers.from_config(cfg, self.run_dir)
        start = time.perf_counter()
        if "before" not in self.history["validation"]:
            self.validate("before", save_videos=cfg.validation.save_videos)
        bar = tqdm(total=t.steps, initial=self.step, disable=not t.progress, unit="step", dynamic_ncols=True)
        with open(self.run_dir / "metrics.jsonl", "a") as log:
            while self.step < t.steps:
                result = self.train_step()
                self.history["rewards"].append(result.reward)
                record = result.as_dict()
                log.write(json.dumps(record) + "\n")
                log.flush()
                self.loggers.log_step(self.step, record)
                self.guard.raise_if_stuck(self.step)
                bar.update(1)
                bar.set_postfix(reward=f"{result.reward:.4f}", loss=f"{result.loss:.4f}",
                                s_step=f"{result.seconds:.2f}")
                if cfg.validation.every and self.step % cfg.validation.every == 0 and self.step < t.steps:
                    self.validate(f"step{self.step}")
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.safeguards.stop_reason:
                    print(f"fastvader: stopping early at step {self.step}: {self.safeguards.stop_reason}")
                    break
        bar.close()
        after = self.validate("after", save_videos=cfg.validation.save_videos)
        self.save_lora()
        if not (t.checkpoint_every and self.step % t.checkpoint_every == 0):
            self.save_checkpoint()
        plot_curve(self.history["rewards"], self.run_dir / "reward_curve.png", title="training reward")
        summary = {
            "run": str(self.run_dir), "steps": self.step,
            "reward_before": self.history["validation"]["before"]["reward"],
            "reward_after": after["reward"],
            "validation": self.history["validation"],
            "wall_time_s": round(time.perf_counter() - start, 2),
            "peak_memory_bytes": peak_memory(self.device), "device": str(self.device),
            "kernels": {k: str(v) for k, v in (self.kernel_report or {}).items()},
        }
        summary.update(self.trust_summary())
        self.loggers.log_summary(self.step, self.run_dir / "reward_curve.png", summary["learn"])
        self.loggers.close()
        ckpt.write_json(self.run_dir / "summary.json", summary)
        return summary

    def _fit_worker(self) -> dict[str, Any]:
        """Ranks other than 0 only train: rank 0 logs, validates and writes checkpoints."""
        while self.step < self.cfg.train.steps:
            self.train_step()
        return {"run": str(self.run_dir), "steps": self.step, "rank": self.dist.rank}

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
        """Take the trainer's patches off the models (self-check hooks, checkpoint wrappers,
        kernels, block swap, the fp8 layers of a backbone passed in), so that a backbone passed in
        runs as it did before. What stays: the LoRA adapters (peft layers wrapping the original
        Linear objects, holding the trained weights, and peft's ``peft_config`` on the denoiser),
        and what set-up did to the base weights: frozen, eval mode, moved to the run's device and
        dtype. Calling it again does nothing."""
        from fastvader.patching.core import revert

        self.selfcheck.release()
        self.checkpoint_wrappers.revert()
        if self.kernel_report is not None:
            revert(self.backbone.denoiser)
            revert(self.backbone.vae)
        self.frozen_weights.revert()
        if self.loggers is not None:
            self.loggers.close()


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
