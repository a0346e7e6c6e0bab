"""The errors that mean "the user can fix this": a config value, a file, a device, a model that
cannot be reached. Each message names the field, file or value and says what to do; the
``fastvader`` command prints it in one line and exits with status 2 (``--debug`` or
``FASTVADER_DEBUG=1`` shows the traceback instead).

Anything else that escapes a command is a bug, reported as one too."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. The message is complete on its own: what is wrong (the field,
    file or value) and what to do."""


class LoraFileError(UserError, ValueError):
    """A LoRA file that cannot be read, or that does not fit the model it is loaded into."""


class HubUnreachableError(UserError, OSError):
    """A hub id that is neither in the local Hugging Face cache nor reachable."""


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of spaces folded to single spaces."""
    return " ".join(str(message).split())
