"""The package surface, each case in a fresh interpreter: ``from fastvader.kernels import
group_norm, temporal_attention`` gives the functions whatever was imported first, and the
repository root on sys.path (running from a checkout) leaves Hugging Face's probes for their own
``kernels`` package answering "not installed", in either import order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PLAIN_FUNCTIONS = """
import types
from fastvader.kernels import group_norm, temporal_attention
import fastvader.kernels as package
for fn in (group_norm, temporal_attention, package.group_norm, package.temporal_attention):
    assert isinstance(fn, types.FunctionType), fn
print("ok")
"""


def _run(code: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("first", [
    "fastvader.kernels.ops.group_norm",
    "fastvader.kernels.ops.temporal_attention",
    "fastvader.kernels.modules",
    "fastvader.patching.group_norm",
])
def test_package_exports_plain_functions_whatever_was_imported_first(first, tmp_path):
    _run(f"import {first}\n" + PLAIN_FUNCTIONS, cwd=tmp_path)


PROBES = """
from transformers.utils import is_kernels_available
from diffusers.utils import is_kernels_available as diffusers_sees_kernels
assert not is_kernels_available() and not diffusers_sees_kernels()
# transformers imported the checkout's folder to probe it: it must have found the empty shell
assert getattr(sys.modules.get("kernels"), "__file__", None) is None
"""


@pytest.mark.parametrize("order", ["checkout kernels first", "fastvader first", "transformers first"])
def test_checkout_on_sys_path_is_not_taken_for_hugging_face_kernels(order):
    setup = {
        "checkout kernels first": ("import kernels\n"
                                   "assert kernels.__file__ is None and not hasattr(kernels, 'group_norm')\n"),
        "fastvader first": "import fastvader\n",
        "transformers first": PROBES,
    }[order]
    code = (f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + setup + PROBES
            + "import fastvader.kernels, torch\n"
            + "assert fastvader.kernels.__file__.endswith('__init__.py')\n"
            + "x = torch.randn(1, 4, 3)\n"
            + "torch.testing.assert_close(fastvader.kernels.group_norm(x, 2), torch.nn.functional.group_norm(x, 2))\n"
            + "print('ok')\n")
    _run(code, cwd=REPO)
