"""The main job's world: the shipped toy model, aligned with the demo config's reward, gets a
higher validation reward after a short run (fixed seed, shortened schedule) AND keeps the
objects' shapes and the backgrounds (fastvader.toy.quality's fidelity, against the base model's
videos from the same noise)."""
from pathlib import Path

from fastvader.config import load_config
from fastvader.toy.quality import compare_with_base
from fastvader.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["train.steps=20", "train.progress=false", "sampler.steps=10", "validation.seeds=[0]",
         "validation.save_videos=false", "logging.tensorboard=false", "train.checkpoint_every=0",
         "safeguards.sample_grids=false",
         # a third of the demo's steps at twice its lr, soon enough for a test (15 steps at 3e-3
         # raised the reward more but broke one object up: shape IoU 0.47)
         "optim.lr=2e-3"]


def test_demo_config_raises_the_validation_reward_and_keeps_shape_and_background(tmp_path):
    trainer = Trainer(load_config(CONFIGS / "demo.yaml", [f"train.output_dir={tmp_path}", *SHORT]))
    try:
        summary = trainer.fit()
        report = compare_with_base(trainer)
    finally:
        trainer.close()
    assert summary["status"] == "completed" and summary["steps"] == 20
    overall = report["overall"]
    # object_recolor is minus a squared colour distance per object pixel (0: a red object on an
    # untouched background). Measured (2026-12-02): -0.441 -> -0.405, a twelfth of the gap, but on
    # 2 of the 4 prompts only (README), shape IoU 0.63 at the least, background change 0.046
    assert overall["reward_after"] - overall["reward_before"] > 0.05 * abs(overall["reward_before"]), overall
    # the objects stay where and what they were and the background stays as it was
    assert overall["min_shape_iou"] > 0.5 and overall["background_change"] < 0.08, report["per_prompt"]
