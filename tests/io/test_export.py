"""Portable LoRA files: the diffusers layout loads in diffusers' own loader and in peft, and the
ComfyUI and kohya exports load back (inverse converters) to the exact same model output."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.helpers.trust import single_thread  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fastvader.cli import main as cli_main  # noqa: E402
from fastvader.io.export import export_lora, load_any_lora, read_any_lora  # noqa: E402
from fastvader.monitoring.guards import NonFiniteError  # noqa: E402
from fastvader.lora import add_lora, lora_metadata, save_lora  # noqa: E402
from fastvader.toy.model import ToyWorldConfig, build_toy_world  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 12.0  # alpha != rank, so a loader that drops alpha gets a different output


def fresh_unet():
    return build_toy_world(ToyWorldConfig(), seed=0).unet.eval()


def run_unet(unet):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([321]), encoder_hidden_states=ctx).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA with non-zero A and B (as after training) and the output of the in-memory model."""
    torch.manual_seed(0)
    unet = fresh_unet()
    add_lora(unet, RANK, ALPHA, target_modules=TARGETS, init_weights=False)
    meta = lora_metadata(RANK, ALPHA, TARGETS, base_model="toy-world", reward=json.dumps({"target_color": 1.0}),
                         steps=42)
    run = tmp_path_factory.mktemp("run")
    path = save_lora(unet, run / "lora.safetensors", meta)
    reference = run_unet(unet)
    assert not torch.allclose(reference, run_unet(fresh_unet()), atol=1e-4), "the LoRA must change the output"
    return path, reference


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_export_round_trips_to_the_same_model_output(trained, tmp_path, fmt):
    path, reference = trained
    out = export_lora(path, fmt, tmp_path / f"{fmt}.safetensors")
    unet = fresh_unet()
    info = load_any_lora(unet, out)
    assert info["format"] == fmt and info["rank"] == RANK and info["alpha"] == ALPHA
    torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)

    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["fastvader.base_model"] == "toy-world" and meta["fastvader.steps"] == "42"
    assert meta["fastvader.lora_rank"] == str(RANK) and meta["fastvader.lora_alpha"] == str(ALPHA)
    assert json.loads(meta["fastvader.target_modules"]) == TARGETS
    assert json.loads(meta["fastvader.reward"]) == {"target_color": 1.0}
    assert meta["fastvader.format"] == fmt
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = {
        "diffusers": [f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight"],
        "comfyui": [f"diffusion_model.{module}.lora_down.weight", f"diffusion_model.{module}.lora_up.weight",
                    f"diffusion_model.{module}.alpha"],
        "kohya": [f"lora_unet_{module.replace('.', '_')}.lora_down.weight",
                  f"lora_unet_{module.replace('.', '_')}.lora_up.weight", f"lora_unet_{module.replace('.', '_')}.alpha"],
    }[fmt]
    assert set(expected) <= set(keys)
    if fmt == "kohya":
        assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)


def test_kohya_files_without_fastvader_metadata_load_by_the_models_module_names(trained, tmp_path):
    path, reference = trained
    out = export_lora(path, "kohya", tmp_path / "kohya.safetensors")
    save_file(load_file(str(out)), str(tmp_path / "bare.safetensors"))  # as another tool would write it
    unet = fresh_unet()
    info = load_any_lora(unet, tmp_path / "bare.safetensors")
    assert info["alpha"] == ALPHA  # from the per-module .alpha tensors
    torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)


def test_diffusers_own_loader_reads_the_training_file(trained):
    """diffusers' LoRA loader (PeftAdapterMixin.load_lora_adapter, what load_lora_weights calls)
    reads the file written by training, alpha included. UNet3DConditionModel does not mix it in
    in diffusers 0.42, so the test adds the mixin to the instance's class."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    path, reference = trained
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    unet = fresh_unet()
    unet.__class__ = type("UNet3DWithAdapters", (PeftAdapterMixin, type(unet)), {})
    unet.load_lora_adapter(state, prefix="unet", metadata=meta)
    torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)


def test_peft_loads_the_training_file_after_stripping_the_prefix(trained):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    path, reference = trained
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    unet = fresh_unet()
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), unet)
    set_peft_model_state_dict(unet, state)
    torch.testing.assert_close(run_unet(unet), reference, rtol=0, atol=1e-6)


def test_cli_export_from_a_run_directory(trained, tmp_path, capsys):
    path, reference = trained
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    shutil.copy(path, run / "lora.safetensors")
    assert cli_main(["export", str(run), "--format", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert "comfyui layout" in capsys.readouterr().out
    _, info = read_any_lora(tmp_path / "c.safetensors")
    assert info["format"] == "comfyui" and info["modules"] == read_any_lora(path)[1]["modules"]
    assert cli_main(["export", str(tmp_path / "missing"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 2


def test_export_refuses_a_file_holding_nan(trained, tmp_path):
    path, _ = trained
    state = load_file(str(path))
    first = sorted(state)[0]
    state[first] = state[first].clone()
    state[first][0, 0] = float("nan")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(NonFiniteError, match="holds NaN/Inf"):
        export_lora(tmp_path / "nan.safetensors", "kohya", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
