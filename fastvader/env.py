"""What a bug report needs: versions, the device, and which kernel paths are active."""
from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return "not installed"


def environment_report() -> dict[str, str]:
    import torch

    from . import __version__
    from .kernels import active_backend
    from .patching import PATCHES, available_patches

    report = {"fastvader": __version__, "python": platform.python_version(), "platform": platform.platform(),
              "torch": torch.__version__}
    for module in ("triton", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        report[module] = _version(module)
    report["cuda"] = str(torch.version.cuda) if torch.cuda.is_available() else "not available"
    report["gpu"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                     if torch.cuda.is_available() else "none")
    report["kernel path (default device)"] = active_backend()
    for name in available_patches():
        report[f"patch {name}"] = f"{PATCHES[name].backend_fn()} ({PATCHES[name].description})"
    return report
