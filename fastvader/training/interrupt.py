"""Ctrl-C and SIGTERM during training: the first one asks the run to stop after the step in
progress (the trainer then writes a checkpoint, the LoRA and summary.json with status
"interrupted" and raises :class:`RunInterrupted`); a second one quits at once."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the exit status of a command stopped by Ctrl-C (128 + SIGINT), whichever signal stopped it
EXIT_INTERRUPTED = 130


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its work; ``summary`` is what summary.json holds."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


class StopRequests:
    """A context manager: while it is active, SIGINT and SIGTERM set :attr:`signal_name` instead of
    raising, and a second signal raises KeyboardInterrupt at once. Handlers are installed only in
    the main thread (Python delivers signals there) and the previous ones come back on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            print(f"\nfastvader: {name} received: finishing the current step, then saving a checkpoint, the LoRA "
                  "and the summary. Press Ctrl-C again to quit at once (the step in progress is then lost; "
                  "the last checkpoint is kept).", file=sys.stderr, flush=True)
            return
        self._restore()
        raise KeyboardInterrupt(f"second {name}: quit at once; the last complete checkpoint is kept")
