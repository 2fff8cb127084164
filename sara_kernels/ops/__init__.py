"""Triton kernels, one file per op: kernels at the top, launch helpers, then autograd."""
