"""A self-attention key/value cache in fp16 on CPU, and the kernel that attends over it (app/csrc/attention.cpp).

Past a few hundred steps of context, a decoding step's attention over the fp32 cache reads as many bytes as the
int8 weights (at 1400 steps, ~550 MB a step at musicgen-small size). Kept in fp16 the cache is half that, and this
kernel reads it, converting each row to fp32 as it goes and computing in fp32; torch's own CPU kernels read a
half-precision cache slower than an fp32 one. fp16 keeps 11 significant bits of each key and value (bf16 keeps 8)
and holds values up to 65504. `fast_lm.install(half_kv_cache=True)` (MUSICGEN_HALF_KV_CACHE) uses it where
`load()` gives the kernel (app/kernel_build.py builds it; None where it cannot).
"""

import functools
import types
import typing as tp

import torch

from .kernel_build import build

DTYPE = torch.float16
# fp16's largest finite value: a key or value beyond it is stored saturated, not as an infinity (which would turn its
# head's attention into NaN for the rest of the generation).
LIMIT = torch.finfo(DTYPE).max


@functools.cache
def load() -> tp.Optional[types.ModuleType]:
    """The built kernel (function `attend`), or None where this CPU or machine cannot have it."""
    return build("fp16 key/value cache", "an fp32 cache")


def fits(head_dim: int) -> bool:
    """Whether the kernel takes heads of this size (16 floats to a register)."""
    return head_dim % 16 == 0 and head_dim <= 256


def store(cache: torch.Tensor, x: torch.Tensor) -> None:
    """Write `x` into (a slice of) a key/value cache, saturating at fp16's range where the cache is fp16 (~2 us a
    write: ~0.1 ms a step at musicgen-small size)."""
    cache.copy_(x.clamp(-LIMIT, LIMIT) if cache.dtype == DTYPE else x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per head: q float [b, h, 1, d], k and v fp16 [b, h, n, d]."""
    module = load()
    assert module is not None, "the fp16 cache is only installed where the kernel loads"
    return module.attend(q, k, v)
