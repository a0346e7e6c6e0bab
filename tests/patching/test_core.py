"""The one patching mechanism (fastvader.patching.core) on plain torch modules: what a slot held
is restored exactly, layers of one slot come off in any order, wrappers call what lies beneath
them at call time, and foreign changes are not clobbered."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastvader.patching import core
from fastvader.patching.checkpoint import CheckpointedForward, CheckpointWrappers
from fastvader.patching.core import MISSING, ChildModule, InstanceAttr, Patches
from tests.helpers.snapshot import assert_same_module_state, module_state


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def _tripled(x):
    return 3 * x


def _plus_one(below):
    return lambda x: below()(x) + 1


def test_a_missing_instance_attribute_is_missing_again_after_revert():
    module, x = Doubler(), torch.ones(2)
    state = module_state(module)
    patches = Patches()
    patches.replace(InstanceAttr(module, "forward"), _tripled)
    assert module(x).tolist() == [3.0, 3.0] and "forward" in module.__dict__
    assert patches.revert() == 1
    assert "forward" not in module.__dict__ and module(x).tolist() == [2.0, 2.0]
    assert_same_module_state(module, state)  # no bookkeeping left behind either


def test_an_existing_instance_attribute_and_a_child_come_back_as_the_same_objects():
    parent = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    own_forward = parent.forward
    parent.forward = own_forward  # someone else's instance-level forward (e.g. a hook library)
    state, children = module_state(parent), list(parent._modules.items())
    patches = Patches()
    patches.replace(InstanceAttr(parent, "forward"), _tripled)
    patches.replace(ChildModule(parent, "1"), nn.Identity())
    patches.replace(ChildModule(parent, "extra"), nn.Tanh())  # a child that did not exist
    assert patches.sites == 1 and len(patches.modules) == 3  # one owner; forward, Identity, Tanh changed
    patches.revert()
    assert parent.__dict__["forward"] is own_forward
    assert list(parent._modules.items()) == children  # same objects, same order, no "extra"
    assert_same_module_state(parent, state)


@pytest.mark.parametrize("wrap_first", [False, True])
@pytest.mark.parametrize("revert_wrapper_first", [False, True])
def test_layers_come_off_in_any_order_and_the_wrapper_follows_what_lies_beneath(wrap_first, revert_wrapper_first):
    module, x = Doubler(), torch.ones(1)
    state = module_state(module)
    slot = InstanceAttr(module, "forward")
    kernel, wrapper = Patches(), Patches()
    for step in ((wrapper, kernel) if wrap_first else (kernel, wrapper)):
        if step is kernel:
            kernel.replace(slot, _tripled)
        else:
            wrapper.wrap(slot, _plus_one)
    # whatever the order of patching, the wrapper is outermost and runs the replacement
    assert module(x).item() == 3 * 1 + 1
    assert slot.base() is _tripled

    kept_forward = module.forward  # e.g. held by a caller across the revert
    first, second = (wrapper, kernel) if revert_wrapper_first else (kernel, wrapper)
    first.revert()
    assert module(x).item() == (3 if first is wrapper else 2 + 1)  # the other layer is intact
    second.revert()
    assert module(x).item() == 2
    assert kept_forward(x).item() == 2 + 1  # a wrapper taken off wraps what the module does now
    assert_same_module_state(module, state)


def test_a_change_made_by_other_code_is_left_alone_and_blocks_further_patching():
    module = Doubler()
    patches = Patches()
    patches.replace(InstanceAttr(module, "forward"), _tripled)
    theirs = lambda x: x  # noqa: E731
    module.forward = theirs  # another library patches after fastvader
    with pytest.raises(RuntimeError, match="Doubler.forward was replaced by other code"):
        Patches().replace(InstanceAttr(module, "forward"), _tripled)
    with pytest.warns(UserWarning, match="Doubler.forward was replaced by other code"):
        patches.revert()
    assert module.__dict__["forward"] is theirs
    assert core._LAYERS_ATTR not in module.__dict__


def test_checkpoint_wrappers_count_grad_calls_and_keep_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(3, 4)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    state = [module_state(m) for m in model]
    wrappers = CheckpointWrappers([model[0], model[2]])
    assert all(isinstance(m.forward, CheckpointedForward) for m in (model[0], model[2]))
    with torch.no_grad():
        model(x)
    assert wrappers.hits() == [0, 0]  # no-grad calls are not checkpointed
    model(x).sum().backward()
    assert wrappers.hits() == [1, 1]
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g)
    assert wrappers.revert() == 2
    for m, s in zip(model, state):
        assert_same_module_state(m, s)


def _failing_op(model, patches):
    patches.replace(ChildModule(model, "0"), nn.Identity())
    raise RuntimeError("op failed half way")


def test_apply_undoes_everything_when_an_op_fails(monkeypatch):
    model = nn.Sequential(nn.GroupNorm(1, 2), nn.SiLU())
    first = core.Patch("first", lambda m, patches: patches.replace(ChildModule(m, "1"), nn.Identity()))
    monkeypatch.setattr(core, "PATCHES", {"first": first, "failing": core.Patch("failing", _failing_op)})
    children, state = list(model._modules.items()), module_state(model)
    with pytest.raises(RuntimeError, match="half way"):
        core.apply(model)
    assert list(model._modules.items()) == children and not core.is_patched(model)
    assert_same_module_state(model, state)


def test_two_models_are_patched_and_reverted_independently(monkeypatch):
    swap = core.Patch("swap", lambda m, patches: patches.replace(ChildModule(m, "1"), nn.Identity()))
    monkeypatch.setattr(core, "PATCHES", {"swap": swap})
    a, b = nn.Sequential(nn.Linear(2, 2), nn.SiLU()), nn.Sequential(nn.Linear(2, 2), nn.SiLU())
    silu_a, silu_b = a[1], b[1]
    assert core.apply(a).counts == {"swap": 1} and core.apply(b).total == 1
    with pytest.raises(RuntimeError, match="already patched"):
        core.apply(a)
    assert core.revert(a) == 1 and a[1] is silu_a and isinstance(b[1], nn.Identity)
    assert core.revert(a) == 0  # nothing left to undo
    assert core.revert(b) == 1 and b[1] is silu_b


def test_unknown_ops_are_named():
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['nope'\]; available: .*group_norm"):
        core.apply(nn.Linear(1, 1), ops=["nope"])
    assert MISSING is core.MISSING and "temporal_attention" in core.available_patches()
