"""Hub ids without a network: fail at once, in one line, saying to pass a local folder.

Asked for a file the cache lacks while the Hub is unreachable, huggingface_hub retries for about
25 seconds and then raises a message that names neither the config field nor a way out. Before a
model that may come from the Hub is built, :func:`hub_or_cache` checks that the Hub answers (one
TCP connection, a few seconds at most; ``HF_HUB_OFFLINE=1`` skips it). When it does not, the
build runs in huggingface_hub's offline mode, where files come from the local cache or not at
all, and a model that is not cached ends in :class:`~fastvader.errors.HubUnreachableError`
naming the field and what to do.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

from fastvader.errors import HubUnreachableError

#: seconds to wait for the Hub (or the proxy) to accept a connection
CONNECT_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


def _offline_by_choice() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE in the environment, or huggingface_hub's flag
    (read from them at its import, or set by the program)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_reason(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be used now (None when it answers): offline mode is set, or the Hub
    (or the HTTPS proxy, when one is configured) does not accept a connection in ``timeout``."""
    if _offline_by_choice():
        return "HF_HUB_OFFLINE is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"the Hub ({'proxy ' if proxy else ''}{host}:{port}) cannot be reached ({err.strerror or err})"


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """huggingface_hub's offline mode for the block (read at call time by huggingface_hub and
    transformers), restored afterwards."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _is_local(source: str | None) -> bool:
    return source is not None and (os.path.exists(os.path.expanduser(source)) or source.startswith((".", "/", "~")))


@contextlib.contextmanager
def hub_or_cache(sources: dict[str, str | None]) -> Iterator[None]:
    """Build models that ``sources`` (config field -> its value; None for the family's default
    hub id) may fetch from the Hub: from the local cache alone, failing in one line, when the Hub
    is unreachable. Nothing is checked when every source is a local path (or there is none)."""
    remote = {field: source for field, source in sources.items() if not _is_local(source)}
    reason = unreachable_reason() if remote else None
    if reason is None:
        yield
        return
    try:
        with _offline_mode():
            yield
    except OSError as err:  # a file the cache lacks (huggingface_hub's, diffusers', transformers' and ours)
        field, source = next(iter(remote.items()))
        shown = f"{field}={source!r}" if source else f"{field} (unset: the default hub id)"
        raise HubUnreachableError(
            f"{shown}: {reason}, and the model is not in the local Hugging Face cache; pass a local folder "
            f"as {field} (download it where the Hub is reachable: huggingface-cli download "
            f"{source or '<hub id>'} --local-dir DIR)") from err
