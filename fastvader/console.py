"""What fastvader shows a person while it works: progress bars on anything slow, its own warnings
as one readable line, and third-party noise kept off the screen.

Progress bars go to stderr (so ``--json`` output stays clean) and only to a terminal: tqdm's
``disable=None`` switches them off when stderr is a file or a pipe, as in CI logs and tests.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

#: third-party warnings about their own internals that a fastvader user can do nothing about
_NOISY_WARNINGS = (
    r"The `local_dir_use_symlinks` argument is deprecated",  # diffusers' hub downloads pass it
)
#: bitsandbytes >= 0.49 probes the Hub's ``kernels`` package for a CPU 4-bit GEMM whenever it is
#: imported (peft and diffusers import it when installed), and logs this line when the probe fails.
#: fastvader never runs 4-bit GEMMs, so the line only ever misleads.
_NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),)


def progress(iterable: Iterable[T], desc: str, *, enabled: bool = True, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    """``iterable`` with a tqdm bar on a terminal (none when ``enabled`` is False or stderr is
    not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def stage(desc: str, *, enabled: bool = True) -> Iterator[None]:
    """A one-step bar for work that cannot count its own progress (loading a model, measuring
    on the meta device): the terminal shows what runs and for how long."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=desc, disable=None if enabled else True, dynamic_ncols=True,
               bar_format="{desc}: {elapsed}", leave=False)
    done = threading.Event()
    if not bar.disable:  # tqdm redraws only when told: a ticker keeps the elapsed time moving
        threading.Thread(target=lambda: [bar.refresh() for _ in iter(lambda: done.wait(1.0), True)],
                         daemon=True).start()
    try:
        yield
        bar.update(1)
    finally:
        done.set()
        bar.close()


class _DropLines(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party_noise() -> None:
    """Keep known-harmless third-party log lines (``_NOISE``) off the screen. Idempotent: a
    logger gets one filter per line, however often this runs."""
    for logger_name, prefix in _NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropLines) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropLines(prefix))


@contextlib.contextmanager
def readable_warnings() -> Iterator[None]:
    """fastvader's own warnings (messages starting with "fastvader") print as the message alone,
    without the source line Python adds; known third-party noise is dropped; other warnings
    print as usual."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("fastvader"):
            print(str(message), file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = shown
