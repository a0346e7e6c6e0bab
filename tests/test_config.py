"""Config validation: every bad input is refused before any model is built, with a message that
names the field, the bad value and what is allowed."""
import dataclasses
from pathlib import Path

import pytest

from fastvader.config import ConfigError, TrainConfig, load_config, parse_bytes

BASE = ["prompts.items=[a red square moving left]"]
PRESETS = Path(__file__).resolve().parents[1] / "configs"
TINY_RUN = """
backbone: {{name: toy, random_init: true}}
sampler: {{steps: 2}}
validation: {{prompts: [a blue circle moving up], save_videos: false}}
reward: {{name: target_color}}
logging: {{tensorboard: false}}
train: {{steps: 2, progress: false, run_name: relative, output_dir: {runs}}}
"""


def cfg_with(*overrides):
    return load_config(None, BASE + list(overrides))


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = cfg_with("train.steps=7", "reward.options={target_color: {color: blue}}")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.train.steps == 7 and again.reward.options["target_color"]["color"] == "blue"


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_validates(preset):
    assert load_config(preset).train.steps > 0


def test_overrides_parse_yaml_values():
    cfg = cfg_with("optim.lr=3e-5", "sampler.truncation=specific:3", "lora.target_modules=[to_q, to_v]")
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.sampler.truncation == "specific:3"
    assert cfg.lora.target_modules == ["to_q", "to_v"]


@pytest.mark.parametrize("overrides, needle", [
    (["train.stepz=3"], "unknown key(s) ['train.stepz']"),
    (["bogus.x=1"], "unknown key(s) ['bogus']"),
    (["train.log_every=10"], "config: train.log_every was removed: every step is logged"),
    (["train.steps=ten"], "train.steps='ten' is invalid: expected an integer"),
    (["optim.lr=fast"], "optim.lr='fast' is invalid: expected a number"),
    (["train.progress=3"], "train.progress=3 is invalid: expected true or false"),
    (["train.steps=0"], "train.steps=0 is invalid"),
    (["sampler.steps=-2"], "sampler.steps=-2 is invalid"),
    (["optim.grad_accum=0"], "optim.grad_accum=0"),
    (["sampler.steps=10", "sampler.truncation=specific:11"], "K must be between 1 and sampler.steps=10"),
    (["sampler.steps=10", "sampler.truncation=range:4-12"], "need 1 <= A <= B <= sampler.steps=10"),
    (["sampler.truncation=sometimes"], "use last, rand, specific:K, range:A-B or x0:A-B"),
    (["sampler.steps=10", "sampler.truncation=x0:0-4"], "need 1 <= A <= B <= sampler.steps=10"),
    (["sampler.name=dpm++", "sampler.truncation=x0:2-4"], "x0:A-B needs a sampler that predicts the clean latents"),
    (["video.frames=8", "frames.reward=list:0,8"], "frames [8] are outside the video (video.frames=8"),
    (["video.frames=8", "frames.reward=random:9"], "K must be between 1 and video.frames=8"),
    (["frames.grad=list:1,1"], "must not repeat"),
    (["frames.reward=same"], "'same' is only for frames.grad"),
    (["reward.name=beauty"], "reward.name='beauty' is invalid: choose from"),
    (["reward.terms={brightness: 1.0, nope: 2.0}"], "reward.terms='nope'"),
    (["reward.options={contrast: {}}"], "reward.options.contrast is set, but reward.name='target_color' does not use"),
    (["video.height=30"], "video.height=30 does not fit toy: it must be a multiple of 4"),
    (["sampler.name=euler_a"], "sampler.name='euler_a' is invalid: choose one of"),
    (["backbone.name=sora9"], "backbone.name='sora9' is invalid"),
    (["optim.name=sgd"], "optim.name='sgd'"),
    (["sampler.eta=1.5"], "sampler.eta=1.5 is invalid: must be in [0, 1]"),
    (["memory.checkpointing=most"], "memory.checkpointing='most'"),
    (["memory.gpu_memory=lots"], "memory.gpu_memory='lots'"),
    (["train.device=tpu"], "train.device='tpu'"),
    (["lora.rank=0"], "lora.rank=0"),
    (["train.run_name=a/b"], "train.run_name='a/b'"),
    (["kernels.enabled=sometimes"], "kernels.enabled='sometimes' is invalid: choose one of ['auto', 'on', 'off']"),
    (["kernels.enabled=2"], "kernels.enabled=2 is invalid: expected one of ['auto', 'on', 'off']"),
])
def test_bad_values_name_field_value_and_what_is_allowed(overrides, needle):
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("written, read", [
    ("off", "off"), ("on", "on"), ("auto", "auto"), ("no", "off"), ("yes", "on"), ("false", "off"),
    ("true", "on"), ("'OFF'", "off"), ("'true'", "on"), ("Auto", "auto"),
])
def test_kernels_enabled_takes_the_words_yaml_reads_as_booleans(written, read):
    """YAML 1.1 reads unquoted on/off/yes/no as booleans; the README tells users to write off."""
    assert cfg_with(f"kernels.enabled={written}").kernels.enabled == read


def test_kernels_enabled_off_in_a_yaml_file_survives_a_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kernels: {enabled: off}\nprompts: {items: [a red square moving left]}\n")
    cfg = load_config(path)
    assert cfg.kernels.enabled == "off"
    path.write_text(cfg.to_yaml())
    assert load_config(path).kernels.enabled == "off"


def test_missing_prompt_file_and_prompt_sources():
    with pytest.raises(ConfigError, match="prompts.file='/nonexistent/prompts.txt' is invalid: the file does not exist"):
        load_config(None, ["prompts.file=/nonexistent/prompts.txt"])
    with pytest.raises(ConfigError, match="give prompts.items, prompts.file or prompts.template"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="give only one of"):
        load_config(None, BASE + ["prompts.template=<a> <b>"])
    with pytest.raises(ConfigError, match=r"needs a non-empty list for each slot: \['b'\]"):
        load_config(None, ["prompts.template=<a> <b>", "prompts.vocab={a: [x]}"])


def config_beside_its_prompt_file(folder, body: str = "") -> Path:
    """folder/c.yaml naming folder/prompts.txt by a relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("a red square moving left\n")
    (folder / "c.yaml").write_text(body + "prompts:\n  file: prompts.txt\n")
    return folder / "c.yaml"


def test_prompt_file_resolves_relative_to_the_config(tmp_path, monkeypatch):
    from fastvader.training.prompts import PromptSource

    config = config_beside_its_prompt_file(tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    assert PromptSource.from_config(cfg.prompts).prompts == ["a red square moving left"]


def test_a_relative_prompt_file_survives_replace_and_a_copy_into_a_run_folder(tmp_path, monkeypatch):
    """What `fastvader sample --prompt` (dataclasses.replace of the validation section) and
    `fastvader train --resume RUN` (the run's saved config.yaml) do with a config."""
    from fastvader.training.prompts import PromptSource

    config = config_beside_its_prompt_file(tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    replaced = [dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, prompts=["a blue circle"])),
                cfg.replace(train=dataclasses.replace(cfg.train, steps=3))]
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    for again in [*replaced, load_config(run / "config.yaml")]:
        again.validate()
        assert PromptSource.from_config(again.prompts).prompts == ["a red square moving left"]


@pytest.mark.slow
def test_sample_and_resume_find_a_prompt_file_named_relative_to_the_config(tmp_path, monkeypatch):
    from fastvader.cli import main

    config = config_beside_its_prompt_file(tmp_path / "project", TINY_RUN.format(runs=tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "runs" / "relative"
    assert main(["train", "--resume", str(run), "--set", "train.steps=3"]) == 0  # the run's own config.yaml
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(["sample", "--config", str(config), "--prompt", "a blue circle moving up", "--out", "s"]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


def test_missing_config_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.steps"])


def test_template_prompts_expand_every_combination():
    from fastvader.training.prompts import expand_template

    prompts = expand_template("a <color> <shape>", {"color": ["red", "blue"], "shape": ["square", "circle"]})
    assert prompts == ["a red square", "a red circle", "a blue square", "a blue circle"]


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(ConfigError):
        parse_bytes("24 parsecs")


def test_reward_terms_shorthand():
    assert cfg_with("reward.name=brightness").reward_terms == {"brightness": 1.0}
    assert cfg_with("reward.terms={brightness: 2, contrast: 0.5}").reward_terms == {"brightness": 2.0, "contrast": 0.5}
    assert isinstance(TrainConfig(), TrainConfig)
