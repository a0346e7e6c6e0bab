"""Test-session setup. Without a GPU, Triton kernels run under the interpreter: the variable
must be set before triton is first imported, so it is set here, before any test module loads."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Many tests build tiny models; two threads is all these machines have.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
