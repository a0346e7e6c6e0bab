"""Hub ids without a network: the probe that decides, the offline mode it sets only for the
build, and no probe at all for local paths (the one-line error itself is in the CLI error table)."""
from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

from fastvader import hub
from fastvader.errors import HubUnreachableError


def test_offline_mode_by_choice_needs_no_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed although offline"))
    assert hub.unreachable_reason() == "HF_HUB_OFFLINE is set"


def test_an_endpoint_that_refuses_is_unreachable_and_a_listening_one_is_not(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.unreachable_reason() is None
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now
    assert hub.unreachable_reason().startswith(f"the Hub (127.0.0.1:{port}) cannot be reached")


def test_the_build_runs_offline_and_a_miss_is_one_line_naming_the_field(monkeypatch):
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "the Hub (x:443) cannot be reached (refused)")
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(HubUnreachableError) as err:
        with hub.hub_or_cache({"reward.options.aesthetic.pretrained": "org/model"}):
            assert constants.HF_HUB_OFFLINE is True
            raise FileNotFoundError("not in the cache")
    assert constants.HF_HUB_OFFLINE == before
    assert str(err.value).startswith("reward.options.aesthetic.pretrained='org/model': the Hub (x:443) cannot be "
                                     "reached (refused), and the model is not in the local Hugging Face cache; pass "
                                     "a local folder as reward.options.aesthetic.pretrained")
    with hub.hub_or_cache({"backbone.pretrained": None}):  # a cached model builds as usual
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


def test_local_sources_are_never_probed(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "unreachable_reason", lambda: pytest.fail("probed for a local path"))
    with hub.hub_or_cache({"backbone.pretrained": str(tmp_path), "other": "./relative/folder"}):
        pass
    with hub.hub_or_cache({}):
        pass


def test_other_mistakes_made_offline_keep_their_own_message(monkeypatch):
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "the Hub (x:443) cannot be reached (refused)")
    with pytest.raises(ValueError, match="not an option") as err:
        with hub.hub_or_cache({"backbone.pretrained": "org/model"}):
            raise ValueError("reward.options.x.colour is not an option")
    assert not isinstance(err.value, HubUnreachableError)


def test_a_reward_with_random_weights_never_asks_the_hub(monkeypatch):
    from fastvader.config import RewardConfig
    from fastvader.rewards import build_reward
    from tests.rewards.test_registry import TINY_CLIP

    monkeypatch.setattr(hub, "unreachable_reason", lambda: pytest.fail("probed for random weights"))
    options = {"clip_score": {"random_init": True, "config": TINY_CLIP}}
    assert build_reward(RewardConfig(name="clip_score", options=options), progress=False) is not None
