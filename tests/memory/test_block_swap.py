"""Block swap: outputs and gradients bit-identical to the resident model (fp32, the same model
object) under every checkpointing policy, with the recomputation in backward swapping the blocks
in again; prefetch in both directions; nothing runs on the placeholders; exact undo; the
Trainer with fp8 weights and block swap on a CPU."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvader.memory.block_swap import BlockSwap, last_blocks, transformer_blocks  # noqa: E402
from fastvader.memory.checkpointing import enable_checkpointing, step_checkpoint  # noqa: E402
from fastvader.memory.fp8 import Fp8Storage  # noqa: E402

torch.set_num_threads(1)


def _model(fp8: bool = False):
    """A tiny Wan transformer with 4 blocks and LoRA (random A and B: every factor gets a gradient)."""
    from diffusers import WanTransformer3DModel

    from fastvader.backbones.wan import TINY_TRANSFORMER
    from fastvader.lora import add_lora

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 4}).eval().requires_grad_(False)
    if fp8:
        Fp8Storage().convert(model)
    lora = add_lora(model, 4, 4.0, target_modules=["to_q", "to_v", "ffn.net.2"], init_weights=False)
    return model, lora


def _step(model, lora, policy: str):
    """One gradient-carrying call as the sampler makes it (per-step checkpointing wraps the call)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=g).requires_grad_(True)
    context = torch.randn(1, 5, 16, generator=g)

    def call(latents, t):
        return model(latents, t, context, return_dict=False)[0]

    fn = step_checkpoint(call) if policy == "step" else call
    out = fn(x, torch.tensor([500]))
    out.square().mean().backward()
    grads = [x.grad] + [p.grad.clone() for p in lora]
    for p in lora:
        p.grad = None
    return out.detach(), grads


#: swap-ins per gradient step with 2 swapped blocks: the forward, plus one per recomputation level
SWAP_INS = {"none": 2, "block": 4, "sub_block": 4, "step": 6}


@pytest.mark.parametrize("policy,swap_first", [("none", False), ("block", False), ("sub_block", False),
                                               ("sub_block", True), ("step", False)])
def test_outputs_and_gradients_are_bit_identical_to_the_resident_model(policy, swap_first):
    model, lora = _model()
    if swap_first:  # installed before the checkpoint wrappers, it still sits beneath them
        swap = BlockSwap(transformer_blocks(model), last_blocks(4, 2))
    wrappers = enable_checkpointing(model, policy)
    if swap_first:
        swap.revert()
    resident_out, resident_grads = _step(model, lora, policy)
    swap = BlockSwap(transformer_blocks(model), last_blocks(4, 2))
    swapped_out, swapped_grads = _step(model, lora, policy)
    assert swap.stats["swap_ins"] == SWAP_INS[policy]
    assert torch.equal(resident_out, swapped_out)
    assert all(torch.equal(a, b) for a, b in zip(resident_grads, swapped_grads))
    swap.revert()
    wrappers.revert()


def test_fp8_blocks_swap_too():
    model, lora = _model(fp8=True)
    wrappers = enable_checkpointing(model, "sub_block")
    resident = _step(model, lora, "sub_block")
    swap = BlockSwap(transformer_blocks(model), [1, 3])
    swapped = _step(model, lora, "sub_block")
    assert torch.equal(resident[0], swapped[0]) and all(torch.equal(a, b) for a, b in zip(resident[1], swapped[1]))
    swap.revert()
    wrappers.revert()


def test_prefetch_follows_the_direction_blocks_run_in():
    model, lora = _model()
    wrappers = enable_checkpointing(model, "sub_block")
    swap = BlockSwap(transformer_blocks(model), last_blocks(4, 3))
    with torch.no_grad():  # the rollout: block 0 prefetches 1, 1 prefetches 2, 2 prefetches 3
        g = torch.Generator().manual_seed(1)
        model(torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 16, generator=g))
    assert swap.stats["swap_ins"] == 3 and swap.stats["prefetched"] == 3
    swap.stats.clear()
    _step(model, lora, "sub_block")  # forward 1, 2, 3; backward recomputes 3, 2, 1
    assert swap.stats["swap_ins"] == 6 and swap.stats["prefetched"] == 6
    swap.revert()
    wrappers.revert()


def test_swapped_blocks_hold_nothing_and_revert_restores_them_exactly():
    model, _ = _model()
    block = transformer_blocks(model)[3]
    before = {name: (p, p.detach().clone()) for name, p in block.named_parameters() if not p.requires_grad}
    swap = BlockSwap(transformer_blocks(model), [3])
    assert swap.host_bytes == sum(v.numel() * 4 for _, v in before.values())
    assert all(p.numel() == 0 for name, p in block.named_parameters() if name in before)
    with pytest.raises(RuntimeError):  # the class forward, bypassing the swap, finds no weights
        type(block).forward(block, torch.randn(1, 8, 24), torch.randn(1, 5, 24), torch.randn(1, 6, 24),
                            (torch.randn(1, 8, 1, 12), torch.randn(1, 8, 1, 12)))
    swap.revert()
    after = dict(block.named_parameters())
    assert all(after[name] is p and torch.equal(p, value) for name, (p, value) in before.items())
    assert "forward" not in block.__dict__ and "_fastvader_layers" not in block.__dict__


def test_trainer_with_fp8_and_block_swap_matches_fp8_without_swap(tmp_path):
    """Two CPU trainers, fp8 weights, one swapping 1 of the tiny Wan's 2 blocks: the same LoRA
    after a step. A backbone passed in is converted, and restored by close()."""
    from fastvader.backbones import build_backbone
    from fastvader.config import load_config
    from fastvader.memory.fp8 import Fp8Linear
    from fastvader.training.trainer import Trainer

    root = Path(__file__).resolve().parents[2]
    results = []
    for swap in (0, 1):
        cfg = load_config(root / "configs" / "tiny_wan.yaml", [
            f"train.output_dir={tmp_path}", "memory.fp8_weights=true", f"memory.block_swap={swap}",
            "memory.checkpointing=sub_block", "train.steps=1"])
        backbone = build_backbone(cfg.backbone)
        trainer = Trainer(cfg, backbone=backbone)
        assert isinstance(backbone.denoiser.blocks[1].attn1.to_q.base_layer, Fp8Linear)
        assert (trainer.frozen_weights.block_swap is not None) == bool(swap)
        trainer.train_step()
        results.append([p.detach().clone() for p in trainer.lora_params])
        trainer.close()
        assert type(backbone.denoiser.blocks[1].attn1.to_q.base_layer) is torch.nn.Linear
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_sampling_builds_fp8_and_swaps_blocks_as_training_does(tmp_path):
    """`fastvader sample`/`eval` (VideoPipeline) honour memory.fp8_weights and block_swap: the
    denoiser holds fp8 layers, one block waits on the host, and the videos match the resident
    fp8 model's."""
    from fastvader.config import load_config
    from fastvader.inference import VideoPipeline
    from fastvader.memory.fp8 import Fp8Linear

    root = Path(__file__).resolve().parents[2]
    videos = []
    for swap in (0, 1):
        cfg = load_config(root / "configs" / "tiny_wan.yaml", [
            f"train.output_dir={tmp_path}", "memory.fp8_weights=true", f"memory.block_swap={swap}"])
        pipe = VideoPipeline(cfg, with_reward=False)
        assert isinstance(pipe.backbone.denoiser.blocks[1].attn1.to_q, Fp8Linear)
        assert (pipe.frozen_weights.block_swap is not None) == bool(swap)
        videos.append(pipe.sample(["a red ball"], seed=0))
    torch.testing.assert_close(videos[1], videos[0], rtol=1e-5, atol=1e-5)
