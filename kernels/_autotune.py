"""Launch configurations for the v2 kernels: a candidate list per shape key, the first candidate
the heuristic choice, the fastest measured on first use of the key and kept for the process.

Why not ``@triton.autotune``: the launchers need the chosen configuration before they launch
(the grid and the size of the bias-gradient buffer depend on the rows per program), and the
benchmarks print what was chosen. Under the Triton interpreter, or with FASTVADER_AUTOTUNE=0,
the heuristic candidate is taken without measuring.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """The constexpr block sizes of one launch, and its warps and pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int = 1

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def launch_kwargs(self) -> dict:
        return {**dict(self.blocks), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def describe(self) -> str:
        sizes = " ".join(f"{k}={v}" for k, v in self.blocks)
        return f"{sizes} warps={self.num_warps} stages={self.num_stages}"


def launch_config(num_warps: int, num_stages: int = 1, **blocks: int) -> LaunchConfig:
    return LaunchConfig(tuple(blocks.items()), num_warps, num_stages)


class Autotuner:
    """Picks and remembers the fastest candidate per key (a cache of measurements, like
    ``triton.autotune``'s own, that only ever changes speed, never results)."""

    def __init__(self, name: str):
        self.name = name
        self._chosen: dict[Hashable, LaunchConfig] = {}
        self._timings: dict[Hashable, dict[str, float | str]] = {}

    def pick(self, key: Hashable, candidates: Sequence[LaunchConfig],
             measure: Callable[[LaunchConfig], float], tune: bool) -> LaunchConfig:
        """The configuration for ``key``: the cached choice, else (``tune`` and several
        candidates) the one ``measure`` finds fastest, else the first (heuristic) candidate.
        A candidate that fails to compile or launch (e.g. out of shared memory) is skipped; when
        every one fails, the first error is raised."""
        if key in self._chosen:
            return self._chosen[key]
        if not tune or len(candidates) == 1:
            return candidates[0]
        timings: dict[LaunchConfig, float] = {}
        errors: list[Exception] = []
        for cfg in candidates:
            try:
                timings[cfg] = float(measure(cfg))
            except Exception as err:  # noqa: BLE001  (a config the compiler or the card refuses)
                errors.append(err)
                self._timings.setdefault(key, {})[cfg.describe()] = f"{type(err).__name__}: {err}"[:200]
        if not timings:
            raise errors[0]
        best = min(timings, key=timings.get)
        self._chosen[key] = best
        self._timings.setdefault(key, {}).update({cfg.describe(): ms for cfg, ms in timings.items()})
        return best

    def chosen(self, key: Hashable) -> LaunchConfig | None:
        """The measured choice for ``key`` (None when it was not tuned)."""
        return self._chosen.get(key)

    def report(self) -> list[dict]:
        """One entry per tuned key: the key, the chosen configuration and every candidate's
        time in ms (or its error)."""
        return [{"kernel": self.name, "key": repr(key), "chosen": cfg.describe(),
                 "candidates_ms": dict(self._timings.get(key, {}))} for key, cfg in self._chosen.items()]

    def clear(self) -> None:
        self._chosen.clear()
        self._timings.clear()
