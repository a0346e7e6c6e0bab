"""Test-session setup. Without a GPU, Triton kernels run under the interpreter: the variable
must be set before triton is first imported, so it is set here, before any test module loads."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The tests run tiny models, whose ops are too small to gain from intra-op threads: one thread
# avoids the synchronisation overhead (large on a shared 2-core machine).
torch.set_num_threads(1)
