"""Portable LoRA files. Each export is checked against the tool that reads it, where that tool's
reader is installed (diffusers' own converters of ComfyUI/musubi Wan files and of kohya SD
files) or documented (AnimateDiff-Evolved's motion-LoRA key rule), and read back by fastvader to
the same adapters; families a tool does not load are refused without writing anything."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat

from tests.helpers.trust import single_thread  # noqa: F401  (also drops the repo root from sys.path)
from tests.helpers.snapshot import assert_restored, model_state  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fastvader.cli import main as cli_main  # noqa: E402
from fastvader.errors import LoraFileError  # noqa: E402
from fastvader.io.export import export_lora  # noqa: E402
from fastvader.lora import add_lora, inject, lora_metadata, lora_state_dict, read_lora_file, save_lora  # noqa: E402
from fastvader.monitoring.guards import NonFiniteError  # noqa: E402
from fastvader.toy.model import ToyWorldConfig, build_toy_world  # noqa: E402

RANK, ALPHA = 4, 12.0  # alpha != rank, so a loader that drops alpha gets a different output
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def toy_unet():
    return build_toy_world(ToyWorldConfig(), seed=0).unet.eval()


def motion_unet():
    from diffusers import UNetMotionModel

    from fastvader.backbones.animatediff import TINY_UNET

    torch.manual_seed(0)
    return UNetMotionModel(**TINY_UNET).eval()


def wan_transformer():
    from diffusers import WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TRANSFORMER

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_TRANSFORMER).eval()


def run_unet(unet):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([321]), encoder_hidden_states=ctx).sample


def trained_file(model, family: str, targets: list[str], path) -> str:
    """A LoRA with non-zero A and B (as after training), written as training writes it."""
    torch.manual_seed(1)
    add_lora(model, RANK, ALPHA, target_modules=targets, init_weights=False)
    meta = lora_metadata(RANK, ALPHA, targets, backbone=family, base_model=f"{family}-tiny",
                         reward=json.dumps({"target_color": 1.0}), steps=42)
    return save_lora(model, path, meta)


def products(peft: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A: what a LoRA adds to the module's weight."""
    modules = {k.rsplit(".lora_", 1)[0] for k in peft}
    return {m: scale * peft[f"{m}.lora_B.weight"].float() @ peft[f"{m}.lora_A.weight"].float() for m in modules}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    unet = toy_unet()
    path = trained_file(unet, "toy", ATTENTION, tmp_path_factory.mktemp("toy") / "lora.safetensors")
    reference = run_unet(unet)
    assert not torch.allclose(reference, run_unet(toy_unet()), atol=1e-4), "the LoRA must change the output"
    return path, reference


# ---------------------------------------------------------------------------------------------
# the UNet3DConditionModel families: diffusers layout only, loaded by fastvader.load_lora
# ---------------------------------------------------------------------------------------------
def test_the_training_file_and_its_diffusers_export_load_back_to_the_same_output(toy, tmp_path):
    path, reference = toy
    out = export_lora(path, "diffusers", tmp_path / "d.safetensors")
    for file in (path, out):
        unet = toy_unet()
        lora = read_lora_file(file, [n for n, _ in unet.named_modules()], "toy")
        inject(unet, lora)
        assert (lora.rank, lora.alpha, lora.steps, lora.family) == (RANK, ALPHA, 42, "toy")
        torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA
    assert meta["fastvader.base_model"] == "toy-tiny" and meta["fastvader.reward"] == '{"target_color": 1.0}'


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_tools_without_a_loader_for_the_family_are_refused_and_nothing_is_written(toy, tmp_path, fmt):
    path, _ = toy
    with pytest.raises(LoraFileError, match=rf"{fmt} has no loader for toy models.*formats that load it: \['diffusers'\]"):
        export_lora(path, fmt, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_fastvader_load_lora_loads_into_a_unet3d_pipeline_and_remove_restores_it_exactly(toy):
    """UNet3DConditionModel lacks PeftAdapterMixin, so its pipelines' load_lora_weights fails;
    fastvader.load_lora loads the file, frozen, and remove() puts back every original object."""
    import fastvader

    path, reference = toy
    unet = toy_unet()
    untouched = run_unet(unet)
    snapshot = model_state(unet)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    pipe = type("Pipeline", (), {"unet": unet})()  # what matters of a TextToVideoSDPipeline
    loaded = fastvader.load_lora(pipe, path)
    assert loaded.info["rank"] == RANK and f"rank {RANK}" in repr(loaded)
    torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
    loaded.remove()
    assert_restored(unet, snapshot)
    assert "peft_config" not in unet.__dict__
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    torch.testing.assert_close(run_unet(unet), untouched, rtol=0, atol=0)


def test_the_cli_exports_a_run_directory_and_refuses_to_overwrite_its_source(toy, tmp_path, capsys):
    path, _ = toy
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    shutil.copy(path, run / "lora.safetensors")
    assert cli_main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "d.safetensors")]) == 0
    assert "diffusers layout" in capsys.readouterr().out
    before = (run / "lora.safetensors").read_bytes()
    assert cli_main(["export", str(run), "--format", "diffusers", "--out", str(run / "lora.safetensors")]) == 2
    assert "is the LoRA being exported" in capsys.readouterr().err
    assert cli_main(["export", str(run), "--format", "diffusers", "--out", str(run)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert (run / "lora.safetensors").read_bytes() == before
    assert cli_main(["export", str(tmp_path / "missing"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 2


def test_lora_files_are_written_with_the_users_permissions(toy, tmp_path):
    path, _ = toy
    umask = os.umask(0o022)
    try:
        out = export_lora(path, "diffusers", tmp_path / "d.safetensors")
    finally:
        os.umask(umask)
    for file in (path, out):
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o644, file


def test_a_truncated_file_is_refused_by_name(toy, tmp_path):
    path, _ = toy
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors cannot be read as a safetensors file.*truncated"):
        read_lora_file(cut)


def test_export_refuses_a_file_holding_nan(toy, tmp_path):
    path, _ = toy
    state = load_file(str(path))
    first = sorted(state)[0]
    state[first] = state[first].clone()
    state[first][0, 0] = float("nan")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(NonFiniteError, match="holds NaN/Inf"):
        export_lora(tmp_path / "nan.safetensors", "diffusers", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# AnimateDiff: kohya names for the image model, AnimateDiff-Evolved's motion-LoRA names
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def animatediff(tmp_path_factory):
    unet = motion_unet()
    path = trained_file(unet, "animatediff", ATTENTION, tmp_path_factory.mktemp("ad") / "lora.safetensors")
    return path, lora_state_dict(unet), [n for n, _ in motion_unet().named_modules()]


def ade_model_key(key: str) -> str:
    """AnimateDiff-Evolved's load_motion_lora_as_patches: a motion-LoRA down key -> the key of
    the motion model's weight it patches."""
    return (key.replace("processor.", "").replace("_lora", "").replace("down.", "").replace("up.", "")
            .replace("to_out.", "to_out.0."))


def diffusers_motion_name(original: str) -> str:
    """diffusers' AnimateDiff motion-module conversion: original name -> UNetMotionModel name."""
    return original.replace(".temporal_transformer", "").replace(".attention_blocks.0", ".attn1").replace(
        ".attention_blocks.1", ".attn2")


def test_animatediff_comfyui_export_names_each_part_as_its_comfyui_loader_reads_it(animatediff, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    path, peft, names = animatediff
    state = load_file(str(export_lora(path, "comfyui", tmp_path / "c.safetensors")))
    motion = {k: v for k, v in state.items() if "temporal" in k}  # what the motion-LoRA node keeps
    image = {k: v for k, v in state.items() if "temporal" not in k}
    expected = products(peft, ALPHA / RANK)
    # the image model: diffusers' kohya (SD1.x) converter names the modules the file adapts
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(image))
    image_peft = {k.removeprefix("unet."): v for k, v in convert_unet_state_dict_to_peft(converted).items()}
    assert set(alphas.values()) == {ALPHA}
    image_modules = {k.rsplit(".lora_", 1)[0] for k in image_peft}
    assert image_modules and not any(".motion_modules." in m for m in image_modules)
    for module, delta in products(image_peft, ALPHA / RANK).items():
        torch.testing.assert_close(delta, expected[module])
    # the motion modules: AnimateDiff-Evolved applies up @ down (alpha folded in) to the weight
    # its key rule names; diffusers' motion-module conversion maps that weight to our module
    downs = [k for k in motion if k.endswith("_lora.down.weight")]
    assert len(downs) == sum(".motion_modules." in m for m in expected)
    for down in downs:
        weight = ade_model_key(down)
        assert weight.endswith(".weight") and ".temporal_transformer.transformer_blocks." in weight
        module = diffusers_motion_name(weight.removesuffix(".weight"))
        delta = motion[down.replace(".down.", ".up.")].float() @ motion[down].float()
        torch.testing.assert_close(delta, expected[module])


def test_animatediff_exports_read_back_to_the_same_adapters(animatediff, tmp_path):
    path, peft, names = animatediff
    out = export_lora(path, "comfyui", tmp_path / "c.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))  # as another tool would write it: no metadata
    for file in (out, bare):
        lora = read_lora_file(file, names, "animatediff")
        assert (lora.rank, lora.alpha) == (RANK, ALPHA) and lora.format == "comfyui"
        for module, delta in products(lora.state).items():
            torch.testing.assert_close(delta, products(peft)[module])


def test_kohya_has_no_motion_modules_so_an_animatediff_lora_on_them_is_refused(animatediff, tmp_path):
    path, _, _ = animatediff
    with pytest.raises(LoraFileError, match=r"kohya has no name for \d+ of its \d+ adapted modules.*motion_modules"):
        export_lora(path, "kohya", tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Wan: the original Wan names, for ComfyUI (diffusion_model.) and musubi-tuner (lora_unet_)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    model = wan_transformer()
    path = trained_file(model, "wan", ATTENTION + ["net.0.proj", "net.2"], tmp_path_factory.mktemp("wan") / "l.safetensors")
    return path, lora_state_dict(model), [n for n, _ in wan_transformer().named_modules()]


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_wan_exports_are_read_by_diffusers_own_converters_of_those_layouts(wan, tmp_path, fmt):
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    path, peft, names = wan
    state = load_file(str(export_lora(path, fmt, tmp_path / f"{fmt}.safetensors")))
    prefix = {"comfyui": "diffusion_model.blocks.0.self_attn.q.", "kohya": "lora_unet_blocks_0_self_attn_q."}[fmt]
    assert f"{prefix}lora_down.weight" in state and f"{prefix}alpha" in state
    convert = {"comfyui": _convert_non_diffusers_wan_lora_to_diffusers, "kohya": _convert_musubi_wan_lora_to_diffusers}
    converted = {k.removeprefix("transformer."): v for k, v in convert[fmt](dict(state)).items()}
    got = products(converted)  # diffusers folds alpha/rank into the factors
    expected = products(peft, ALPHA / RANK)
    assert got.keys() == expected.keys()
    for module in expected:
        torch.testing.assert_close(got[module], expected[module])
    lora = read_lora_file(tmp_path / f"{fmt}.safetensors", names, "wan")
    assert (lora.rank, lora.alpha, sorted(lora.modules)) == (RANK, ALPHA, sorted(products(peft)))


def test_wan_diffusers_export_uses_the_transformer_prefix(wan, tmp_path):
    path, _, _ = wan
    keys = load_file(str(export_lora(path, "diffusers", tmp_path / "d.safetensors"))).keys()
    assert all(re.match(r"^transformer\.blocks\.\d+\.", k) for k in keys)


def test_diffusers_pipelines_own_loaders_read_the_animatediff_and_wan_files(animatediff, wan, tmp_path):
    """What AnimateDiffPipeline.load_lora_weights and WanPipeline.load_lora_weights do with a
    file: the pipeline mixin's lora_state_dict, then the model's load_lora_adapter."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, WanLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    def sd_state(path):  # (state, network alphas, metadata)
        state, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        return state, meta

    def wan_state(path):  # (state, metadata)
        return WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)

    cases = [(animatediff[0], sd_state, motion_unet(), "unet", animatediff[1]),
             (export_lora(wan[0], "diffusers", tmp_path / "w.safetensors"), wan_state, wan_transformer(),
              "transformer", wan[1])]
    for path, read, model, prefix, peft in cases:
        state, meta = read(path)
        model.load_lora_adapter(state, prefix=prefix, metadata=meta)
        loaded = get_peft_model_state_dict(model, adapter_name="default_0")
        got, expected = products(loaded), products(peft)
        assert got.keys() == expected.keys()
        scale = model.peft_config["default_0"].lora_alpha / model.peft_config["default_0"].r
        assert scale == ALPHA / RANK
        for module in expected:
            torch.testing.assert_close(got[module], expected[module])
