"""One module per op: Triton kernels, launcher, autograd.Function, and the functional entry."""
