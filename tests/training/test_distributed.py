"""Two CPU processes (gloo, launched by torchrun) train 3 steps of the toy backbone: both ranks
end with identical LoRA weights, equal to one process training the same global batch."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.memory.zero import _SINGLE_PROCESS as SINGLE_PROCESS_MARK  # noqa: E402
from fastvader.training.draws import BatchDraws  # noqa: E402

WORKER = '''
import json, os, sys
import torch
torch.set_num_threads(1)
from fastvader.lora import lora_state_dict
from fastvader.memory.tiny import tiny_toy_config
from fastvader.training.trainer import Trainer

out, batch, name, options = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
resume = options.pop("resume", None)
cfg = tiny_toy_config(out, train={"steps": 3, "batch_size": batch, "run_name": name, **options.pop("train", {})},
                      optim={"lr": 0.05, "eps": 1.0, "max_grad_norm": 0.0},
                      frames={"reward": "random:2", "grad": "same"}, **options)
trainer = Trainer(cfg, resume=resume)
init = {k: v.clone() for k, v in lora_state_dict(trainer.backbone.denoiser).items()}
summary = trainer.fit()
rank = int(os.environ.get("RANK", "0"))
torch.save({"init": init, "final": lora_state_dict(trainer.backbone.denoiser), "summary": summary},
           os.path.join(out, f"{name}_rank{rank}.pt"))
'''


def _run(tmp_path, nproc, batch, name, **options):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # an in-process ZeRO Trainer of an earlier test leaves its single-process marker in os.environ;
    # inherited, it makes each rank drop the launcher's RANK/WORLD_SIZE and train as rank 0 of 1
    env = {k: v for k, v in os.environ.items() if k != SINGLE_PROCESS_MARK}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(tmp_path), str(batch), name, json.dumps(options)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Three steps of 2 ranks x batch 1, and of 1 process x batch 2 (plain AdamW)."""
    tmp_path = tmp_path_factory.mktemp("plain")
    return {"two": _run(tmp_path, nproc=2, batch=1, name="b1"), "one": _run(tmp_path, nproc=1, batch=2, name="b2")[0],
            "dir": tmp_path}


def _assert_same_moves(finals, init, reference, rtol):
    """Both ranks' LoRA weights (``finals``) are exactly equal, and moved from ``init`` (equal to
    ``reference``'s start) as far as ``reference``'s did, to ``rtol``."""
    assert set(finals[0]) == set(reference["final"])
    moved = 0.0
    for key in finals[0]:
        torch.testing.assert_close(init[key], reference["init"][key], rtol=0, atol=0)  # same start
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=0, atol=0)  # ranks agree exactly
        delta_reference = reference["final"][key] - reference["init"][key]
        torch.testing.assert_close(finals[0][key] - init[key], delta_reference, rtol=rtol, atol=1e-7)
        moved = max(moved, float(delta_reference.abs().max()))
    assert moved > 1e-5  # training changed the weights: the comparison is not between two inits


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(plain):
    r0, r1 = plain["two"]
    _assert_same_moves([r0["final"], r1["final"]], r0["init"], plain["one"], rtol=1e-3)
    # rank 0 logged, validated and wrote the checkpoint; rank 1 only trained
    assert "reward_after" in r0["summary"] and r1["summary"] == {"run": r1["summary"]["run"], "steps": 3, "rank": 1}
    lines = (plain["dir"] / "b1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]


@pytest.mark.slow
def test_two_ranks_under_zero2_save_resume_and_match_plain_adamw(plain, tmp_path):
    """2 ranks under ZeRO-2 train 2 steps and save (each rank its optimizer partition); 2 ranks
    resume from that checkpoint for a third step and land where plain AdamW lands."""
    zero = {"memory": {"zero_stage": 2}, "guards": {"self_check": False}}
    first = _run(tmp_path, nproc=2, batch=1, name="z", train={"steps": 2, "checkpoint_every": 2}, **zero)
    saved = tmp_path / "z" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in saved.iterdir()) == ["config.yaml", "lora.safetensors", "state.pt", "zero_rank0.pt",
                                                       "zero_rank1.pt"]
    resumed = _run(tmp_path, nproc=2, batch=1, name="z", resume=str(tmp_path / "z"), **zero)
    assert resumed[0]["summary"]["steps"] == 3
    _assert_same_moves([r["final"] for r in resumed], first[0]["init"], plain["two"][0], rtol=1e-3)


def test_batch_draws_split_the_global_batch_across_ranks():
    """Rank r of a 2-rank run draws exactly video r of the 1-process batch of 2."""
    whole = BatchDraws.for_step(seed=7, step=3, micro=0, rank=0, batch=2)
    parts = [BatchDraws.for_step(seed=7, step=3, micro=0, rank=r, batch=1) for r in range(2)]
    for r, part in enumerate(parts):
        assert torch.equal(torch.randn(5, generator=part.videos[0]), torch.randn(5, generator=whole.videos[r]))
        assert torch.equal(torch.rand(3, generator=part.shared), torch.rand(3, generator=whole.shared) if r == 0
                           else torch.rand(3, generator=BatchDraws.for_step(7, 3, 0, 0, 2).shared))
    other_step = BatchDraws.for_step(seed=7, step=4, micro=0, rank=0, batch=2)
    assert not torch.equal(torch.randn(5, generator=other_step.videos[0]),
                           torch.randn(5, generator=BatchDraws.for_step(7, 3, 0, 0, 2).videos[0]))


class _TwoRanks:
    """An accelerator as rank 0 of two sees it: ``reduce`` averages with the other rank's buffer."""

    num_processes = 2

    def __init__(self, other_rank: torch.Tensor):
        self.other_rank = other_rank

    def reduce(self, tensor, reduction):
        assert reduction == "mean"
        return (tensor + self.other_rank) / 2


def test_average_gradients_is_one_flat_mean_with_the_finite_flag():
    from fastvader.training.distributed import average_gradients

    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.arange(6.0).view(2, 3)  # params[1] got no gradient on this rank
    other = torch.cat([torch.ones(6), torch.full((4,), 2.0), torch.zeros(1)])  # finite on the other rank
    assert average_gradients(_TwoRanks(other), params, finite=True)
    torch.testing.assert_close(params[0].grad, (torch.arange(6.0).view(2, 3) + 1) / 2)
    torch.testing.assert_close(params[1].grad, torch.ones(4))
    # a NaN/Inf loss on either rank makes both skip: the flag rides in the same buffer
    assert not average_gradients(_TwoRanks(other), params, finite=False)
    assert not average_gradients(_TwoRanks(torch.cat([other[:-1], torch.ones(1)])), params, finite=True)


@pytest.mark.slow
def test_each_trainer_of_a_process_gets_its_own_accelerator_settings(tmp_path):
    """accelerate keeps one state per process: a bf16 run with accumulation, then an fp32 run, then
    bf16 again build and train in one process, each with its own precision and accumulation."""
    from fastvader.config import ConfigError
    from fastvader.memory.tiny import tiny_toy_config
    from fastvader.training.trainer import Trainer

    for precision, accum in (("bf16", 2), ("fp32", 1), ("bf16", 1)):
        trainer = Trainer(tiny_toy_config(tmp_path / precision, train={"precision": precision},
                                          optim={"grad_accum": accum}))
        assert trainer.accelerator.gradient_accumulation_steps == accum
        seen = []
        hook = trainer.backbone.denoiser.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
        assert not trainer.train_step().skipped
        hook.remove()
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}  # the accelerator's autocast
        trainer.close()
    with pytest.raises(ConfigError, match="train.precision='fp16' needs a CUDA device"):
        Trainer(tiny_toy_config(tmp_path / "fp16", train={"precision": "fp16"}))
