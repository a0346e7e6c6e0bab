"""The streaming safetensors loader: the reader against safetensors' own, a sharded Wan checkpoint
streamed into fp8 layers (the same bits as quantising the loaded model) and into full precision
(the same tensors), strict key checks, random weights module by module, and the peak resident
memory of streaming against reading the whole state dict first (measured in fresh processes)."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import json  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.backbones._weights import CheckpointMismatchError  # noqa: E402
from fastvader.backbones.streaming import (SafetensorsReader, checkpoint_files, load_streaming,  # noqa: E402
                                           materialize_random, skeleton)
from fastvader.memory.fp8 import Fp8Linear, Fp8Storage  # noqa: E402

torch.set_num_threads(1)
WAN_FILES = ["diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"]


def test_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.randn(4, 4).to(torch.float8_e4m3fn), "e": torch.ones(0), "f": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    reader, reference = SafetensorsReader(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors"))
    for name, tensor in reference.items():
        got = reader.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)) if tensor.numel() else True


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TRANSFORMER

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_TRANSFORMER).eval()


def _sharded(tmp_path, model):
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / WAN_FILES[0]).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _run(model):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500]), context, return_dict=False)[0]


def test_a_sharded_checkpoint_streams_into_full_precision_and_fp8(tmp_path):
    from diffusers import WanTransformer3DModel

    model = _tiny_transformer()
    folder = _sharded(tmp_path, model)
    files = checkpoint_files(folder, WAN_FILES)
    config = dict(model.config)

    full = load_streaming(skeleton(lambda: WanTransformer3DModel.from_config(config), None), files, torch.float32,
                          progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), model.state_dict().values()))

    fp8 = load_streaming(skeleton(lambda: WanTransformer3DModel.from_config(config), Fp8Storage()), files,
                         torch.float32, progress=False)
    Fp8Storage().convert(model)  # the loaded model quantised afterwards: the same bits and scales
    assert isinstance(fp8.blocks[0].attn1.to_q, Fp8Linear)
    assert all(torch.equal(a, b) for a, b in zip(fp8.state_dict().values(), model.state_dict().values()))
    assert torch.equal(_run(fp8), _run(model))


def test_keys_and_shapes_are_checked_before_anything_is_read(tmp_path):
    from diffusers import WanTransformer3DModel

    model = _tiny_transformer()
    folder = _sharded(tmp_path, model)
    index = json.loads((folder / WAN_FILES[0]).read_text())
    del index["weight_map"]["blocks.1.ffn.net.2.weight"]
    (folder / WAN_FILES[0]).write_text(json.dumps(index))
    build = skeleton(lambda: WanTransformer3DModel.from_config(dict(model.config)), Fp8Storage())
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): blocks.1.ffn.net.2.weight"):
        load_streaming(build, checkpoint_files(folder, WAN_FILES), torch.float32, progress=False)


def test_wan_built_from_a_local_folder_into_fp8(tmp_path):
    """``build_backbone`` with fp8 storage streams the transformer of a diffusers-layout folder."""
    from fastvader.backbones import build_backbone
    from fastvader.backbones.wan import WanBackbone
    from fastvader.config import BackboneConfig

    tiny = WanBackbone.build_tiny({"seed": 0}, torch.float32)
    tiny.save_pretrained(tmp_path)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    _sharded(tmp_path, tiny.denoiser)
    built = build_backbone(BackboneConfig(name="wan", pretrained=str(tmp_path), dtype="fp32"), storage=Fp8Storage())
    Fp8Storage().convert(tiny.denoiser)
    assert isinstance(built.denoiser.blocks[1].ffn.net[2], Fp8Linear)
    assert torch.equal(_run(built.denoiser), _run(tiny.denoiser))


def test_random_weights_module_by_module():
    from diffusers import WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TRANSFORMER

    built = materialize_random(skeleton(lambda: WanTransformer3DModel(**TINY_TRANSFORMER), Fp8Storage()),
                               torch.bfloat16, progress=False)
    assert not any(p.is_meta for p in built.parameters())
    assert built.blocks[0].attn1.to_q.weight.dtype == torch.uint8 and built.proj_out.weight.dtype == torch.bfloat16
    assert torch.isfinite(_run(built.float())).all()  # non-persistent buffers (rotary tables) kept their values


#: a model of 8 blocks of two 1024x1024 Linears (67 MB in fp32, 17 MB in fp8), loaded in a fresh
#: process; prints the peak resident memory the load added (VmHWM reset just before)
_LOAD = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from safetensors.torch import load_file
    from fastvader.backbones.streaming import checkpoint_files, load_streaming, skeleton
    from fastvader.memory.fp8 import Fp8Storage

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)) for _ in range(8))

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    folder, mode = sys.argv[1], sys.argv[2]
    if mode == "write":
        state = {k: torch.randn(v.shape) for k, v in Blocks().state_dict().items()}
        from safetensors.torch import save_file
        names, index = sorted(state), {}
        for i in range(4):
            shard = {n: state[n] for n in names[i::4]}
            save_file(shard, f"{folder}/shard{i}.safetensors")
            index.update({n: f"shard{i}.safetensors" for n in shard})
        open(f"{folder}/model.safetensors.index.json", "w").write(json.dumps({"weight_map": index}))
        sys.exit(0)
    files = checkpoint_files(folder, ["model.safetensors.index.json"])
    model = skeleton(Blocks, Fp8Storage())
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident size
    before = status("VmRSS")
    if mode == "streaming":
        load_streaming(model, files, torch.bfloat16, progress=False)
    else:  # read the whole state dict, then quantise
        state = {}
        for path in dict.fromkeys(files.values()):
            state.update(load_file(str(path)))
        for name, tensor in state.items():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(owner, nn.Linear) and name.endswith("weight"):
                owner.load_weight(tensor)
            else:
                setattr(owner, name.rsplit(".", 1)[1], nn.Parameter(tensor.to(torch.bfloat16), requires_grad=False))
        del state
    final = sum(t.numel() * t.element_size() for t in model.parameters())
    print(json.dumps({"added": status("VmHWM") - before, "final": final}))
""")


def _load_in_fresh_process(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(folder), mode], capture_output=True, text=True,
                         timeout=300, cwd=folder)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]) if mode != "write" else {}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_streaming_peak_memory_is_the_model_plus_about_one_tensor(tmp_path):
    _load_in_fresh_process(tmp_path, "write")
    streaming = _load_in_fresh_process(tmp_path, "streaming")
    one_shot = _load_in_fresh_process(tmp_path, "one_shot")
    one_tensor = 1024 * 1024 * 4  # the largest tensor in the file (fp32)
    print(f"peak RSS added: streaming {streaming['added'] / 2**20:.1f} MiB, whole state dict first "
          f"{one_shot['added'] / 2**20:.1f} MiB, final model {streaming['final'] / 2**20:.1f} MiB")
    assert streaming["added"] < one_shot["added"] / 2
    # the model, plus the reused read buffer and quantisation buffer (one tensor each) and slack
    assert streaming["added"] <= streaming["final"] + 3 * one_tensor
    assert one_shot["added"] >= 16 * one_tensor  # the 16 weights (67 MB) held at once: the baseline is real
