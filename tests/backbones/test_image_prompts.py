"""Conditioning images of image-to-video prompts: the entry forms a config takes, the checks that
refuse a bad image before any model is built (naming the entry), the resize the diffusers
pipelines do, and the image travelling with its prompt through the prompt cache."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastvader.backbones.base import PromptEmbeddings
from fastvader.config import ConfigError, load_config
from fastvader.io.images import prepare_image
from fastvader.training.prompts import ImagePrompt, PromptCache, PromptSource, prompt_label, validation_prompts

REPO = Path(__file__).resolve().parents[2]


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def i2v_config(tmp_path, items, *overrides, backbone="cogvideox_i2v", **prompt_fields):
    """A tiny image-to-video config written as YAML in ``tmp_path`` (paths relative to it)."""
    data = yaml.safe_load((REPO / "configs" / f"tiny_{backbone}.yaml").read_text())
    data["prompts"] = {"items": items, **prompt_fields}
    data["validation"]["prompts"] = []
    data["train"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------
def test_entries_pair_texts_with_images_and_a_folder_gives_one_prompt_per_image(tmp_path):
    write_image(tmp_path / "cat.png", 48, 48)
    write_image(tmp_path / "shots" / "b.png", 40, 40, seed=1)
    write_image(tmp_path / "shots" / "a.jpg", 64, 64, seed=2)
    (tmp_path / "shots" / "notes.txt").write_text("not an image")
    cfg = i2v_config(tmp_path, [{"text": "a cat", "image": "cat.png"}, {"text": "a scene", "image": "shots"},
                                "plain text"], image="cat.png")
    prompts = PromptSource.from_config(cfg.prompts).prompts
    assert [str(p) for p in prompts] == ["a cat", "a scene", "a scene", "plain text"]
    assert [Path(p.image).name for p in prompts] == ["cat.png", "a.jpg", "b.png", "cat.png"]  # folder: sorted
    assert all(Path(p.image).is_absolute() for p in prompts)  # resolved beside the YAML file
    assert cfg.prompts.image == str(tmp_path / "cat.png")


def test_validation_entries_take_images_too(tmp_path):
    write_image(tmp_path / "cat.png", 48, 48)
    cfg = i2v_config(tmp_path, [{"text": "a cat", "image": "cat.png"}])
    cfg.validation.prompts = [{"text": "held out", "image": str(tmp_path / "cat.png")}]
    (val,) = validation_prompts(cfg.validate())
    assert isinstance(val, ImagePrompt) and str(val) == "held out"


def test_a_text_only_entry_takes_prompts_image(tmp_path):
    write_image(tmp_path / "cat.png", 32, 32)
    cfg = i2v_config(tmp_path, [], "prompts.template=a <animal>", "prompts.vocab={animal: [cat, dog]}",
                     image="cat.png")
    prompts = PromptSource.from_config(cfg.prompts).prompts
    assert [str(p) for p in prompts] == ["a cat", "a dog"] and all(isinstance(p, ImagePrompt) for p in prompts)


# ---------------------------------------------------------------------------------------------
# refused up front, naming the entry
# ---------------------------------------------------------------------------------------------
def test_bad_images_are_refused_naming_the_entry(tmp_path):
    write_image(tmp_path / "ok.png", 32, 32)
    write_image(tmp_path / "wide.png", 96, 32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty").mkdir()
    ok = {"text": "fine", "image": "ok.png"}
    cases = [({"text": "gone", "image": "missing.png"}, r"prompts.items\[1\]: the image .*missing.png does not exist"),
             ({"text": "bad", "image": "broken.png"}, r"prompts.items\[1\]: .*broken.png is not a readable image"),
             ({"text": "wide", "image": "wide.png"}, r"prompts.items\[1\]: .*96x32 .* distort it by 200%.*image_resize=crop"),
             ({"text": "none", "image": "empty"}, r"prompts.items\[1\]: the folder .*empty holds no images"),
             ({"text": "x", "picture": "ok.png"}, r"prompts.items\[1\]=.* is invalid"),
             (3, r"prompts.items\[1\]=3 is invalid")]
    for entry, message in cases:
        with pytest.raises(ConfigError, match=message):
            i2v_config(tmp_path, [ok, entry])
    # crop keeps the aspect ratio: the wide image is fine then
    assert i2v_config(tmp_path, [ok, {"text": "wide", "image": "wide.png"}], image_resize="crop")


def test_image_and_backbone_must_agree(tmp_path):
    write_image(tmp_path / "ok.png", 32, 32)
    with pytest.raises(ConfigError, match=r"prompts.items\[0\] \('no image'\) has no image: backbone 'svd' is "
                                          "image-to-video"):
        i2v_config(tmp_path, ["no image"], backbone="svd")
    with pytest.raises(ConfigError, match=r"prompts.items\[0\] has an image .* backbone 'cogvideox' is text-to-video"):
        i2v_config(tmp_path, [{"text": "a", "image": "ok.png"}], backbone="cogvideox")
    with pytest.raises(ConfigError, match=r"validation.prompts\[0\] \('held out'\) has no image"):
        i2v_config(tmp_path, [{"text": "a", "image": "ok.png"}], "validation.prompts=[held out]")
    with pytest.raises(ConfigError, match="prompts.image_resize='squash'"):
        i2v_config(tmp_path, [{"text": "a", "image": "ok.png"}], image_resize="squash")


# ---------------------------------------------------------------------------------------------
# the pipelines' resize, and the prompt type
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,resize_mode", [("stretch", "default"), ("crop", "crop")])
def test_prepared_image_is_what_the_pipelines_feed_the_model(tmp_path, mode, resize_mode):
    """VideoProcessor.preprocess (CogVideoX-I2V, SVD, Wan I2V) of diffusers' load_image, in [0, 1]."""
    from diffusers.utils import load_image
    from diffusers.video_processor import VideoProcessor

    path = write_image(tmp_path / "photo.png", 75, 50)
    ours = prepare_image(path, 32, 48, mode)
    image = VideoProcessor(vae_scale_factor=8).resize(load_image(str(path)), 32, 48, resize_mode=resize_mode)
    theirs = VideoProcessor(vae_scale_factor=8).preprocess(image, height=32, width=48)[0]
    assert ours.shape == (3, 32, 48) and ours.dtype == torch.float32
    torch.testing.assert_close(ours * 2 - 1, theirs, rtol=0, atol=1e-6)


def test_image_prompts_compare_by_text_and_image_and_survive_copies():
    a, b = ImagePrompt("a cat", "/x/one.png"), ImagePrompt("a cat", "/x/two.png")
    assert a != b and a == ImagePrompt("a cat", "/x/one.png") and a != "a cat" and "a cat" != a
    assert len({a, b, ImagePrompt("a cat", "/x/one.png")}) == 2
    assert str(a) == "a cat" and a.upper() == "A CAT" and prompt_label(a) == "a cat [one.png]"
    assert prompt_label("plain") == "plain"
    for copied in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert copied == a and copied.image == a.image and copied.resize == a.resize


class RecordingBackbone:
    """Stands in for an image-to-video backbone: records what the cache hands it."""

    def __init__(self):
        self.calls = []

    def encode_prompts(self, prompts, images=None, num_frames=None):
        self.calls.append((list(prompts), images, num_frames))
        cond = images.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 2, 4)
        return PromptEmbeddings(cond, torch.zeros_like(cond), {"image_latents": images[:, :, None, :4, :4]},
                                {"image_latents": torch.zeros(len(prompts), 3, 1, 4, 4)})


def test_the_image_travels_with_its_prompt_through_the_cache(tmp_path):
    one, two = write_image(tmp_path / "1.png", 16, 16, seed=1), write_image(tmp_path / "2.png", 16, 16, seed=2)
    prompts = [ImagePrompt("a cat", one), ImagePrompt("a cat", two), ImagePrompt("a cat", one)]
    backbone = RecordingBackbone()
    cache = PromptCache(backbone, torch.device("cpu"), torch.float32, (5, 8, 8))
    emb = cache(prompts)
    ((texts, images, frames),) = backbone.calls  # one encode of the two distinct prompts
    assert texts == ["a cat", "a cat"] and frames == 5 and images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images[0], prepare_image(one, 8, 8, "stretch"))
    assert emb.cond.shape == (3, 2, 4) and torch.equal(emb.cond[0], emb.cond[2])
    assert not torch.equal(emb.cond[0], emb.cond[1])
    assert emb.uncond_extra["image_latents"].abs().sum() == 0 and emb.extra["image_latents"].shape[0] == 3
    guided = emb.guided_extra()["image_latents"]  # CFG: the unconditional rows first
    assert guided.shape[0] == 6 and guided[:3].abs().sum() == 0 and torch.equal(guided[3:], emb.extra["image_latents"])
    cache(prompts[:1])
    assert len(backbone.calls) == 1  # cached
