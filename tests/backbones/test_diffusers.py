"""The diffusers-family backbones: ModelScope/ZeroScope, AnimateDiff, Wan 2.1.

Real configurations are built on the meta device and must report the published parameter
counts; tiny random configurations of the same classes run every adapter method and one VADER
training step on the CPU (gradients must reach the LoRA weights and nothing else); the loading
path is exercised on tiny pipelines saved to disk, including its error messages.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

from fastvader.backbones import available_backbones, backbone_class, build_backbone
from fastvader.backbones.diffusers_common import CheckpointMismatchError, MissingWeightsError
from fastvader.config import BackboneConfig, ConfigError, load_config
from fastvader.errors import HubUnreachableError
from tests.helpers.backbone_targets import check_strict_round_trip


FAMILIES = ["modelscope", "animatediff", "wan"]  # zeroscope shares modelscope's classes
# a video size each tiny model accepts: (frames, height, width)
TINY_SIZE = {"modelscope": (2, 32, 32), "zeroscope": (2, 32, 32), "animatediff": (2, 32, 32), "wan": (5, 32, 32)}
SAMPLER = {"modelscope": "ddim", "zeroscope": "ddim", "animatediff": "ddim", "wan": "euler_flow"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all small ops: a second intra-op thread only adds synchronisation, and on
    shared, busy cores it spins. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_TINY_CACHE: dict[str, object] = {}


def tiny(name: str):
    """A fresh tiny backbone (built once per family, then deep-copied: building costs ~0.3 s)."""
    import copy

    if name not in _TINY_CACHE:
        _TINY_CACHE[name] = build_backbone(BackboneConfig(name=name, random_init=True, dtype="fp32",
                                                          options={"tiny": True}))
    return copy.deepcopy(_TINY_CACHE[name])


# ---------------------------------------------------------------------------------------------
# real configurations on the meta device
# ---------------------------------------------------------------------------------------------
PUBLISHED = {
    "modelscope": {"unet": 1_411_233_860, "vae": 83_653_863, "text_encoder": 340_387_840},
    "zeroscope": {"unet": 1_411_233_860, "vae": 83_653_863, "text_encoder": 340_387_840},
    "animatediff": {"unet": 1_312_730_244, "vae": 83_653_863, "text_encoder": 123_060_480},
    "wan": {"transformer": 1_418_996_800, "vae": 126_892_531, "text_encoder": 5_680_910_336},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_config_builds_on_meta_with_published_counts(name):
    """From the configs packaged in fastvader.model_configs: no download, no folder outside."""
    info = backbone_class(name).describe()
    assert info["params"] == PUBLISHED[name]
    assert info["name"] == name
    assert info["prediction_type"] in ("epsilon", "v_prediction", "flow")
    assert set(info["defaults"]) >= {"frames", "height", "width", "steps", "guidance_scale", "sampler"}
    json.dumps(info)  # `fastvader models --json` prints it


@pytest.mark.slow
def test_packaged_configs_no_backbone_builds_yet_have_their_published_counts():
    """Wan 14B, CogVideoX-2b and the AnimateDiff motion adapter (SOURCES.md's computed counts)."""
    import diffusers

    from fastvader.model_configs import packaged_config

    def count(cls, relative):
        with torch.device("meta"):
            model = cls.from_config(json.loads(packaged_config(relative).read_text()))
        return sum(p.numel() for p in model.parameters())

    assert count(diffusers.WanTransformer3DModel, "wan2.1_t2v_14b/transformer_config.json") == 14_288_491_584
    assert count(diffusers.AutoencoderKLWan, "wan2.1_t2v_14b/vae_config.json") == 126_892_531
    assert count(diffusers.CogVideoXTransformer3DModel, "cogvideox_2b/transformer_config.json") == 1_693_783_872
    assert count(diffusers.AutoencoderKLCogVideoX, "cogvideox_2b/vae_config.json") == 215_583_907
    assert count(diffusers.MotionAdapter, "animatediff_v1-5-2/motion_adapter_config.json") == 453_209_280


def test_describe_reports_missing_configs_instead_of_failing(monkeypatch, tmp_path):
    import fastvader.model_configs

    monkeypatch.setattr(fastvader.model_configs, "ROOT", tmp_path)  # an installation without them
    info = backbone_class("wan").describe()
    assert info["params"] is None and "packaged model config" in info["params_note"]
    assert "transformer_config.json" in info["params_note"]


def test_registry_lists_the_diffusers_families():
    assert {"modelscope", "zeroscope", "animatediff", "wan"} <= set(available_backbones())


@pytest.mark.parametrize("name", ["zeroscope", "modelscope", "animatediff", "wan"])
def test_family_defaults_fit_the_family(name):
    cls = backbone_class(name)
    d = cls.defaults
    cls.check_video_size(d["frames"], d["height"], d["width"])  # the defaults themselves must fit
    expected = {"modelscope": (16, 384, 384, 25, 9.0), "zeroscope": (24, 320, 576, 25, 9.0),
                "animatediff": (16, 512, 512, 25, 7.5), "wan": (81, 480, 832, 50, 5.0)}[name]
    assert (d["frames"], d["height"], d["width"], d["steps"], d["guidance_scale"]) == expected


# ---------------------------------------------------------------------------------------------
# tiny backbones: every adapter method
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_encode_prompts_shapes_and_uncond(name):
    bb = tiny(name)
    emb = bb.encode_prompts(["a red ball", "a blue sky", "a red ball"])
    width = {"modelscope": 32, "animatediff": 32, "wan": 16}[name]
    assert emb.cond.shape == (3, bb.max_text_length, width)
    assert emb.uncond.shape == emb.cond.shape
    assert torch.equal(emb.cond[0], emb.cond[2]) and not torch.equal(emb.cond[0], emb.cond[1])
    assert torch.equal(emb.uncond[0], emb.uncond[1])  # one empty-prompt embedding for all rows
    assert not torch.equal(emb.uncond[0], emb.cond[0])
    assert bb.text_encoder.device.type == "cpu"


def test_wan_text_embeddings_are_zero_past_each_prompt():
    bb = tiny("wan")
    emb = bb.encode_prompts(["ab", "a much longer prompt"])
    _, mask = bb.tokenize(["ab"])
    n = int(mask.sum())
    assert n < bb.max_text_length
    assert emb.cond[0, n:].abs().sum() == 0 and emb.cond[0, :n].abs().sum() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_placeholder_embeddings_have_the_shapes_of_encoded_prompts(name):
    """What the memory planner conditions with on the meta device, without the text encoder."""
    bb = tiny(name)
    real = bb.encode_prompts(["a red ball", "a blue sky"])
    fake = bb.placeholder_embeddings(2, torch.bfloat16)
    assert fake.cond.shape == real.cond.shape and fake.uncond.shape == real.uncond.shape
    assert fake.cond.dtype == torch.bfloat16 and fake.cond.device == bb.device and not fake.extra


def test_text_encoder_stays_off_the_module_tree_and_can_be_freed():
    bb = tiny("wan")
    names = [n for n, _ in bb.named_parameters()]
    assert not any(n.startswith("text_encoder") for n in names)  # .to(cuda) never moves it
    bb.encode_prompts(["x"])
    bb.free_text_encoder()
    assert bb.text_encoder is None
    with pytest.raises(RuntimeError, match="freed"):
        bb.encode_prompts(["x"])


@pytest.mark.parametrize("name", FAMILIES)
def test_denoise_shape_and_batch_independence(name):
    """Output shaped like the latents, a scalar timestep acts as one per video, and each video sees
    its own text: a wrong per-frame repeat (e.g. AnimateDiff's context tiled instead of
    interleaved) would mix prompts across the batch."""
    bb = tiny(name)
    shape = bb.latent_shape(*TINY_SIZE[name])
    emb = bb.encode_prompts(["a red ball", "a blue sky"])
    x = torch.randn(2, *shape)
    with torch.no_grad():
        both = bb.denoise(x, torch.tensor([500.0, 500.0]), emb.cond)
        second = bb.denoise(x[1:], torch.tensor(500.0), emb.cond[1:])  # alone, scalar timestep
    assert both.shape == x.shape and both.dtype == x.dtype and torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_latent_shapes_and_size_errors():
    ms, ad, wan = tiny("modelscope"), tiny("animatediff"), tiny("wan")
    assert ms.latent_shape(16, 384, 384) == (4, 16, 48, 48)
    assert ms.latent_shape(24, 320, 576) == (4, 24, 40, 72)
    with pytest.raises(ValueError, match="multiple of 8"):
        ms.latent_shape(16, 380, 384)
    with pytest.raises(ValueError, match="at most 32"):
        ad.latent_shape(40, 64, 64)
    assert wan.latent_shape(81, 480, 832) == (4, 21, 60, 104)
    with pytest.raises(ValueError, match=r"4k\+1 \(try 81\)"):
        wan.latent_shape(80, 480, 832)
    with pytest.raises(ValueError, match="multiple of 16"):
        wan.latent_shape(81, 488, 832)
    assert wan.num_video_frames(21) == 81


def test_config_validation_uses_the_family_size_rules():
    with pytest.raises(ConfigError, match="4k\\+1"):
        load_config(REPO / "configs" / "tiny_wan.yaml", ["video.frames=4"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(REPO / "configs" / "tiny_modelscope.yaml", ["video.height=36"])


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_selected_frames_matches_full_decode(name):
    bb = tiny(name)
    frames = TINY_SIZE[name][0]
    x = torch.randn(1, *bb.latent_shape(frames, 16, 16))
    with torch.no_grad():
        full = bb.decode_latents(x)
        some = bb.decode_latents(x, [1])
    assert full.shape == (1, frames, 3, 16, 16) and some.shape == (1, 1, 3, 16, 16)
    assert 0 <= full.min() and full.max() <= 1
    torch.testing.assert_close(some[:, 0], full[:, 1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        bb.decode_latents(x, [frames])

    # the loop's decode: same pixels, gradients only through the frames that carry them
    x.requires_grad_(True)
    mixed = bb.decode_frames(x, [0, 1], grad_frames=[1])
    torch.testing.assert_close(mixed.detach(), full[:, :2], atol=1e-5, rtol=1e-4)
    (g_no_grad_frame,) = torch.autograd.grad(mixed[:, 0].sum(), x, retain_graph=True)
    (g_grad_frame,) = torch.autograd.grad(mixed[:, 1].sum(), x)
    assert g_no_grad_frame.abs().sum() == 0 and g_grad_frame.abs().sum() > 0


def last_step_sensitivity(sched, steps: int) -> float:
    """How much the final sample moves when the last prediction changes by 1."""
    finals = []
    for last_prediction in (0.0, 1.0):
        sched.set_timesteps(steps)
        x = torch.ones(1, 4)
        for i, t in enumerate(sched.timesteps):
            pred = torch.full((1, 4), last_prediction if i == steps - 1 else 0.0)
            x = sched.step(pred, t, x).prev_sample
        finals.append(x)
    return float((finals[0] - finals[1]).abs().max())


def test_schedulers_carry_the_family_noise_schedule():
    ms = tiny("modelscope").make_scheduler("ddim")
    assert ms.config.beta_schedule == "scaled_linear" and ms.config.prediction_type == "epsilon"
    ad = tiny("animatediff").make_scheduler("ddim")
    assert ad.config.beta_schedule == "linear"  # AnimateDiff's motion modules trained on linear betas
    wan = tiny("wan").make_scheduler("euler_flow")
    assert type(wan).__name__ == "FlowMatchEulerDiscreteScheduler" and wan.config.shift == 3.0
    # the step that carries VADER's gradients must depend on the prediction (a DDIM update that
    # ends on t=0 with set_alpha_to_one=False is the identity and would pass no gradient)
    for name, sampler in SAMPLER.items():
        sched = tiny(name).make_scheduler(sampler)
        for steps in (2, 25):
            assert last_step_sensitivity(sched, steps) > 1e-3, (name, steps)
    with pytest.raises(ValueError, match="euler_flow"):
        tiny("wan").make_scheduler("ddim")
    with pytest.raises(ValueError, match="ddim"):
        tiny("modelscope").make_scheduler("euler_flow")


# ---------------------------------------------------------------------------------------------
# one VADER training step
# ---------------------------------------------------------------------------------------------
def vader_step(bb, sampler: str, size, steps: int = 2, guidance: float = 5.0):
    """CFG sampling, gradients on the last step only, decode one frame, target_color, backward."""
    from peft import LoraConfig, inject_adapter_in_model

    from fastvader.rewards.toy import TargetColorReward

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=bb.default_lora_targets), bb.denoiser)
    bb.requires_grad_(False)
    lora = {n: p for n, p in bb.named_parameters() if "lora_" in n}
    assert lora, "the default LoRA targets matched nothing"
    for p in lora.values():
        p.requires_grad_(True)

    emb = bb.encode_prompts(["a red ball"])
    sched = bb.make_scheduler(sampler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *bb.latent_shape(*size), generator=gen)
    context = torch.cat([emb.uncond, emb.cond])
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i == len(sched.timesteps) - 1):
            uncond, cond = bb.denoise(torch.cat([x, x]), t.expand(2), context).chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    video = bb.decode_frames(x, [size[0] - 1])
    loss = -TargetColorReward("red")(video, ["a red ball"]).mean()
    loss.backward()
    return loss, lora


@pytest.mark.parametrize("name", FAMILIES)
def test_one_training_step_reaches_lora_only(name):
    bb = tiny(name)
    loss, lora = vader_step(bb, SAMPLER[name], TINY_SIZE[name])
    assert torch.isfinite(loss)
    with_grad = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(lora), sorted(with_grad - set(lora))[:5]
    # peft starts B at zero, so the signal arrives in the B factors
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for p in bb.vae.parameters())


@pytest.mark.parametrize("name", ["modelscope", "animatediff", "wan"])
def test_training_step_through_the_real_loop(name, tmp_path):
    """The real loop (Trainer.train_step) with each tiny preset: finite loss, LoRA-only grads."""
    from fastvader.training import trainer as train_loop

    cfg = load_config(REPO / "configs" / f"tiny_{name}.yaml", ["train.steps=1", f"train.output_dir={tmp_path}"])
    trainer = train_loop.Trainer(cfg)
    metrics = trainer.train_step()
    metrics = metrics if isinstance(metrics, dict) else metrics.as_dict()
    assert torch.isfinite(torch.tensor(float(metrics["loss"])))
    assert float(metrics["grad_norm"]) > 0
    for n, p in trainer.backbone.named_parameters():
        assert p.grad is None or "lora_" in n, n


# ---------------------------------------------------------------------------------------------
# loading from a folder, and its errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_folder_round_trip_and_errors(name, tmp_path):
    check_strict_round_trip(tiny(name), name, tmp_path, lambda bb: (bb.encode_prompts(["a cat"]).cond,))


def test_checkpoint_of_another_shape_names_the_key(tmp_path):
    bb = tiny("modelscope")
    bb.save_pretrained(tmp_path)
    cfg_file = tmp_path / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 16  # a UNet for another text encoder
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"attn2.to_k.weight: checkpoint \[16, 32\] vs model \[16, 16\]"):
        build_backbone(BackboneConfig(name="modelscope", pretrained=str(tmp_path), dtype="fp32"))
    cfg["cross_attention_dim"] = 32
    cfg_file.write_text(json.dumps(cfg))
    te_file = tmp_path / "text_encoder" / "config.json"  # the transformers side says the same
    te = json.loads(te_file.read_text())
    te["intermediate_size"] = 48
    te_file.write_text(json.dumps(te))
    with pytest.raises(CheckpointMismatchError, match=r"mlp.fc1.bias: checkpoint \[64\] vs model \[48\]"):
        build_backbone(BackboneConfig(name="modelscope", pretrained=str(tmp_path), dtype="fp32"))


def test_missing_local_folder_and_unreachable_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # answer at once, no network
    with pytest.raises(MissingWeightsError, match="not a folder"):
        build_backbone(BackboneConfig(name="wan", pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(HubUnreachableError, match="backbone.pretrained='fastvader-test/absent': HF_HUB_OFFLINE is set, "
                                                  "and the model is not in the local Hugging Face cache; pass a local "
                                                  "folder as backbone.pretrained"):
        build_backbone(BackboneConfig(name="modelscope", pretrained="fastvader-test/absent"))


def test_animatediff_from_sd15_unet_plus_motion_adapter(tmp_path):
    """The usual way in: an SD1.5 pipeline folder + a MotionAdapter, merged by from_unet2d."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    from fastvader.backbones.animatediff import TINY_UNET

    ref = tiny("animatediff")
    ref.save_pretrained(tmp_path / "sd")
    unet2d = UNet2DConditionModel(sample_size=4, block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                  cross_attention_dim=TINY_UNET["cross_attention_dim"], attention_head_dim=2)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)
    import shutil

    shutil.rmtree(tmp_path / "sd" / "unet")
    unet2d.save_pretrained(tmp_path / "sd" / "unet")
    adapter.save_pretrained(tmp_path / "adapter")
    bb = build_backbone(BackboneConfig(name="animatediff", pretrained=str(tmp_path / "sd"), dtype="fp32",
                                       options={"motion_adapter": str(tmp_path / "adapter")}))
    assert type(bb.denoiser).__name__ == "UNetMotionModel"
    # the spatial weights are SD's, the temporal ones the adapter's
    torch.testing.assert_close(bb.denoiser.conv_in.weight, unet2d.conv_in.weight)
    torch.testing.assert_close(bb.denoiser.down_blocks[0].motion_modules[0].proj_in.weight,
                               adapter.down_blocks[0].motion_modules[0].proj_in.weight)
    assert bb.make_scheduler("ddim").config.beta_schedule == "linear"
    with pytest.raises(MissingWeightsError, match="motion adapter"):
        build_backbone(BackboneConfig(name="animatediff", pretrained=str(tmp_path / "sd"), dtype="fp32",
                                      options={"motion_adapter": str(tmp_path / "no-adapter")}))


def test_random_init_from_a_config_folder(tmp_path):
    """random_init builds whatever config_path holds (here a tiny modelscope written as JSON)."""
    from fastvader.backbones import modelscope

    (tmp_path / "unet_config.json").write_text(json.dumps(modelscope.TINY_UNET))
    (tmp_path / "vae_config.json").write_text(json.dumps(modelscope.TINY_SD_VAE))
    (tmp_path / "text_encoder_config.json").write_text(json.dumps({**modelscope.TINY_TEXT, "vocab_size": 600}))
    bb = build_backbone(BackboneConfig(name="modelscope", random_init=True, config_path=str(tmp_path), dtype="fp32"))
    assert bb.text_encoder.config.vocab_size == 600
    assert bb.encode_prompts(["a"]).cond.shape[-1] == modelscope.TINY_TEXT["hidden_size"]
    (tmp_path / "vae_config.json").unlink()
    with pytest.raises(MissingWeightsError, match="vae_config.json"):
        build_backbone(BackboneConfig(name="modelscope", random_init=True, config_path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["modelscope", "zeroscope", "animatediff", "wan"])
def test_presets_hold_the_family_defaults(name):
    full = load_config(REPO / "configs" / f"{name}.yaml")
    d = backbone_class(name).defaults
    assert full.backbone.name == name and not full.backbone.random_init
    assert (full.video.frames, full.video.height, full.video.width) == (d["frames"], d["height"], d["width"])
    assert (full.sampler.name, full.sampler.steps, full.sampler.guidance_scale) == (d["sampler"], d["steps"], d["guidance_scale"])
    assert full.reward.name == "aesthetic"
    tiny_cfg = load_config(REPO / "configs" / f"tiny_{name}.yaml")  # validates fully
    assert tiny_cfg.backbone.options.get("tiny") is True and tiny_cfg.sampler.steps == 2
