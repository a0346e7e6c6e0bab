"""The speed settings in training: a run with compiled blocks (grad steps included), channels_last
and the kernels trains as the same run without them; CUDA graphs, asked for on a CPU, say so
once and stay off; the self-check and summary.json report what engaged; close() leaves a
passed-in backbone as it found it."""
from __future__ import annotations

from tests.helpers.trust import lora_snapshot, single_thread, tiny_config  # noqa: F401  (first: fixes sys.path)
from tests.helpers.snapshot import assert_restored, model_state

import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from fastvader.backbones import build_backbone  # noqa: E402
from fastvader.training.trainer import Trainer, train  # noqa: E402

FAST = {"compile": "regional", "compile_backend": "eager", "compile_grad_steps": True, "channels_last": "on",
        "cuda_graphs": "on", "compile_cache": False}


@pytest.fixture(autouse=True)
def pytorch_kernel_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _config(tmp_path, name, **sections):
    return tiny_config(tmp_path, name, kernels={"enabled": "on"}, memory={"checkpointing": "sub_block"},
                       sampler={"steps": 3, "guidance_scale": 3.0}, lora={"init_weights": False}, **sections)


def _steps(trainer, n):
    losses = [trainer.train_step().loss for _ in range(n)]
    return losses, lora_snapshot(trainer)


def test_training_with_speed_settings_matches_training_without(tmp_path):
    plain = Trainer(_config(tmp_path, "plain"))
    want = _steps(plain, 3)
    plain.close()

    cfg = _config(tmp_path, "fast", speed=FAST)
    backbone = build_backbone(cfg.backbone)
    snapshot = model_state(backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = Trainer(cfg, backbone=backbone)
        got = _steps(fast, 3)  # step 1 eager (the self-check's), then compiled
    refused = [str(w.message) for w in caught if "cannot engage" in str(w.message)]
    assert refused == ["fastvader: speed.cuda_graphs=on cannot engage: needs a CUDA device; this run is on cpu; "
                       "running without it"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    report = fast.selfcheck.report["speed"]
    assert report["compile"].startswith("regional via eager: TransformerTemporalModel x")
    assert report["channels_last"].endswith("Conv2d weight(s) in channels_last")
    assert report["cuda_graphs"] == "off: needs a CUDA device; this run is on cpu"
    assert report["fp8_rollout"] == "off: off"
    summary = fast.speed.summary()["compile"]
    assert summary["compiled_calls"] > 0 and summary["error"] is None
    assert fast.selfcheck.report["checkpointing"]["hit"] > 0

    fast.close()
    peft_config = backbone.denoiser.__dict__.pop("peft_config")  # the trained adapters stay (see Trainer.close)
    assert_restored(backbone, snapshot,
                    same=lambda now, before: now is before or (isinstance(now, BaseTunerLayer)
                                                               and now.get_base_layer() is before))
    backbone.denoiser.peft_config = peft_config


def test_summary_json_says_what_engaged(tmp_path):
    summary = train(tiny_config(tmp_path, "summary", train={"steps": 1}))
    written = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert written["speed"] == summary["speed"]
    assert written["speed"]["compile"] == {"requested": "auto", "engaged": False,
                                           "detail": "auto: off on cpu (speed.compile=regional to compile here)"}
    assert set(written["self_check"]["speed"]) == {"compile", "cuda_graphs", "channels_last", "fp8_rollout"}
