"""The fastvader command end to end on a tiny config (in-process, so it stays fast)."""
import json

import pytest

from fastvader.cli import build_parser, main
from fastvader.cli.evaluate import readable
from tests.helpers.disk import tree_state

TINY = """
backbone: {name: toy, random_init: true}
sampler: {steps: 2}
prompts: {items: [a red square moving left]}
validation: {prompts: [a blue circle moving up], seeds: [0], save_videos: true}
reward: {name: target_color, options: {target_color: {color: red}}}
train: {steps: 2, progress: false, run_name: cli}
"""


@pytest.fixture()
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_train_then_sample_and_eval_with_the_lora(tmp_path, tiny_yaml, capsys):
    out = f"train.output_dir={tmp_path / 'runs'}"
    assert main(["train", "--config", str(tiny_yaml), "--set", out]) == 0
    run = tmp_path / "runs" / "cli"
    for name in ("metrics.jsonl", "summary.json", "lora.safetensors", "config.yaml", "reward_curve.png"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and {"reward_before", "reward_after", "wall_time_s"} <= set(summary)
    assert list((run / "samples").glob("before_*.gif")) and list((run / "samples").glob("after_*.mp4"))

    capsys.readouterr()
    assert main(["sample", "--config", str(tiny_yaml), "--set", out, "--lora", str(run / "lora.safetensors"),
                 "--prompt", "a green square moving right"]) == 0
    [samples] = (tmp_path / "runs").glob("sample-*")  # by default a new folder under train.output_dir
    assert (samples / "grid.png").is_file() and list(samples.glob("*.gif"))

    capsys.readouterr()
    run_before = tree_state(run)
    assert main(["eval", "--config", str(tiny_yaml), "--set", out, "--lora", str(run / "lora.safetensors"),
                 "--json", "--out", str(tmp_path / "e")]) == 0
    result = json.loads(capsys.readouterr().out)  # --json: nothing else on stdout
    assert result["tag"] == "eval" and result["per_prompt"].keys() == {"a blue circle moving up"}
    assert result["step"] == 2 and result["lora"] == str(run / "lora.safetensors")
    assert json.loads((tmp_path / "e" / "eval.json").read_text()) == result and (tmp_path / "e" / "grid.png").is_file()
    assert tree_state(run) == run_before  # eval writes only where --out says
    text = readable(result, seeds=1)
    assert text.startswith(f"reward {result['reward']:.4f}: mean over 1 prompt(s) x 1 seed(s)")
    assert "trained 2 steps" in text and "a blue circle moving up" in text

    # resume a finished run for two more steps
    assert main(["train", "--resume", str(run), "--set", "train.steps=3", "--set", out,
                 "--config", str(tiny_yaml)]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_config_exits_2_with_the_field_named(tiny_yaml, capsys):
    assert main(["train", "--config", str(tiny_yaml), "--set", "sampler.truncation=specific:9"]) == 2
    assert "sampler.truncation='specific:9'" in capsys.readouterr().err


def test_every_subcommand_has_help_with_defaults(capsys):
    parser = build_parser()
    for command in ("train", "sample", "eval", "env", "models"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "usage: fastvader " + command in text
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "sampler.steps = 25" in text and "(default: None)" in text


def test_env_and_models_json(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] and "kernel path (default device)" in env
    assert main(["models", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    toy = next(b for b in catalog["backbones"] if b["name"] == "toy")
    assert toy["params"]["unet"] > 0
    assert {"target_color", "brightness"} <= {r["name"] for r in catalog["rewards"]}
