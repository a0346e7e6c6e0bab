"""Finding, reading and checking the weight files of the families fastvader implements itself
(VideoCrafter2, Open-Sora): one place for the clear errors the issue asks for.

- :func:`find_weights_file` turns a ``pretrained`` value (a file, a folder, or a Hugging Face
  hub id) into one local file, or raises :class:`MissingWeightsError` listing every place it
  looked.
- :func:`read_state_dict` reads ``.safetensors`` or a pickled torch checkpoint *safely*
  (``torch.load(weights_only=True, mmap=True)``: no arbitrary code runs while unpickling).
- :func:`check_state_dict` compares a state dict with what a module expects (names and shapes)
  and raises :class:`CheckpointMismatchError` naming the first mismatched keys, before
  ``load_state_dict(strict=True)`` would fail with a wall of text.
- :func:`convert_file_to_safetensors` is the one-time conversion of a pickled checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from fastvader import precision

SAFETENSORS_SUFFIXES = (".safetensors",)


class MissingWeightsError(FileNotFoundError):
    """No weight file where the config points. The message lists what was expected and where
    fastvader looked."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the architecture it is loaded into."""


# ---------------------------------------------------------------------------------------------
# finding the file
# ---------------------------------------------------------------------------------------------
def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def find_weights_file(pretrained: str | os.PathLike | None, *, family: str,
                      candidates: Sequence[str], default_hub_id: str | None = None,
                      local_files_only: bool = False) -> Path:
    """Resolve ``pretrained`` to one weight file.

    ``pretrained`` may be a file, a folder (searched for ``candidates``, relative paths such as
    ``model.safetensors`` or ``base_512_v2/model.ckpt``) or a hub id (each candidate is asked
    for in turn through ``huggingface_hub``; with ``local_files_only`` only the local cache is
    searched). ``None`` means ``default_hub_id``."""
    looked: list[str] = []
    target = str(pretrained) if pretrained is not None else default_hub_id
    if target is None:
        raise MissingWeightsError(f"{family}: backbone.pretrained is not set and the family has no default "
                                  "weights; set it to a weight file or folder, or use backbone.random_init=true")
    path = Path(os.path.expanduser(target))
    if path.is_file():
        return path
    if path.is_dir():
        for rel in candidates:
            if (path / rel).is_file():
                return path / rel
        looked += [str(path / rel) for rel in candidates]
    else:
        looked.append(f"{path} (no such file or folder)")
    if _looks_like_hub_id(target) and not path.exists():
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
            hf_hub_download = None
        errors = []
        for rel in candidates:
            looked.append(f"hub {target} file {rel}" + (" (local cache only)" if local_files_only else ""))
            if hf_hub_download is None:
                continue
            try:
                return Path(hf_hub_download(target, rel, local_files_only=local_files_only))
            except Exception as e:  # noqa: BLE001 - every hub failure means "not found here"
                errors.append(f"{rel}: {type(e).__name__}")
        if errors:
            looked.append("hub errors: " + "; ".join(errors))
    raise MissingWeightsError(
        f"{family}: no weights found for backbone.pretrained={target!r}. Expected one of "
        f"{list(candidates)} (a .safetensors file or a torch checkpoint). Looked at:\n  - "
        + "\n  - ".join(looked)
        + "\nPoint backbone.pretrained at the file or its folder, or set backbone.random_init=true "
          "to build the architecture with random weights.")


# ---------------------------------------------------------------------------------------------
# reading it
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, *, nested_key: str | None = "state_dict",
                    unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint, on the CPU.

    Torch checkpoints are opened with ``weights_only=True`` (and memory-mapped when the file
    format allows it), so a malicious pickle cannot run code. ``unsafe_pickle=True`` lifts that
    restriction for a file you trust that holds other Python objects (a Lightning checkpoint
    with hyper-parameters); use it once, through the conversion to safetensors.
    If the loaded object holds ``nested_key`` (Lightning: ``state_dict``), that entry is used."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = _torch_load(path, unsafe_pickle)
    if isinstance(obj, Mapping) and nested_key and nested_key in obj:
        obj = obj[nested_key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} does not hold a state dict (a mapping of names to tensors); "
                                      f"got {type(obj).__name__}")
    return dict(obj)


def _torch_load(path: Path, unsafe_pickle: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle, mmap=True)
    except RuntimeError as e:
        # Files in the legacy (pre-zip) serialization format cannot be memory-mapped.
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:  # pickle.UnpicklingError and friends
        if unsafe_pickle:
            raise
        raise CheckpointMismatchError(
            f"{path} could not be read with torch.load(weights_only=True): {e}\n"
            "The file holds Python objects besides tensors. If you trust it, convert it once with "
            "unsafe_pickle=True (e.g. fastvader.backbones.videocrafter2.convert_to_safetensors(ckpt, out, "
            "unsafe_pickle=True)) and point backbone.pretrained at the .safetensors file.") from e


def convert_file_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *,
                                expected: Mapping[str, Sequence[int]] | None = None,
                                dtype: torch.dtype | None = None, unsafe_pickle: bool = False,
                                nested_key: str | None = "state_dict", family: str = "checkpoint") -> Path:
    """Read ``src`` (torch checkpoint) and write its state dict to ``dst`` as safetensors. When
    ``expected`` (name -> shape) is given the keys are checked first, so a wrong file is caught
    before anything is written. ``dtype`` casts floating tensors (e.g. torch.bfloat16 halves the
    file)."""
    from safetensors.torch import save_file

    state = read_state_dict(src, nested_key=nested_key, unsafe_pickle=unsafe_pickle)
    if expected is not None:
        check_state_dict(state, expected, family=family, source=str(src))
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst), metadata={"format": "pt", "converted_from": Path(src).name})
    return dst


# ---------------------------------------------------------------------------------------------
# checking it
# ---------------------------------------------------------------------------------------------
def _first(items: Iterable[str], n: int) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]], *,
                     family: str, source: str = "the checkpoint", show: int = 8) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly the expected names
    and shapes. The message names the first missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{family}: {source} does not match the architecture "
             f"({len(state)} tensors in the file, {len(expected)} expected)."]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_first(missing, show)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_first(unexpected, show)}")
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): {_first(wrong, show)}")
    prefixes = sorted({k.split('.')[0] for k in unexpected})
    if prefixes and not missing:
        lines.append(f"  (extra top-level prefixes: {prefixes}; is this an EMA or training checkpoint?)")
    lines.append("Check that backbone.pretrained is this family's checkpoint and that backbone.options "
                 "(e.g. tiny) describe the same architecture.")
    raise CheckpointMismatchError("\n".join(lines))


def materialize_meta_tensors(module: torch.nn.Module) -> list[str]:
    """Names of parameters/buffers still on the meta device after a load (there must be none)."""
    names = [n for n, p in module.named_parameters() if p.is_meta]
    names += [n for n, b in module.named_buffers() if b.is_meta]
    return names


def resolve_dtype(name: str) -> torch.dtype:
    """BackboneConfig.dtype -> torch dtype. ``auto``: bf16 where CUDA is present, else fp32."""
    return precision.resolve_dtype(name, "backbone.dtype")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
