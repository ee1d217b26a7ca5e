"""This service's int8 product kernel for AVX512-VNNI CPUs (app/csrc/int8_linear.cpp), built at first use.

A decoding step's int8 products are reads of the weights: fbgemm's kernels (PyTorch's dynamic quantization) read
them at ~20 GB/s on one Zen 4 core, this kernel at ~24 GB/s (~32 GB/s on two cores, against ~25 for fbgemm), the
same maths (int8 weights with a scale per output row, 8-bit activations with one scale per call, exact integer
sums). `fast_lm.Int8Linear` uses it where `load()` gives it, and fbgemm's kernels otherwise.

Built at first use by app/kernel_build.py: where the CPU lacks AVX512-VNNI or the build fails (no compiler),
`load()` says why in the log and returns None.
"""

import functools
import logging
import types
import typing as tp

import torch

from .kernel_build import build

log = logging.getLogger(__name__)

# The kernel's 32-bit sums hold 255 x 127 x this many inputs without overflow.
MAX_INPUTS = 32768


@functools.cache
def load() -> tp.Optional[types.ModuleType]:
    """The built kernel (functions `pack` and `linear`), or None where this CPU or machine cannot have it."""
    module = build("int8 products", "fbgemm's kernels")
    if module is not None and not _works(module):
        log.warning("int8 products: fbgemm's kernels (this service's own gave wrong products in a trial)")
        return None
    return module


def _works(module: types.ModuleType) -> bool:
    """A tiny trial: an identity-like product, odd sizes included (padding), against the float result."""
    weight = torch.eye(40)[:33] * 0.5
    x = torch.linspace(-3, 5, 80).view(2, 40)
    quantized = torch.round(weight / (0.5 / 127)).to(torch.int8)
    y = module.linear(x, module.pack(quantized), torch.full((33,), 0.5 / 127), quantized.sum(1, dtype=torch.int32),
                      torch.ones(33))
    return torch.allclose(y, x[:, :33] * 0.5 + 1, rtol=0.02, atol=0.05)
