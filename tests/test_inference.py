"""Sampling and scoring without a Trainer: a VideoPipeline with a trained LoRA file samples the
videos and reports the reward the Trainer's own validation does; files of another layout are
refused by name."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.errors import LoraFileError  # noqa: E402
from fastvader.inference import VideoPipeline  # noqa: E402
from fastvader.memory.tiny import tiny_toy_config  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["a red ball", "a dog runs"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer after two steps (non-zero LoRA), its LoRA file, and what its validation says."""
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(tmp_path_factory.mktemp("trained"), train={"steps": 2}, optim={"lr": 1e-2},
                          reward={"name": "brightness"}, lora={"rank": 2, "alpha": 3.0, "init_weights": False},
                          validation={"prompts": PROMPTS, "seeds": [0, 1], "save_videos": False})
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.train_step()
    path = trainer.save_lora(cfg.run_dir / "lora.safetensors")
    checkpoint = trainer.save_checkpoint()
    out = {"cfg": cfg, "lora": path, "checkpoint": checkpoint, "videos": trainer.sample_videos(PROMPTS, seed=1),
           "validation": trainer.validate("probe")}
    trainer.close()
    return out


def test_pipeline_samples_what_the_trainer_samples(trained):
    # lora.rank/alpha of the config are the defaults (4, 4.0): the file's metadata shapes the adapters
    cfg = tiny_toy_config(trained["cfg"].run_dir, reward={"name": "brightness"}, lora={"init_weights": False})
    pipeline = VideoPipeline(cfg, lora=trained["lora"], with_reward=False)
    assert pipeline.lora_metadata["fastvader.lora_rank"] == "2"
    videos = pipeline.sample(PROMPTS, seed=1)
    assert videos.shape == trained["videos"].shape
    torch.testing.assert_close(videos, trained["videos"], rtol=1e-5, atol=1e-6)
    untuned = VideoPipeline(cfg, with_reward=False).sample(PROMPTS, seed=1)
    assert (untuned - trained["videos"]).abs().max() > 1e-4  # the LoRA changes what is sampled
    assert not any(p.requires_grad for p in pipeline.backbone.denoiser.parameters())
    with pytest.raises(ValueError, match="with_reward=False"):
        pipeline.evaluate(PROMPTS, [0])


def test_pipeline_evaluates_as_the_trainers_validation(trained):
    result = VideoPipeline(trained["cfg"], lora=trained["lora"]).evaluate(PROMPTS, [0, 1], tag="probe")
    expected = trained["validation"]
    assert result["tag"] == "probe" and result["step"] == 2  # the LoRA file's training steps
    assert result["per_prompt"].keys() == expected["per_prompt"].keys()
    assert result["reward"] == pytest.approx(expected["reward"], rel=1e-5)
    for prompt, value in expected["per_prompt"].items():
        assert result["per_prompt"][prompt] == pytest.approx(value, rel=1e-5)


def test_a_lora_of_another_model_is_refused_by_name(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(trained["lora"]))
    renamed = {k.replace("transformer_in", "elsewhere"): v for k, v in state.items()}
    bad = tmp_path / "other.safetensors"
    save_file(renamed, str(bad))  # no metadata: the config's lora settings shape the adapters
    with pytest.raises(LoraFileError, match=r"other.safetensors adapts \d+ module\(s\) this model does not have "
                                            r"\(e.g. 'unet.elsewhere"):
        VideoPipeline(trained["cfg"], lora=bad, with_reward=False)


def kohya_and_comfyui_copies(path, folder):
    """The training file as kohya and ComfyUI name a diffusers-named model's modules, written as
    those tools write them: no fastvader metadata."""
    from safetensors.torch import load_file, save_file

    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    copies = {}
    for fmt, name in (("kohya", lambda m: "lora_unet_" + m.replace(".", "_")), ("comfyui", lambda m: "diffusion_model." + m)):
        out = {}
        for key, value in state.items():
            module, factor = key.rsplit(".lora_", 1)
            out[f"{name(module)}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
            out[f"{name(module)}.alpha"] = torch.tensor(3.0)
        copies[fmt] = folder / f"{fmt}.safetensors"
        save_file(out, str(copies[fmt]))
    return copies


def test_kohya_and_comfyui_layouts_sample_what_the_training_file_samples(trained, tmp_path):
    cfg = tiny_toy_config(trained["cfg"].run_dir, reward={"name": "brightness"}, lora={"init_weights": False})
    for fmt, path in kohya_and_comfyui_copies(trained["lora"], tmp_path).items():
        pipeline = VideoPipeline(cfg, lora=path, with_reward=False)
        assert (pipeline.lora.format, pipeline.lora.rank, pipeline.lora.alpha) == (fmt, 2, 3.0)
        torch.testing.assert_close(pipeline.sample(PROMPTS, seed=1), trained["videos"], rtol=1e-5, atol=1e-6)


def test_a_checkpoints_lora_file_carries_the_runs_metadata(trained):
    pipeline = VideoPipeline(trained["cfg"], lora=trained["checkpoint"] / "lora.safetensors", with_reward=False)
    assert (pipeline.lora.rank, pipeline.lora.alpha, pipeline.lora.steps, pipeline.lora.family) == (2, 3.0, 2, "toy")


def test_training_can_start_from_an_existing_lora(trained, tmp_path):
    from fastvader.lora import lora_state_dict, read_lora_file
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(tmp_path, reward={"name": "brightness"}, lora={"init_from": str(trained["lora"])})
    with pytest.warns(UserWarning, match=r"lora.init_from=.*rank 2, alpha 3.*not lora.rank=4/alpha=4"):
        trainer = Trainer(cfg)
    try:
        assert (trainer.cfg.lora.rank, trainer.cfg.lora.alpha) == (2, 3.0)
        start = read_lora_file(trained["lora"]).state
        assert {k: v.shape for k, v in lora_state_dict(trainer.backbone.denoiser).items()} == {
            k: v.shape for k, v in start.items()}
        for key, value in lora_state_dict(trainer.backbone.denoiser).items():
            torch.testing.assert_close(value, start[key], rtol=0, atol=0)
        torch.testing.assert_close(trainer.sample_videos(PROMPTS, seed=1), trained["videos"], rtol=1e-5, atol=1e-6)
    finally:
        trainer.close()


def test_resuming_with_another_rank_is_refused_in_one_line(trained):
    from fastvader.training.run_folder import RunFolderError
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(trained["cfg"].run_dir, reward={"name": "brightness"}, lora={"rank": 4})
    with pytest.raises(RunFolderError, match=r"cannot resume .* with a changed lora.rank: 2 -> 4"):
        Trainer(cfg, resume=trained["cfg"].run_dir)
