"""A model as its user sees it, to compare before and after fastvader touched it: every module by
path, its instance dict, and the contents of the dicts in it (children, parameters, buffers,
hooks, a replaced ``forward`` or attention processor)."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch.nn as nn

Same = Callable[[Any, Any], bool]


def module_state(module: nn.Module) -> dict[str, tuple[Any, dict | None]]:
    return {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in module.__dict__.items()}


def model_state(model: nn.Module) -> dict[str, tuple[nn.Module, dict]]:
    return {path: (m, module_state(m)) for path, m in model.named_modules()}


def assert_same_module_state(module: nn.Module, state: dict, same: Same = operator.is_) -> None:
    now = module_state(module)
    assert now.keys() == state.keys(), (type(module).__name__, now.keys() ^ state.keys())
    for key, (value, contents) in state.items():
        assert same(now[key][0], value), (type(module).__name__, key)
        if contents is not None:
            assert now[key][1].keys() == contents.keys(), (type(module).__name__, key)
            assert all(same(now[key][1][k], contents[k]) for k in contents), (type(module).__name__, key)


def assert_restored(model: nn.Module, snapshot: dict, same: Same = operator.is_) -> None:
    """Every module of ``snapshot`` is at its path again (``same`` may accept a wrapper of it),
    with the instance state it had; new paths exist only inside such wrappers."""
    modules = dict(model.named_modules())
    wrapped = [path for path, (before, _) in snapshot.items() if modules.get(path) is not before]
    for path, (before, state) in snapshot.items():
        assert path in modules and same(modules[path], before), path
        assert_same_module_state(before, state, same)
    extra = [p for p in modules if p not in snapshot and not any(p.startswith(w + ".") for w in wrapped)]
    assert not extra, extra[:5]
