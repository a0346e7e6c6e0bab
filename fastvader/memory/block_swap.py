"""Block swap (``memory.block_swap``): some of the denoiser's transformer blocks keep their frozen
weights in (pinned) host memory and bring them onto the GPU only while they run.

Before a swapped block runs, its weights are on the GPU: the copy was started on a side CUDA
stream while the block before it computed (prefetch), and the compute stream waits for it. After
the block, the GPU copies are dropped (the base weights are frozen: nothing to send back). This
holds for every call of the block's forward: the no-grad rollout, the gradient-carrying steps,
and the recomputation in backward under activation checkpointing, because the swap sits in the
block's ``forward`` *beneath* the checkpoint wrapper, which calls it again to recompute. The
prefetch follows the direction blocks run in: forward in a denoiser call, backward through the
checkpointed blocks during backward.

Gradients through a swapped block: under checkpointing (``block``, ``sub_block``, ``step``) a
block's GPU copy lives only while the block runs or is recomputed; without checkpointing
(``none``) autograd keeps every swapped block's GPU copy until backward (the planner counts it).

How the model changes, all through :class:`fastvader.patching.core.Patches` (``revert()`` undoes it):
each block's ``forward`` (a replacement beneath any wrappers), and each frozen parameter or buffer
of a swapped block, whose entry holds an empty placeholder of its dtype and device meanwhile. The
original parameter objects hold the host copies; ``revert()`` puts them back, their data moved to
where the placeholders are then (bit-identical values). A forward that ran without its weights
would fail on the empty placeholders: nothing silently runs on stale weights. The placeholders
follow ``Module.to``, so blocks may be swapped out before the model moves to the GPU (a model
larger than the card never has to fit on it), and the copies go where the placeholder is.

On a CPU (tests) the same path runs: host and device are both the CPU, copies are plain copies.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from fastvader.patching.core import InstanceAttr, ModuleTensor, Patches

#: the attributes under which denoisers keep their repeated transformer blocks
BLOCK_LIST_ATTRS = ("blocks", "transformer_blocks")


def transformer_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's repeated transformer blocks in the order they run (Wan's ``blocks``,
    Open-Sora's spatial/temporal pairs, CogVideoX's ``transformer_blocks``); [] for UNets."""
    for attr in BLOCK_LIST_ATTRS:
        blocks = getattr(denoiser, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    return []


def last_blocks(num_blocks: int, count: int) -> list[int]:
    """The indices of the last ``count`` of ``num_blocks`` blocks (the default choice: the
    prefetch of the first swapped block then hides behind every resident block before it)."""
    if not 0 <= count <= num_blocks:
        raise ValueError(f"memory.block_swap={count}: the denoiser has {num_blocks} transformer blocks; "
                         f"swap between 0 and {num_blocks}")
    return list(range(num_blocks - count, num_blocks))


def frozen_tensors(block: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of each frozen parameter and buffer of ``block`` (trainable ones,
    such as LoRA, stay where they are), each tensor once."""
    seen: set[int] = set()
    for module in block.modules():
        entries = [(n, p) for n, p in module._parameters.items() if p is not None and not p.requires_grad]
        entries += [(n, b) for n, b in module._buffers.items() if b is not None]
        for name, tensor in entries:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield module, name, tensor


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty


class _SwappedTensor:
    """One frozen tensor of a swapped block: its slot, and the original object holding the host copy."""

    def __init__(self, slot: ModuleTensor, original: torch.Tensor):
        self.slot, self.original = slot, original

    def copy_to_placeholder(self, placeholder: torch.Tensor) -> torch.Tensor:
        """A copy of the host tensor on the placeholder's device, in its dtype: a plain tensor, so
        that memory accounting and activation offload see a copy autograd keeps for what it is."""
        return self.original.detach().to(device=placeholder.device, dtype=placeholder.dtype, non_blocking=True,
                                         copy=True)


class _BlockForward:
    """The forward of block ``index``: bring its weights (and prefetch the next swapped block's),
    run what lies beneath (``below``: the class forward, or another patch's), put the
    placeholders back. Every block gets one, so a resident block can start the prefetch of the
    swapped block after it."""

    def __init__(self, swap: "BlockSwap", index: int):
        self.swap, self.index = swap, index
        self.below = None  # set once the layer is installed

    def __call__(self, *args, **kwargs):
        tensors = self.swap.swapped_tensors(self.index)
        resting = [t.slot.read() for t in tensors]
        copies = self.swap.bring(self.index, resting)
        try:
            for tensor, copy in zip(tensors, copies):
                tensor.slot.write(copy)
            return self.below()(*args, **kwargs)
        finally:
            for tensor, placeholder in zip(tensors, resting):
                tensor.slot.write(placeholder)


class BlockSwap:
    """Swap the blocks ``swapped`` (indices into ``blocks``) between host and device memory.

    ``pin_memory``: keep the host copies in page-locked memory (on a CUDA machine: the copies to
    the GPU are then asynchronous). ``host``: where the weights wait ("cpu"; the planner uses
    "meta" to measure on the meta device). ``stats`` counts swap-ins, prefetched ones and bytes.
    """

    def __init__(self, blocks: Sequence[nn.Module], swapped: Iterable[int], *, pin_memory: bool = False,
                 host: str = "cpu"):
        self.blocks = list(blocks)
        self.swapped = sorted(set(swapped))
        bad = [i for i in self.swapped if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"block indices {bad} are outside the {len(self.blocks)} transformer blocks")
        self.host = torch.device(host)
        self.stats: Counter = Counter()
        self.patches = Patches()
        self._tensors: dict[int, list[_SwappedTensor]] = {}
        self._prefetched: tuple[int, list[torch.Tensor], object] | None = None
        self._last: int | None = None
        self._step = 1
        self._stream = None
        try:
            for index, block in enumerate(self.blocks):
                forward = _BlockForward(self, index)
                forward.below = self.patches.replace(InstanceAttr(block, "forward"), forward).below
            for index in self.swapped:
                self._tensors[index] = [self._park(module, name, tensor, pin_memory)
                                        for module, name, tensor in list(frozen_tensors(self.blocks[index]))]
        except BaseException:
            self.revert()
            raise

    @property
    def host_bytes(self) -> int:
        """Bytes of the swapped blocks' weights waiting in host memory."""
        return sum(t.original.numel() * t.original.element_size() for ts in self._tensors.values() for t in ts)

    def _park(self, module: nn.Module, name: str, tensor: torch.Tensor, pin_memory: bool) -> _SwappedTensor:
        slot = ModuleTensor(module, name)
        self.patches.replace(slot, _placeholder(tensor))
        if tensor.device != self.host or pin_memory:  # a model still on the CPU gets pinned too
            host = tensor.detach().to(self.host)
            tensor.data = host.pin_memory() if pin_memory else host
        return _SwappedTensor(slot, tensor)

    def swapped_tensors(self, index: int) -> list[_SwappedTensor]:
        return self._tensors.get(index, [])

    # -- moving weights ----------------------------------------------------------------------------
    def _copy(self, index: int, placeholders: list[torch.Tensor], stream=None):
        """Copies of block ``index``'s weights beside its placeholders; on a CUDA side stream
        (returns the event marking their end) or on the current stream (event None)."""
        tensors = self._tensors[index]
        self.stats["bytes"] += sum(t.original.numel() * t.original.element_size() for t in tensors)
        if stream is None:
            return [t.copy_to_placeholder(p) for t, p in zip(tensors, placeholders)], None
        with torch.cuda.stream(stream):
            copies = [t.copy_to_placeholder(p) for t, p in zip(tensors, placeholders)]
            done = torch.cuda.Event()
            done.record(stream)
        return copies, done

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _next_block(self, index: int) -> int:
        """The block that will run after ``index``. A denoiser call runs its blocks first to last;
        backward recomputes them last to first, starting with the block the forward ended on;
        after the last block comes that block again (grad: backward recomputes it first) or the
        first swapped block (no grad: the next call)."""
        last_block = len(self.blocks) - 1
        if index == 0 or self._last is None:
            self._step = 1
        elif index == self._last:
            self._step = -1 if index == last_block else self._step
        else:
            self._step = 1 if index > self._last else -1
        self._last = index
        if self._step == 1 and index == last_block:
            return index if torch.is_grad_enabled() else self.swapped[0]
        return index + self._step

    def bring(self, index: int, placeholders: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``index``'s weights beside ``placeholders`` (the prefetched copy when there is one,
        else copied now), and the prefetch of the block that runs next, replacing a prefetch that
        guessed wrong."""
        upcoming = self._next_block(index)
        copies: list[torch.Tensor] = []
        if index in self._tensors:
            if self._prefetched is not None and self._prefetched[0] == index:
                copies = self._wait(*self._prefetched[1:])
                self._prefetched = None
                self.stats["prefetched"] += 1
            else:
                copies, _ = self._copy(index, placeholders)
            self.stats["swap_ins"] += 1
        if upcoming in self._tensors and (self._prefetched is None or self._prefetched[0] != upcoming):
            self._prefetched = None
            resting = [t.slot.read() for t in self._tensors[upcoming]]
            stream = self._side_stream(resting[0].device) if resting else None
            self._prefetched = (upcoming, *self._copy(upcoming, resting, stream))
        return copies

    @staticmethod
    def _wait(copies: list[torch.Tensor], done) -> list[torch.Tensor]:
        """Make the compute stream wait for a side-stream copy, and keep the copies' memory from
        being reused before the compute stream has finished with them."""
        if done is not None and copies:
            current = torch.cuda.current_stream(copies[0].device)
            current.wait_event(done)
            for copy in copies:
                copy.record_stream(current)
        return copies

    def revert(self) -> int:
        """Put every original tensor back, moved to where its placeholder is now, and the
        blocks' forwards as they were; returns how many replacements were undone."""
        self._prefetched = None
        homes = [(t.original, t.slot.read()) for ts in self._tensors.values() for t in ts]
        count = self.patches.revert()
        for original, placeholder in homes:
            original.data = original.data.to(device=placeholder.device, dtype=placeholder.dtype)
        self._tensors.clear()
        return count
