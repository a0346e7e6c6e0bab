"""fastvader profile: the phase clock attributes time to the innermost phase running; profiling a
trainer times every phase of its steps and takes its timers off again; the command writes the
report and the memory plot and says what a CPU cannot measure."""
from __future__ import annotations

from tests.helpers.trust import single_thread, tiny_config  # noqa: F401  (first: fixes sys.path)

import json  # noqa: E402

import torch  # noqa: E402

from fastvader.cli import main  # noqa: E402
from fastvader.speed.profile import PHASES, PhaseClock, plot_memory, profile, table  # noqa: E402
from fastvader.training.trainer import Trainer  # noqa: E402


def test_the_clock_counts_each_phase_apart_from_the_phases_inside_it():
    ticks = iter(float(t) for t in range(100))
    clock = PhaseClock(torch.device("cpu"), now=lambda: next(ticks))  # every reading one second later
    inner = clock.timed("grad steps", lambda: None)

    def outer():
        with clock.phase("rollout no-grad"):
            inner()

    clock.reset()  # t=1
    outer()  # enter rollout (2), enter grad steps (3), leave it (4), leave rollout (5)
    clock.flush()  # 6
    assert dict(clock.seconds) == {"other": 2.0, "rollout no-grad": 2.0, "grad steps": 1.0}
    assert [phase for _, _, phase in clock.timeline] == ["other", "rollout no-grad", "grad steps", "rollout no-grad",
                                                         "other"]


def test_profile_times_every_phase_and_takes_its_timers_off(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "profiled", sampler={"steps": 3}, train={"progress": False}))
    try:
        report = profile(trainer, steps=1, warmup=1)
    finally:
        trainer.close()
    assert set(report["phases"]) == set(PHASES)
    for name in ("rollout no-grad", "grad steps", "decode", "reward", "backward", "optimizer"):
        assert report["phases"][name]["seconds_per_step"] > 0, name
    assert report["peak_bytes"] is None and any("peak GPU memory" in n for n in report["not_measured"])
    assert report["planner"]["peak_bytes"] > 0
    assert report["engaged"]["speed"]["compile"]["engaged"] is False
    for owner, attr in ((trainer.sampler, "sample"), (trainer.sampler, "grad_step_wrapper"),
                        (trainer.backbone, "decode_frames"), (trainer.reward, "forward"),
                        (trainer.accelerator, "backward")):
        assert "_fastvader_layers" not in owner.__dict__, (owner, attr)
    assert "decode_frames" not in trainer.backbone.__dict__ and "forward" not in trainer.reward.__dict__
    text = table(report)
    assert "rollout no-grad" in text and "planner's predicted peak" in text and "not measured: peak GPU memory" in text
    assert plot_memory(report, tmp_path / "plot.png").stat().st_size > 0


def test_the_command_writes_the_report_and_the_plot(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("backbone: {name: toy, random_init: true}\nvideo: {frames: 3, height: 16, width: 16}\n"
                      "sampler: {steps: 2}\nprompts: {items: [a red ball]}\nreward: {name: target_color}\n"
                      "train: {progress: false}\n")
    out = tmp_path / "profile"
    assert main(["profile", "--config", str(config), "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rollout no-grad" in printed and "speed.compile: off (auto: off on cpu" in printed
    saved = json.loads((out / "profile.json").read_text())
    assert saved["steps"] == 1 and saved["warmup_step_seconds"] == []
    assert (out / "memory_timeline.png").is_file() and not (out / "memory_snapshot.pickle").exists()
    assert main(["profile", "--config", str(config), "--steps", "0"]) == 2
