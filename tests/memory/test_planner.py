"""The planner: predictions checked against saved_bytes of the real step (toy on the CPU, and
ModelScope 1.7B at 384x384x16 on the meta device), fastest-first plans, applying the best plan,
the `fastvader plan` command, and the out-of-memory message."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.config import ConfigError  # noqa: E402
from fastvader.memory import planner  # noqa: E402
from fastvader.memory.accounting import record_saved  # noqa: E402
from fastvader.memory.tiny import tiny_toy_config  # noqa: E402

torch.set_num_threads(1)  # these machines are shared: one thread avoids oversubscription


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """One measurement cache for this module (the toy cases share a geometry), not ~/.cache."""
    import os

    old = os.environ.get("FASTVADER_CACHE")
    os.environ["FASTVADER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FASTVADER_CACHE")
    else:
        os.environ["FASTVADER_CACHE"] = old


def _kept_prediction(pred: planner.Prediction) -> int:
    return pred.parts["activations kept (K grad steps)"] + pred.parts["decode kept"] + pred.parts["reward kept"]


@pytest.mark.parametrize("policy,truncation,frames", [
    ("sub_block", "specific:2", "all"),
    ("step", "specific:3", "all"),
    ("none", "last", "random:1"),
    ("block", "specific:2", "stride:2"),
])
def test_prediction_matches_what_the_real_step_keeps(tmp_path, policy, truncation, frames):
    """Planner (per-component meta measurements, composed) vs saved_bytes of the Trainer's own
    forward (real tensors, CPU): within 15%."""
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(tmp_path, sampler={"steps": 5, "truncation": truncation}, frames={"reward": frames},
                          memory={"checkpointing": policy}, train={"batch_size": 2})
    predicted = _kept_prediction(planner.predict(cfg, planner.measure(cfg, device_type="cpu")))
    trainer = Trainer(cfg)
    with record_saved([trainer.backbone, trainer.reward]) as log:
        trainer.forward_reward(["a red ball", "a dog runs"], {}, None)
    trainer.close()
    assert log.total > 0
    assert abs(predicted - log.total) <= 0.15 * log.total, (predicted, log.total)


def test_measurements_are_cached(tmp_path):
    cfg = tiny_toy_config(tmp_path, train={"batch_size": 2})
    first = planner.measure(cfg, device_type="cpu")
    assert planner.cache_path().is_file()
    assert planner.measure(cfg, device_type="cpu") == first
    assert planner.measure(cfg, device_type="cpu", use_cache=False) == first  # and measuring is deterministic


def _plan_for(tmp_path, policy="none", k="specific:3"):
    cfg = tiny_toy_config(tmp_path, sampler={"steps": 5, "truncation": k}, memory={"checkpointing": policy},
                          train={"batch_size": 2})
    m = planner.measure(cfg, device_type="cpu")
    return cfg, m


def test_plans_are_fastest_first_and_fit(tmp_path):
    cfg, m = _plan_for(tmp_path)
    preds = {s: planner.predict(cfg, m, s) for s in planner.candidate_settings(cfg)}
    # a budget that 'none' (the fastest) misses but step checkpointing meets
    none = planner.predict(cfg, m, planner.Setting("none"))
    step = planner.predict(cfg, m, planner.Setting("step"))
    assert step.peak < none.peak
    budget = int((step.peak + none.peak) / 2 / planner.HEADROOM)
    plan = planner.make_plan(cfg, budget, m)
    assert plan.ranked and all(p.fits(budget) for p in plan.ranked)
    assert all(a.relative_time <= b.relative_time for a, b in zip(plan.ranked, plan.ranked[1:]))
    assert not any(p.setting.checkpointing == "none" and not p.setting.offload_activations for p in plan.ranked)
    assert len(plan.ranked) < len(preds)
    assert "does NOT fit" in plan.table()


def test_apply_best_plan_changes_only_memory_settings(tmp_path):
    cfg, m = _plan_for(tmp_path)
    step = planner.predict(cfg, m, planner.Setting("step"))
    none = planner.predict(cfg, m, planner.Setting("none"))
    budget = int((step.peak + none.peak) / 2 / planner.HEADROOM)
    cfg = cfg.replace(memory=type(cfg.memory)(**{**cfg.memory.__dict__, "checkpointing": "none",
                                                  "gpu_memory": f"{budget}B"}))
    best = planner.apply_best_plan(cfg, verbose=False)
    assert best.memory.checkpointing != "none" or best.memory.offload_activations
    assert planner.predict(best, m).fits(budget)
    assert best.video == cfg.video and best.sampler == cfg.sampler
    tiny = cfg.replace(memory=type(cfg.memory)(**{**cfg.memory.__dict__, "gpu_memory": "1KiB"}))
    with pytest.raises(ConfigError, match="no memory setting fits"):
        planner.apply_best_plan(tiny, verbose=False)


def test_plan_command_prints_a_table(tmp_path, capsys):
    from fastvader.cli import main

    rc = main(["plan", "--gpu-memory", "2GiB", "--set", "backbone.random_init=true", "--set",
               f"train.output_dir={tmp_path}", "--set", "prompts.items=[a red ball]", "--set", "video.frames=4",
               "--set", "video.height=16", "--set", "video.width=16", "--set", "sampler.steps=4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "budget 2.0 GiB" in out and "checkpointing=" in out and "phase: backward" in out


def test_out_of_memory_message_says_what_to_change(tmp_path, monkeypatch):
    from fastvader.training.trainer import Trainer

    cfg, m = _plan_for(tmp_path)
    step = planner.predict(cfg, m, planner.Setting("step"))
    none = planner.predict(cfg, m, planner.Setting("none"))
    trainer = Trainer(cfg)
    trainer.cfg.memory.gpu_memory = f"{int((step.peak + none.peak) / 2 / planner.HEADROOM)}B"

    def boom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train_step", boom)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        trainer.train_step()
    text = str(info.value)
    assert "Tried to allocate 2.00 GiB" in text
    assert "It would change:" in text and "--set" in text
    advice = text.split("It would change:")[1]
    assert "memory.checkpointing=" in advice or "memory.offload_activations=true" in advice
    trainer.close()


@pytest.mark.slow
def test_modelscope_384x384x16_on_meta_within_15_percent(tmp_path):
    """Real size, no allocation: ModelScope 1.7B UNet3D + SD VAE from the shared configs at
    384x384x16, K=1, one decoded frame, sub-block checkpointing, bf16 activations. The planner's
    composed prediction vs saved_bytes of the same step built on the meta device."""
    from fastvader.memory import reference_models
    from fastvader.memory.checkpointing import enable_checkpointing
    from fastvader.memory.decode import decode_frames
    from fastvader.training.sampling import classifier_free_guidance

    try:
        reference_models.model_configs_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cfg = tiny_toy_config(tmp_path, backbone={"name": "modelscope_arch"},
                          video={"frames": 16, "height": 384, "width": 384},
                          sampler={"steps": 25, "guidance_scale": 9.0, "truncation": "last"},
                          frames={"reward": "random:1"}, lora={"rank": 16, "alpha": 16.0},
                          reward={"name": "brightness"}, train={"device": "auto", "precision": "auto"})
    m = planner.measure(cfg)
    pred = planner.predict(cfg, m)
    dtype = planner.activation_dtype(cfg)
    backbone, reward, _ = planner.build_on_meta(cfg, dtype)
    wrappers = enable_checkpointing(backbone.denoiser, "sub_block")
    scheduler = backbone.make_scheduler("ddim")
    scheduler.set_timesteps(25)
    t = int(scheduler.timesteps[-1])
    alpha = scheduler.alphas_cumprod[t]
    latents = torch.empty(1, 4, 16, 48, 48, device="meta", dtype=dtype)
    embeds = planner._meta_embeddings(backbone, 1, dtype)
    with record_saved([backbone, reward]) as log:
        eps = classifier_free_guidance(backbone, latents, t, embeds, 9.0)
        x0 = (latents - (1 - alpha).sqrt().to("meta") * eps) / alpha.sqrt().to("meta")  # DDIM's last step
        video = decode_frames(backbone.vae, x0, [5], [5])
        reward(video.float(), ["a prompt"])
    wrappers.revert()
    predicted = _kept_prediction(pred)
    assert log.total > 2 * 2 ** 30  # sub-block inputs of a CFG call at this size: GiBs, not MiBs
    assert abs(predicted - log.total) <= 0.15 * log.total, (predicted / 2 ** 30, log.total / 2 ** 30)
    assert 4 * 2 ** 30 < pred.peak < 24 * 2 ** 30
