"""Memory techniques as named settings: per-step checkpointing (nested with sub-blocks) keeps
memory flat in K, every policy computes the same gradients, activation offload round-trips,
frozen models move on demand."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.memory.accounting import record_saved  # noqa: E402
from fastvader.memory.offload import ActivationOffloader, FrozenPlacement, grad_step_wrapper  # noqa: E402
from fastvader.memory.tiny import tiny_toy_config  # noqa: E402

torch.set_num_threads(1)  # these machines are shared: one thread avoids oversubscription


def _trainer(tmp_path, policy, **memory):
    from fastvader.training.trainer import Trainer

    cfg = tiny_toy_config(tmp_path, sampler={"steps": 5}, memory={"checkpointing": policy, **memory})
    return Trainer(cfg)


def _kept_bytes(trainer, k):
    """Bytes the graph keeps after sampling with K grad steps (one prompt)."""
    embeds = trainer.prompt_cache(["a red ball"])
    noise = trainer.sampler.initial_noise(1, trainer.latent_shape, torch.Generator().manual_seed(0), "cpu")
    with record_saved([trainer.backbone]) as log:
        trainer.sampler.sample(embeds, noise, grad_steps=k)
    return log.total


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    out = {}
    for policy in ("sub_block", "step"):
        trainer = _trainer(tmp_path_factory.mktemp(policy), policy)
        out[policy] = {k: _kept_bytes(trainer, k) for k in (1, 4)}
        trainer.close()
    return out


def test_step_checkpointing_keeps_memory_flat_in_k(kept):
    step, sub = kept["step"], kept["sub_block"]
    latent = 4 * 4 * 4 * 4 * 4  # one latent (C=4, F=4, 4x4) in fp32: what a checkpointed step keeps
    assert step[1] < sub[1] / 10
    # three more steps: a couple of latents each (the step's input and the scheduler's update)
    assert step[4] - step[1] <= 3 * 3 * latent
    assert sub[4] > 3.5 * sub[1]  # sub-block inputs of every step stay alive
    assert sub[4] - sub[1] > 20 * (step[4] - step[1])


def _lora_grads(trainer):
    torch.manual_seed(0)
    reward, _ = trainer.forward_reward(["a red ball", "a dog runs"], {}, None)
    grads = torch.autograd.grad(-reward.mean(), trainer.lora_params)
    return torch.cat([g.flatten() for g in grads])


def test_every_policy_gives_the_same_gradients(tmp_path):
    grads = {}
    for policy in ("none", "block", "sub_block", "step"):
        trainer = _trainer(tmp_path / policy, policy, frozen_placement="on_demand")
        trainer.generator.manual_seed(3)
        grads[policy] = _lora_grads(trainer)
        if policy == "step":  # the same again with activations offloaded (CPU stands in for the GPU)
            trainer.sampler.grad_step_wrapper = grad_step_wrapper("step", True, offload_devices=("cpu",))
            trainer.generator.manual_seed(3)
            grads["step+offload"] = _lora_grads(trainer)
        trainer.close()
    assert grads["none"].abs().sum() > 0
    for policy, g in grads.items():
        torch.testing.assert_close(g, grads["none"], rtol=1e-4, atol=1e-7, msg=policy)


def test_activation_offloader_moves_saved_tensors_and_gradients_match():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)

    def f():
        return torch.tanh(torch.tanh(x @ w) @ w).square().sum()

    ref = torch.autograd.grad(f(), w)[0]
    seen_by_self_check = Counter()  # one stats object shared by several offloaders adds up
    for _ in range(2):
        offloader = ActivationOffloader(devices=("cpu",), min_bytes=1024, stats=seen_by_self_check)
        with offloader:
            y = f()
        got = torch.autograd.grad(y, w)[0]
        torch.testing.assert_close(got, ref)
    alone = ActivationOffloader(devices=("cpu",), min_bytes=1024)
    with alone:
        f()
    assert alone.stats["tensors"] >= 3  # x@w input, two tanh outputs, ...
    assert alone.stats["bytes"] >= 3 * 32 * 64 * 4
    assert seen_by_self_check == Counter({k: 2 * v for k, v in alone.stats.items()})


def test_offloader_leaves_small_tensors_and_other_devices_alone():
    x = torch.randn(8, requires_grad=True)
    offloader = ActivationOffloader(devices=("cuda",))
    with offloader:
        torch.sigmoid(x).sum().backward()
    assert offloader.stats["tensors"] == 0


def test_frozen_models_move_on_demand(monkeypatch):
    moves = []
    mods = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)]
    for i, m in enumerate(mods):  # record moves instead of making them (no GPU here)
        monkeypatch.setattr(m, "to", lambda where, i=i, m=m: (moves.append((i, str(where))), m)[1])
    placement = FrozenPlacement(mods, "cuda:0", "on_demand")
    assert moves == [(0, "cpu"), (1, "cpu")] and not placement.loaded
    moves.clear()
    with placement.resident():
        assert moves == [(0, "cuda:0"), (1, "cuda:0")]
        placement.load()  # idempotent
        assert len(moves) == 2
    assert moves[2:] == [(0, "cpu"), (1, "cpu")]
    moves.clear()
    resident = FrozenPlacement(mods, "cuda:0", "resident")
    resident.load(), resident.park()
    assert moves == []  # resident never moves anything
    assert not FrozenPlacement(mods, "cpu", "on_demand").enabled  # nothing to gain on a CPU


def test_step_wrapper_is_none_without_a_technique():
    assert grad_step_wrapper("sub_block", False) is None
    assert grad_step_wrapper("step", False) is not None
    assert grad_step_wrapper("none", True) is not None
