"""The planner: predictions checked against saved_bytes of the real step (toy on the CPU, and
ModelScope 1.7B at 384x384x16 on the meta device), fastest-first plans with the 8-bit optimizer,
applying the best plan, the `fastvader plan` command on every shipped preset (no weights, no
network), and the out-of-memory message."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import dataclasses  # noqa: E402

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


def _measurements(lora_sizes: list[int]) -> planner.Measurements:
    """Synthetic figures: a big LoRA whose optimizer state decides what fits."""
    per_policy = {policy: 2 ** 20 for policy in planner.POLICIES}
    return planner.Measurements(
        call_kept=per_policy, call_forward_peak=per_policy, unit_peak={"block": 2 ** 20, "sub_block": 2 ** 20},
        nograd_working=2 ** 20, latent_bytes=2 ** 10, decode_kept_first=0, decode_kept_per_frame=0,
        decode_recompute=0, reward_kept_per_frame=0, reward_fixed=0, scheduler_fixed=0,
        params={"denoiser": 0, "lora": sum(lora_sizes), "vae": 0, "reward": 0, "text_encoder": 0},
        lora_tensor_sizes=lora_sizes)


def test_plans_rank_the_8bit_optimizer_and_pick_it_when_only_it_fits(tmp_path):
    cfg = tiny_toy_config(tmp_path)
    n = 2 ** 24  # one LoRA tensor of 16M weights: AdamW keeps 8 bytes a weight, AdamW8bit ~2
    m = _measurements([n, 100])  # tensors under 4096 weights stay 32-bit in bitsandbytes
    adamw = planner.predict(cfg, m, planner.Setting(optimizer="adamw"))
    eight = planner.predict(cfg, m, planner.Setting(optimizer="adamw8bit"))
    assert adamw.parts["lora + grads + optimizer"] == 8 * (n + 100) + 8 * (n + 100)
    assert eight.parts["lora + grads + optimizer"] == 8 * (n + 100) + 2 * n + 8 * (n // 256) + 8 * 100
    assert {s.optimizer for s in planner.candidate_settings(cfg)} == {"adamw", "adamw8bit"}
    budget = int((adamw.peak + eight.peak) / 2 / planner.HEADROOM)
    plan = planner.make_plan(cfg, budget, m)
    assert plan.best.setting.optimizer == "adamw8bit" and plan.ranked
    assert all(p.setting.optimizer == "adamw8bit" for p in plan.ranked)
    # DeepSpeed ZeRO refuses bitsandbytes optimizers: never proposed there
    zero = cfg.replace(memory=type(cfg.memory)(**{**cfg.memory.__dict__, "zero_stage": 2}))
    assert {s.optimizer for s in planner.candidate_settings(zero)} == {"adamw"}


def test_live_peak_counts_what_checkpointing_recomputes_in_backward():
    """Non-reentrant checkpointing keeps recomputed activations as detach() aliases: they are
    alive until backward uses them, and the peak must count them."""
    w = torch.empty(1024, 1024, device="meta")
    x = torch.empty(1024, 1024, device="meta", requires_grad=True)

    def ten_layers(a):
        for _ in range(10):
            a = (a @ w).relu()
        return a

    out = torch.utils.checkpoint.checkpoint(ten_layers, x, use_reentrant=False)
    with planner.LivePeak() as live:
        out.sum().backward()
    assert live.peak >= 10 * 4 * 2 ** 20  # the ten recomputed relu outputs, 4 MiB each
    with planner.LivePeak() as live:
        y = x.detach()  # an alias of a storage from before the block is not new memory
        z = x * 2
    assert live.peak == 4 * 2 ** 20 and y.shape == z.shape


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
    """Real size, no allocation: ModelScope 1.7B UNet3D + SD VAE from the packaged configs at
    384x384x16, K=1, one decoded frame, sub-block checkpointing, bf16 activations. The planner's
    composed prediction vs saved_bytes of the same step built on the meta device."""
    from fastvader.memory import reference_models  # noqa: F401  (registers modelscope_arch)
    from fastvader.memory.checkpointing import enable_checkpointing
    from fastvader.memory.decode import decode_frames
    from fastvader.training.sampling import classifier_free_guidance

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
    embeds = backbone.placeholder_embeddings(1, dtype)
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


def _forbid_downloads(monkeypatch):
    """Any hub download or from_pretrained fails: the planner must need neither."""
    import diffusers
    import huggingface_hub
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the planner tried to load weights or reach the hub")

    for owner, name in ((huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download")):
        monkeypatch.setattr(owner, name, refuse)
    for cls in (transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, diffusers.ModelMixin):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


PRESETS = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
FAST_PRESETS = {"demo.yaml", "opensora_tiny.yaml", "tiny_wan.yaml", "videocrafter2_tiny.yaml"}


@pytest.mark.parametrize("preset", [p if p in FAST_PRESETS else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS])
def test_every_shipped_preset_plans_for_24gib_without_weights_or_network(preset, monkeypatch, capsys):
    """`fastvader plan --config configs/<preset>.yaml --gpu-memory 24GiB` as shipped: real
    architectures from the packaged configs on the meta device (hub ids and weight options in the
    preset are not touched), and every preset fits one 24 GB card."""
    from fastvader.cli import main

    _forbid_downloads(monkeypatch)
    config = Path(__file__).resolve().parents[2] / "configs" / preset
    rc = main(["plan", "--config", str(config), "--gpu-memory", "24GiB"])
    out = capsys.readouterr().out
    assert out.startswith("budget 24.0 GiB") and "phase: backward" in out, out
    assert rc == 0 and ", fits" in out.splitlines()[0], out


@pytest.fixture(scope="module")
def wan_configs(tmp_path_factory) -> Path:
    """A Wan whose blocks' weights outweigh its activations at 32x32x5: 4 blocks of width 128
    (one folder for the module: the measurement cache keys on it)."""
    import json

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TEXT, TINY_TRANSFORMER, TINY_VAE

    transformer = {**TINY_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 1024,
                   "num_layers": 4}
    with torch.device("meta"):
        configs = {"transformer": dict(WanTransformer3DModel(**transformer).config),
                   "vae": dict(AutoencoderKLWan(**TINY_VAE).config), "text_encoder": TINY_TEXT}
    folder = tmp_path_factory.mktemp("wan_configs")
    for name, config in configs.items():
        (folder / f"{name}_config.json").write_text(json.dumps(config, default=list))
    return folder


def test_fp8_and_block_swap_predictions_match_meta_measurements(tmp_path, wan_configs):
    """fp8 bytes: the planner's count vs the bytes the converted model holds on the meta device.
    Block swap: the host bytes, and the no-grad call's live peak with 3 of 4 blocks swapped
    (their copies made on the meta device) vs the working set plus the blocks in flight."""
    from fastvader.memory.accounting import gpu_like_attention
    from fastvader.memory.block_swap import BlockSwap, last_blocks, transformer_blocks
    from fastvader.training.sampling import classifier_free_guidance

    cfg = tiny_toy_config(tmp_path, backbone={"name": "wan", "config_path": str(wan_configs)},
                          video={"frames": 5, "height": 32, "width": 32}, sampler={"name": "euler_flow"},
                          memory={"fp8_weights": True, "checkpointing": "sub_block"}, reward={"name": "brightness"})
    m = planner.measure(cfg, device_type="cpu")
    backbone, _, lora = planner.build_on_meta(cfg, torch.float32)
    trainable = {id(p) for p in lora}
    held = sum(p.numel() * p.element_size() for p in backbone.denoiser.parameters() if id(p) not in trainable)
    assert planner.frozen_weight_parts(m, 0, 4)["resident"] == held
    assert sum(c[1] for c in m.blocks) > held / 2  # most of it is fp8 at one byte a weight

    latents = torch.empty(1, *backbone.latent_shape(5, 32, 32), device="meta")
    embeds = backbone.placeholder_embeddings(1, torch.float32)

    def live_peak() -> int:
        with gpu_like_attention(), torch.no_grad(), planner.LivePeak() as live:
            classifier_free_guidance(backbone, latents, 500, embeds, cfg.sampler.guidance_scale)
        return live.peak

    resident = live_peak()
    swap = BlockSwap(transformer_blocks(backbone.denoiser), last_blocks(4, 3), host="meta")
    swapped = live_peak()
    parts = planner.frozen_weight_parts(m, 3, 4)
    assert swap.host_bytes == parts["swapped"] and parts["in flight"] == 2 * parts["swapped"] // 3
    swap.revert()
    assert abs(resident - m.nograd_working) <= 0.01 * resident
    assert abs((swapped - resident) - parts["in flight"]) <= 0.1 * parts["in flight"], (swapped - resident, parts)


def test_block_swap_auto_picks_the_fewest_blocks_that_fit(tmp_path, wan_configs):
    cfg = tiny_toy_config(tmp_path, backbone={"name": "wan", "config_path": str(wan_configs)},
                          video={"frames": 5, "height": 32, "width": 32}, sampler={"name": "euler_flow"},
                          memory={"fp8_weights": True, "checkpointing": "sub_block", "block_swap": "auto",
                                  "gpu_memory": "1GiB"}, reward={"name": "brightness"})  # measured once above
    m = planner.measure(cfg, device_type="cpu")
    peaks = [planner.predict(cfg, m, planner.Setting(block_swap=n)).peak for n in range(5)]
    # swapping lowers the peak once more blocks are swapped than the two in flight
    assert peaks == sorted(peaks, reverse=True) and peaks[3] < peaks[2] and peaks[4] < peaks[3]
    budget = int((peaks[2] + peaks[3]) / 2 / planner.HEADROOM)  # as given: fits with 3 blocks swapped, not with 2
    plan = planner.make_plan(cfg, budget, m)
    assert plan.current.setting.block_swap == 3 and plan.current.fits(budget)
    # a budget that no setting meets without swapping: the best plan swaps, as few blocks as it can
    unswapped = min(planner.predict(cfg, m, s).peak for s in planner.candidate_settings(cfg, m) if not s.block_swap)
    budget = int((unswapped - 2 ** 18) / planner.HEADROOM)
    plan = planner.make_plan(cfg, budget, m)
    best = plan.best.setting
    assert best.block_swap > 0 and f"memory.block_swap={best.block_swap}" in best.overrides()
    assert not planner.predict(cfg, m, dataclasses.replace(best, block_swap=best.block_swap - 1)).fits(budget)
    assert any(note.startswith(f"block swap: memory.block_swap={best.block_swap} of 4 blocks") for note in plan.notes)
    resolved = planner.apply_best_plan(cfg.replace(memory=dataclasses.replace(cfg.memory, gpu_memory=f"{budget}B")),
                                       verbose=False)
    assert resolved.memory.block_swap == best.block_swap


def test_fp8_and_block_swap_on_a_unet_say_they_cannot_engage(tmp_path):
    """The plan notes it, and the Trainer (FrozenWeights, before the model moves) refuses."""
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(tmp_path, memory={"block_swap": 2, "fp8_weights": True})
    plan = planner.make_plan(cfg, "1GiB", planner.measure(cfg, device_type="cpu"))
    assert plan.notes == ["memory.fp8_weights=True, memory.block_swap=2 cannot engage: the denoiser has no "
                          "repeated transformer blocks"]
    with pytest.raises(ConfigError, match="cannot engage"):
        Trainer(cfg)


def test_x0_truncation_plans_one_gradient_call_and_a_chain_that_stops_early():
    from fastvader.config import load_config
    from fastvader.memory.planner import denoiser_calls

    cfg = lambda spec: load_config(None, ["sampler.steps=20", f"sampler.truncation={spec}", "prompts.items=[a cat]"])  # noqa: E731
    assert denoiser_calls(cfg("x0:6-12")) == (14, 1)  # the longest chain: 14 no-grad steps, then the gradient call
    assert denoiser_calls(cfg("specific:3")) == (17, 3)
    assert denoiser_calls(cfg("range:2-5")) == (15, 5)
