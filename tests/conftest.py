"""Test-session setup. Without a GPU, Triton kernels run under the interpreter: the variable
must be set before triton is first imported, so it is set here, before any test module loads."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

if torch.cuda.is_available():
    # Patched-vs-unpatched comparisons run fp32 models: TF32 convolutions and matmuls round
    # inputs to 10 mantissa bits, turning 1e-7 differences into 1e-4 ones (seen on an H200).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

# The tests run tiny models, whose ops are too small to gain from intra-op threads: one thread
# avoids the synchronisation overhead (large on a shared 2-core machine).
torch.set_num_threads(1)
