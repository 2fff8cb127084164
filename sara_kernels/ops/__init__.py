"""The fused backends and what they share.

- :mod:`.contract`: the op contract both fused backends implement (input limits, op schemas,
  fake shapes, the split rule).
- :mod:`.triton`: the Triton backend, by layer: :mod:`.triton.kernels` (the ``@triton.jit``
  kernels), :mod:`.triton.host` (launch plans, caches, launches), :mod:`.triton.autograd`
  (custom ops and autograd Functions).
- :mod:`.cuda`: the CUDA C++ backend (``csrc/``) behind the same contract.
- :mod:`.backend_choice`: which fused backend ``backend="auto"`` runs on a given GPU.
- :mod:`.aot`: ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.
"""
