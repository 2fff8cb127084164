"""Test set-up: without a GPU the Triton kernels run under the Triton interpreter.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any test
module imports sara_kernels. With a GPU the same tests compile and run the real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
