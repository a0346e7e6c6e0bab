"""One module per op: the Triton kernels, their launcher, the torch custom-op registration
(fake implementation and autograd) and the functional entry."""
