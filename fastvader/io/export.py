"""Portable LoRA files: the trained adapter in the layout each tool loads, for the families that
tool loads (key names per family: :mod:`fastvader.io.lora_layouts`, table in docs/trust.md).

``diffusers`` (what ``train`` writes): ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight``
  and ``lora_adapter_metadata``; prefix ``unet`` for UNet pipelines, ``transformer`` for Wan.
``comfyui``: Wan as ``diffusion_model.<original Wan name>.lora_down/lora_up/alpha``; AnimateDiff's
  image model in kohya naming (ComfyUI's LoRA loader) plus its motion modules as motion-LoRA keys
  (AnimateDiff-Evolved's "Load AnimateDiff LoRA" node).
``kohya``: ``lora_unet_<name with underscores>.lora_down/lora_up/alpha`` with ``ss_*`` metadata:
  sd-scripts' names for AnimateDiff's image model, musubi-tuner's original names for Wan.

A format whose tool has no loader for the file's family, or no name for one of its modules, is
refused in one line rather than written to load nowhere. Every file keeps the fastvader metadata
(family, base model, rank, alpha, target modules, reward, steps) and ``fastvader.lora_modules``,
the dotted module names, so that fastvader reads every export back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastvader.errors import LoraFileError
from fastvader.io.lora_layouts import FORMATS, diffusers_prefix, loads_in, to_format


def export_metadata(meta: dict[str, str], fmt: str, modules: list[str], rank: int, alpha: float,
                    prefix: str) -> dict[str, str]:
    """Carry the fastvader metadata over, in the target tool's conventions."""
    out = {k: v for k, v in meta.items() if k.startswith("fastvader.") or k == "format"}
    out.update({"fastvader.format": fmt, "fastvader.lora_modules": json.dumps(modules),
                "fastvader.lora_rank": str(rank), "fastvader.lora_alpha": str(alpha)})
    out.setdefault("fastvader.target_modules", json.dumps(modules))
    if fmt == "diffusers":
        adapter = {"r": rank, "lora_alpha": alpha, "target_modules": json.loads(out["fastvader.target_modules"])}
        out["lora_adapter_metadata"] = json.dumps({f"{prefix}.{k}": v for k, v in adapter.items()})
    elif fmt == "kohya":
        out.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                    "ss_sd_model_name": meta.get("fastvader.base_model", ""),
                    "ss_steps": meta.get("fastvader.steps", ""),
                    "ss_training_comment": f"fastvader reward alignment; reward={meta.get('fastvader.reward', '')}"})
    return out


def _source_file(src: str | Path) -> Path:
    src = Path(src)
    if src.is_dir():
        src = src / "lora.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; give a run directory (runs/<name>) or a .safetensors file")
    return src


def _check_destination(src: Path, out: Path) -> None:
    if out.is_dir():
        raise LoraFileError(f"--out {out} is a folder; give a file name such as {out / 'lora_export.safetensors'}")
    if out.exists() and os.path.samefile(src, out):
        raise LoraFileError(f"--out {out} is the LoRA being exported; write the export to another file")


def export_lora(src: str | Path, fmt: str, out: str | Path, prefix: str | None = None,
                family: str | None = None) -> Path:
    """Convert a fastvader LoRA file (or a run directory's lora.safetensors) to ``fmt`` for the
    family it was trained on (its metadata; ``family`` for files that do not record it)."""
    from fastvader.lora import read_lora_file, write_safetensors
    from fastvader.monitoring.guards import check_finite_state

    if fmt not in FORMATS:
        raise LoraFileError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    src, out = _source_file(src), Path(out)
    _check_destination(src, out)
    lora = read_lora_file(src)
    family = family or lora.family
    if fmt != "diffusers" and fmt not in loads_in(family):
        raise LoraFileError(f"{src}: {fmt} has no loader for {family or 'an unknown family'} models, so a {fmt} file "
                            f"would load nowhere; formats that load it: {loads_in(family)} (diffusers via "
                            "fastvader.load_lora for UNet3DConditionModel families)")
    check_finite_state(lora.state, f"{fmt} export of {src}")
    prefix = prefix or diffusers_prefix(family)
    state, unnamed = to_format(lora.state, lora.modules, fmt, family, lora.alpha, prefix)
    if unnamed:
        raise LoraFileError(f"{src}: {fmt} has no name for {len(unnamed)} of its {len(lora.modules)} adapted modules "
                            f"(e.g. {unnamed[0]}) on {family}; export them in another layout ({loads_in(family)})")
    meta = export_metadata(lora.metadata, fmt, lora.modules, lora.rank, lora.alpha, prefix)
    return write_safetensors(state, out, meta)
