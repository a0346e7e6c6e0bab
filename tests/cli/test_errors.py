"""Every user mistake the CLI knows ends in one line ``fastvader: ...`` naming the field, file or
value and what to do, with exit status 2, and touches nothing on disk. The TABLE below is the
list of those mistakes; each row runs ``fastvader`` in-process inside a scratch folder that
holds everything it reads and writes, and compares the folder before and after."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.trust import single_thread  # noqa: F401  (also drops the repo root from sys.path)
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fastvader.cli import main  # noqa: E402
from fastvader.config import ConfigError  # noqa: E402
from fastvader.lora import add_lora, lora_metadata, lora_state_dict, save_lora  # noqa: E402
from fastvader.toy.model import ToyWorldConfig, build_toy_world  # noqa: E402
from tests.helpers.disk import tree_state  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TINY = {"backbone": {"name": "toy", "random_init": True}, "video": {"frames": 4, "height": 16, "width": 16},
        "sampler": {"steps": 2}, "lora": {"rank": 4, "alpha": 4.0},
        "prompts": {"items": ["a red square moving left"]},
        "validation": {"prompts": ["a blue circle moving up"], "seeds": [0], "save_videos": False},
        "reward": {"name": "target_color"},
        "train": {"steps": 1, "progress": False, "run_name": "r", "output_dir": "runs", "device": "cpu"},
        "logging": {"tensorboard": False}}


def lora_file(path: Path, unet=None, **meta) -> Path:
    """A LoRA file as training writes it (``meta`` adds or replaces metadata; none at all when
    ``meta`` is ``{"bare": True}``)."""
    unet = unet if unet is not None else build_toy_world(ToyWorldConfig(), seed=0).unet
    add_lora(unet, 4, 4.0, target_modules=TARGETS, init_weights=False)
    if meta.pop("bare", False):
        save_file({f"unet.{k}": v for k, v in lora_state_dict(unet).items()}, str(path))
        return path
    return save_lora(unet, path, {**lora_metadata(4, 4.0, TARGETS, backbone="toy", base_model="toy", steps=3),
                                  **{f"fastvader.{k}": v for k, v in meta.items()}})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A scratch folder with the configs, prompt files and LoRA files the cases read."""
    w = tmp_path_factory.mktemp("world")
    (w / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (w / "bad.yaml").write_text("backbone:\n  name: toy\n  options: [1, 2\nvideo: {}\n")
    # the demo's reward section (configs/demo.yaml may change; the mistake stays the same)
    (w / "recolour.yaml").write_text(yaml.safe_dump({**TINY, "reward": {"name": "object_color", "options": {
        "object_color": {"color": "red"}}}}))
    (w / "empty.yaml").write_text("")
    (w / "no_prompts.txt").write_text("# only a comment\n\n")
    (w / "a_file").write_text("not a folder")
    (w / "folder").mkdir()
    lora = lora_file(w / "lora.safetensors")
    (w / "cut.safetensors").write_bytes(lora.read_bytes()[:700])
    lora_file(w / "animatediff.safetensors", backbone="animatediff", base_model="some/animatediff")
    wider = ToyWorldConfig()
    wider.unet = {**wider.unet, "block_out_channels": [16, 32], "cross_attention_dim": 64}
    lora_file(w / "other_size.safetensors", build_toy_world(wider, seed=0).unet, bare=True)
    return w


@dataclass
class Case:
    id: str
    argv: list[str]
    #: what the one line must say (a regular expression)
    says: str
    env: dict[str, str] | None = None
    needs_no_gpu: bool = False


SAMPLE = ["sample", "--config", "tiny.yaml", "--out", "samples"]
EXPORT = ["export", "lora.safetensors", "--format"]
UNREACHABLE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": ""}

TABLE = [
    Case("bad yaml", ["train", "--config", "bad.yaml"], r"config file 'bad.yaml' is not valid YAML: line 4, column 6"),
    Case("bad --set value", ["train", "--config", "tiny.yaml", "--set", "train.steps=[1"],
         r"--set train.steps=\[1: the value is not valid YAML .*quote text"),
    Case("empty yaml", ["train", "--config", "empty.yaml"], r"config file 'empty.yaml' is empty; give at least the prompts"),
    Case("missing config", ["train", "--config", "nope.yaml"], r"config file 'nope.yaml' does not exist"),
    Case("unknown key", ["train", "--config", "tiny.yaml", "--set", "train.stpes=3"], r"unknown key\(s\) \['train.stpes'\]"),
    Case("empty prompts file", ["train", "--config", "tiny.yaml", "--set", "prompts.items=[]", "--set",
                                "prompts.file=no_prompts.txt"], r"prompts.file=.*no_prompts.txt.*holds no prompt"),
    Case("frames beyond the model", ["train", "--config", "tiny.yaml", "--set", "video.frames=16"],
         r"video.frames=16 does not fit toy: .* set video.frames <= 8"),
    Case("targets match nothing", ["train", "--config", "tiny.yaml", "--set", "lora.target_modules=[nothing]"],
         r"lora.target_modules=\['nothing'\] matches no module of UNet3DConditionModel: .*'to_q'"),
    Case("cuda without a GPU", ["train", "--config", "tiny.yaml", "--device", "cuda"],
         r"train.device='cuda' but no CUDA device is available.*--device cpu", needs_no_gpu=True),
    Case("fp16 on the CPU", ["train", "--config", "tiny.yaml", "--set", "train.precision=fp16"],
         r"train.precision='fp16' needs a CUDA device", needs_no_gpu=True),
    Case("zero gpu memory", ["plan", "--config", "tiny.yaml", "--gpu-memory", "0GiB"],
         r"memory.gpu_memory='0GiB' is invalid: a size above zero"),
    Case("gpu memory without a size", ["train", "--config", "tiny.yaml", "--gpu-memory", "lots"],
         r"memory.gpu_memory='lots' is invalid: a size such as 24GiB, 24G"),
    Case("reward options of another reward", ["train", "--config", "recolour.yaml", "--set", "reward.name=brightness"],
         r"reward.options.object_color is set, but reward.name='brightness' does not use object_color: drop"),
    Case("a reward option's value the reward refuses", ["train", "--config", "recolour.yaml", "--set",
                                                         "reward.options.object_color.color=mauve"],
         r"config: reward.options.object_color: object_color.color='mauve' is not a known colour"),
    Case("output_dir is a file", ["train", "--config", "tiny.yaml", "--set", "train.output_dir=a_file"],
         r"a_file/r: a_file is a file; set train.output_dir to a folder"),
    Case("lora.init_from missing", ["train", "--config", "tiny.yaml", "--set", "lora.init_from=gone.safetensors"],
         r"lora.init_from='gone.safetensors' is invalid: the file does not exist"),
    Case("lora.init_from of another family", ["train", "--config", "tiny.yaml", "--set",
                                              "lora.init_from=animatediff.safetensors"],
         r"animatediff.safetensors was trained on animatediff \(base model some/animatediff\); this config builds toy"),
    Case("truncated lora", SAMPLE + ["--lora", "cut.safetensors"],
         r"cut.safetensors cannot be read as a safetensors file .* truncated"),
    Case("missing lora", SAMPLE + ["--lora", "gone.safetensors"], r"LoRA file 'gone.safetensors' does not exist"),
    Case("lora is a folder", SAMPLE + ["--lora", "folder"], r"folder is a folder; give the LoRA file"),
    Case("lora of another family", ["eval", "--config", "tiny.yaml", "--lora", "animatediff.safetensors"],
         r"was trained on animatediff .*use the config of the run that trained it"),
    Case("lora of another size", SAMPLE + ["--lora", "other_size.safetensors"],
         r"other_size.safetensors: \d+ of \d+ adapted modules have other sizes in this model .*another model"),
    Case("export --out is a folder", EXPORT + ["diffusers", "--out", "folder"], r"--out folder is a folder; give a file name"),
    Case("export onto its source", EXPORT + ["diffusers", "--out", "lora.safetensors"],
         r"--out lora.safetensors is the LoRA being exported"),
    Case("export for a tool without a loader", EXPORT + ["comfyui", "--out", "c.safetensors"],
         r"comfyui has no loader for toy models"),
    Case("hub unreachable", SAMPLE + ["--set", "backbone.name=modelscope", "--set", "backbone.random_init=false",
                                      "--set", "backbone.pretrained=nobody/not-cached", "--set", "video.height=32",
                                      "--set", "video.width=32"],
         r"backbone.pretrained='nobody/not-cached': (the Hub \(127.0.0.1:9\) cannot be reached|HF_HUB_OFFLINE is set)"
         r".* pass a local folder as backbone.pretrained",
         env=UNREACHABLE_HUB),
]


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_a_user_mistake_ends_in_one_line_and_touches_nothing(case, world, monkeypatch, capsys, tmp_path):
    if case.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("the mistake needs a machine without a GPU")
    monkeypatch.chdir(world)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    before = tree_state(world)
    capsys.readouterr()
    assert main(case.argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvader: "), captured.err
    assert re.search(case.says, lines[0]), lines[0]
    assert tree_state(world) == before


def test_debug_shows_the_traceback_instead(world, monkeypatch):
    monkeypatch.chdir(world)
    with pytest.raises(ConfigError, match="is empty"):
        main(["--debug", "train", "--config", "empty.yaml"])
    with pytest.raises(ConfigError, match="is empty"):
        main(["train", "--config", "empty.yaml", "--debug"])
    monkeypatch.setenv("FASTVADER_DEBUG", "1")
    with pytest.raises(ConfigError, match="is empty"):
        main(["train", "--config", "empty.yaml"])


def test_an_unexpected_error_is_one_line_that_asks_for_the_traceback(monkeypatch, capsys):
    from fastvader.cli import env

    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setattr(env, "run", broken)
    assert main(["env"]) == 1
    assert capsys.readouterr().err.strip() == ("fastvader: unexpected KeyError: 'surprise' (a bug in fastvader or a case "
                                               "it does not handle yet; run again with --debug for the traceback and "
                                               "report it)")


def test_plan_needs_no_prompts(tmp_path, capsys):
    config = {k: v for k, v in TINY.items() if k != "prompts"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["plan", "--config", str(tmp_path / "p.yaml"), "--gpu-memory", "2", "--no-cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == 2 * 2**30  # a bare number is GiB


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """``fastvader env --json | head -c 0``: the pipe closes before anything is written."""
    process = subprocess.Popen([sys.executable, "-m", "fastvader.cli", "env", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=Path.home(), env={**os.environ, "PYTHONWARNINGS": "ignore"})
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_the_bitsandbytes_probe_line_is_kept_off_the_screen(caplog):
    import fastvader  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_an_output_folder_that_cannot_be_written_is_one_line(world, monkeypatch, capsys):
    """A read-only folder (simulated: the tests may run as root, for whom nothing is read-only)."""
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if "locked" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.chdir(world)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    before = tree_state(world)
    assert main(["train", "--config", "tiny.yaml", "--set", "train.output_dir=locked"]) == 2
    assert capsys.readouterr().err.strip() == ("fastvader: locked/r: Permission denied; check the path and its "
                                               "permissions (an output folder must be a writable folder, not a file)")
    assert tree_state(world) == before
