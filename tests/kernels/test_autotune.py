"""The v2 launchers' autotuner: the fastest measured candidate per key, cached; candidates that
fail to compile or launch skipped; the heuristic (first) candidate when not tuning (the
interpreter, FASTVADER_AUTOTUNE=0); and the candidate lists the launchers offer."""
from __future__ import annotations

import pytest

from fastvader.kernels import _backend
from fastvader.kernels._autotune import Autotuner, launch_config
from fastvader.kernels.ops import temporal_attention as ta

A, B, C = (launch_config(4, BLOCK_R=r, D_CHUNK=16) for r in (32, 64, 128))


def test_picks_the_fastest_and_caches_it():
    tuner = Autotuner("demo")
    measured = []

    def measure(cfg):
        measured.append(cfg)
        return {A: 3.0, B: 1.0, C: 2.0}[cfg]

    assert tuner.pick("key", [A, B, C], measure, tune=True) is B
    assert tuner.pick("key", [A, B, C], lambda cfg: pytest.fail("measured again"), tune=True) is B
    assert measured == [A, B, C] and tuner.chosen("key") is B
    (entry,) = tuner.report()
    assert entry["chosen"] == B.describe() and entry["candidates_ms"][A.describe()] == 3.0


def test_skips_candidates_that_fail_and_raises_when_all_do():
    tuner = Autotuner("demo")

    def measure(cfg):
        if cfg is not C:
            raise RuntimeError("out of resources: shared memory")
        return 5.0

    assert tuner.pick("k", [A, B, C], measure, tune=True) is C
    assert "out of resources" in tuner.report()[0]["candidates_ms"][A.describe()]
    with pytest.raises(RuntimeError, match="shared memory"):
        Autotuner("demo").pick("k", [A, B], measure, tune=True)


def test_heuristic_without_tuning():
    tuner = Autotuner("demo")
    assert tuner.pick("k", [B, A], lambda cfg: pytest.fail("measured"), tune=False) is B
    assert tuner.chosen("k") is None  # nothing cached: tuning may still happen later


def test_no_tuning_under_the_interpreter_or_when_switched_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _backend.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.autotune_enabled()
    monkeypatch.setenv("FASTVADER_AUTOTUNE", "0")
    assert not _backend.autotune_enabled()


@pytest.mark.parametrize("frames", [1, 7, 16, 33, 51, 64, 100, 128])
@pytest.mark.parametrize("head_dim", [8, 40, 64, 80, 160, 256])
def test_candidates_fit_the_kernel(frames, head_dim):
    """Every candidate holds a whole clip per tile, chunks head_dim with tl.dot-sized (>= 16)
    power-of-two chunks, and there are at most four per direction."""
    for backward in (False, True):
        configs = ta._candidates(frames, head_dim, 4608, interpreted=False, backward=backward)
        assert 1 <= len(configs) <= 4 and len(set(configs)) == len(configs)
        for cfg in configs:
            rows, chunk = cfg["BLOCK_R"], cfg["D_CHUNK"]
            assert rows >= frames and rows & (rows - 1) == 0 and rows >= 32
            assert chunk >= 16 and chunk & (chunk - 1) == 0 and chunk <= 128
            assert cfg.num_stages == (1 if chunk >= head_dim else 2)
    (interpreted,) = ta._candidates(frames, head_dim, 40, interpreted=True)
    assert interpreted["BLOCK_R"] >= frames and interpreted["D_CHUNK"] >= head_dim
