"""``fastvader env``: what a bug report needs: versions, the device, and which kernel paths are active."""
from __future__ import annotations

import importlib.metadata
import json
import platform

from fastvader.cli.common import command_parser


def _version(distribution: str) -> str:
    # read the installed metadata: importing deepspeed or bitsandbytes prints to stdout
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    import torch

    from fastvader import __version__
    from fastvader.kernels import active_backend, kernel_impl
    from fastvader.patching.core import PATCHES, available_patches

    report = {"fastvader": __version__, "python": platform.python_version(), "platform": platform.platform(),
              "torch": torch.__version__}
    for module in ("triton", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        report[module] = _version(module)
    report["cuda"] = str(torch.version.cuda) if torch.cuda.is_available() else "not available"
    report["gpu"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                     if torch.cuda.is_available() else "none")
    report["kernel path (default device)"] = active_backend()
    report["kernel generation (FASTVADER_KERNEL_IMPL)"] = kernel_impl()
    for name in available_patches():
        report[f"patch {name}"] = f"{PATCHES[name].backend_fn()} ({PATCHES[name].description})"
    return report


def add_parser(sub) -> None:
    p = command_parser(sub, "env", "versions, devices and active kernel paths (for bug reports)", config=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0
