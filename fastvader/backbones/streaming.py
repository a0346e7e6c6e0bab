"""Building big models without holding them twice in host memory.

A model is built as a skeleton (parameters on the meta device, buffers real: accelerate's
``init_empty_weights``), its Linear layers turned into fp8 layers when the run stores them in fp8
(:class:`fastvader.memory.fp8.Fp8Storage`), and then filled tensor by tensor:

- :func:`load_streaming` reads a (sharded) safetensors checkpoint one tensor at a time, casts it
  to the target dtype or quantises it to fp8 on the way, and puts it in place. Peak host memory
  is the finished model plus about one tensor (in the file's dtype) and its cast; reading the
  whole state dict first and then the model (what ``from_pretrained`` + a later fp8 cast does)
  holds both. Tensors are read with plain file reads, not a memory map: mapped file pages count
  in the process's resident memory until the whole file is unmapped.
- :func:`materialize_random` gives a skeleton random weights module by module (each module's own
  ``reset_parameters``), for benchmarks of models too big to build whole in fp32.
"""
from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from fastvader.backbones._weights import (CheckpointMismatchError, MissingWeightsError, check_state_dict,
                                          materialize_meta_tensors)
from fastvader.memory.fp8 import Fp8Linear, Fp8Storage

#: the dtype names of the safetensors format
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """One ``.safetensors`` file, read one tensor at a time (format: an 8-byte little-endian header
    length, a JSON header of name -> dtype, shape, byte offsets, then the data)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + length

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self.header[name]["data_offsets"]
        return end - begin

    def read(self, name: str, file=None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` on the CPU (``file``: this file, already open), in its own memory or,
        with ``into`` (a uint8 buffer at least its size), in the start of that buffer."""
        if file is None:
            with open(self.path, "rb") as f:
                return self.read(name, f, into)
        entry = self.header[name]
        size = self.nbytes(name)
        data = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
        file.seek(self.data_start + entry["data_offsets"][0])
        file.readinto(memoryview(data.numpy()))
        return data.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def in_file_order(self) -> list[str]:
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])


# ---------------------------------------------------------------------------------------------
# finding the files
# ---------------------------------------------------------------------------------------------
def checkpoint_files(location: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, for a file, a folder or a hub folder.

    ``location``: a ``.safetensors`` file, an index (``*.safetensors.index.json``), or a folder
    holding one of ``names`` (index names first, e.g. ``diffusion_pytorch_model.safetensors.index.json``)."""
    path = Path(os.path.expanduser(str(location)))
    if path.is_dir():
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise MissingWeightsError(f"no safetensors weights in {path}: expected one of {names}")
        path = found
    if not path.is_file():
        raise MissingWeightsError(f"{path} is not a safetensors file, index or folder")
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return {name: path.parent / shard for name, shard in weight_map.items()}
    return {name: path for name in SafetensorsReader(path).header}


def hub_checkpoint_files(hub_id: str, subfolder: str, names: list[str], local_files_only: bool = False) -> dict[str, Path]:
    """:func:`checkpoint_files` of a hub repository's subfolder: its index, then each shard, downloaded
    (or found in the local cache) one file at a time."""
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            first = Path(hf_hub_download(hub_id, name, subfolder=subfolder, local_files_only=local_files_only))
        except Exception as err:  # noqa: BLE001 - every hub failure means "not this name"
            errors.append(f"{name}: {type(err).__name__}")
            continue
        files = checkpoint_files(first, [])
        for shard in sorted({p.name for p in files.values()} - {first.name}):
            hf_hub_download(hub_id, shard, subfolder=subfolder, local_files_only=local_files_only)
        return files
    raise MissingWeightsError(f"no safetensors weights in hub {hub_id} ({subfolder}/): tried {'; '.join(errors)}. "
                              "Without network access, download them first or point backbone.pretrained at a "
                              "local folder")


# ---------------------------------------------------------------------------------------------
# filling a skeleton
# ---------------------------------------------------------------------------------------------
def _expected_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """name in a checkpoint of the full-precision model -> (owner, attribute, current tensor).
    An Fp8Linear's ``weight`` is what the file holds as the full-precision weight; its
    ``weight_scale`` is computed, never read."""
    out = {}
    for prefix, owner in module.named_modules():
        persistent = {n: b for n, b in owner._buffers.items() if n not in owner._non_persistent_buffers_set}
        for attr, tensor in {**owner._parameters, **persistent}.items():
            if tensor is None or (isinstance(owner, Fp8Linear) and attr == "weight_scale"):
                continue
            out[f"{prefix}.{attr}" if prefix else attr] = (owner, attr, tensor)
    return out


def _put(owner: nn.Module, attr: str, value: torch.Tensor, dtype: torch.dtype, work: torch.Tensor) -> None:
    """Place a tensor read into a scratch buffer: quantised into an Fp8Linear's weight (through
    ``work``), else copied out, cast to ``dtype`` when floating."""
    if isinstance(owner, Fp8Linear) and attr == "weight":
        owner.load_weight(value, work)
        return
    value = value.to(dtype if value.is_floating_point() else value.dtype, copy=True)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def load_streaming(module: nn.Module, files: Mapping[str, Path], dtype: torch.dtype, *, what: str = "model",
                   progress: bool = True) -> nn.Module:
    """Fill ``module`` (a skeleton) from the safetensors ``files`` (name -> file) one tensor at a
    time; names and shapes are checked against the skeleton before anything is read. Each tensor
    is read into one reused buffer and quantised through a second, so that the only memory each
    tensor adds is what the model keeps of it (no allocator churn to fragment the heap)."""
    from tqdm.auto import tqdm

    expected = _expected_tensors(module)
    readers = {path: SafetensorsReader(path) for path in set(files.values())}
    shapes = {name: torch.empty(readers[path].shape(name), device="meta") for name, path in files.items()}
    check_state_dict(shapes, {name: tuple(t.shape) for name, (_, _, t) in expected.items()}, family=what,
                     source=str(next(iter(readers), "the checkpoint")))
    by_file = defaultdict(list)
    for name, path in files.items():
        by_file[path].append(name)
    largest = max((readers[path].nbytes(name) for name, path in files.items()), default=0)
    largest_numel = max((t.numel() for _, _, t in expected.values()), default=0)
    scratch, work = torch.empty(largest, dtype=torch.uint8), torch.empty(4 * largest_numel, dtype=torch.uint8)
    with tqdm(total=len(files), desc=f"loading {what}", unit="tensor", disable=not progress) as bar:
        for path, names in by_file.items():
            reader, wanted = readers[path], set(names)
            with open(path, "rb") as f:
                for name in (n for n in reader.in_file_order() if n in wanted):
                    owner, attr, _ = expected[name]
                    _put(owner, attr, reader.read(name, f, scratch), dtype, work)
                    bar.update(1)
    _check_complete(module, what)
    return module


def _check_complete(module: nn.Module, what: str) -> None:
    left = materialize_meta_tensors(module)
    if left:
        raise CheckpointMismatchError(f"{what}: {len(left)} tensors were not filled: {left[:8]}")


def _default_init(module: nn.Module) -> None:
    """For modules without ``reset_parameters`` (parameters created directly, e.g. Wan's
    ``scale_shift_table`` or an RMSNorm weight): norm weights 1, biases 0, others N(0, 1/dim)."""
    is_norm = "norm" in type(module).__name__.lower()
    for name, p in module.named_parameters(recurse=False):
        if is_norm or name == "bias":
            p.data.fill_(1.0 if is_norm and name != "bias" else 0.0)
        else:
            p.data.normal_(0.0, p.shape[-1] ** -0.5)


def materialize_random(module: nn.Module, dtype: torch.dtype, *, seed: int = 0, progress: bool = True,
                       what: str = "model") -> nn.Module:
    """Random weights for a skeleton, one module at a time: ``to_empty`` on the CPU, the module's
    own ``reset_parameters`` (fp8 layers quantise theirs), then cast to ``dtype``."""
    from tqdm.auto import tqdm

    def has_meta(m: nn.Module) -> bool:
        return any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])

    pending = [m for m in module.modules() if has_meta(m)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for leaf in tqdm(pending, desc=f"random {what}", unit="module", disable=not progress):
            leaf.to_empty(device="cpu", recurse=False)
            if hasattr(leaf, "reset_parameters"):
                leaf.reset_parameters()
            else:
                _default_init(leaf)
            leaf._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    _check_complete(module, what)
    return module


def skeleton(build: Callable[[], nn.Module], storage: Fp8Storage | None) -> nn.Module:
    """``build()`` with its parameters on the meta device (buffers real), fp8 layers in place when
    ``storage`` asks for them."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build()
    if storage is not None:
        storage.convert(module)
    return module


def streamed_from_random(build: Callable[[], nn.Module], dtype: torch.dtype, storage: Fp8Storage | None, *,
                         seed: int = 0, what: str = "model") -> nn.Module:
    return materialize_random(skeleton(build, storage), dtype, seed=seed, what=what)


def streamed_from_files(build: Callable[[], nn.Module], files: Mapping[str, Path], dtype: torch.dtype,
                        storage: Fp8Storage | None, *, what: str = "model") -> nn.Module:
    return load_streaming(skeleton(build, storage), files, dtype, what=what)
