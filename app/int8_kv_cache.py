"""A self-attention key/value cache in int8 on CPU, a scale per row, read by this service's attention kernel.

Over a 30 s clip's context the fp16 cache (app/half_attention.py) is read at every step: at 1400 steps, ~275 MB a
step at musicgen-small's size, as much as most of the int8 weights. Kept in int8, each key's and each value's row
(one head's 64 numbers) as its nearest multiples of its own scale (its largest magnitude / 127), the cache is half
that, plus 4 bytes a row. The kernel (app/csrc/attention.cpp) converts each row to fp32 as it reads it and computes
in fp32, each key's score and each value's weight times its row's scale. Each number keeps ~8 bits relative to its
row's largest, against fp16's 11 relative to itself: the attention's output is within ~1 % of the attention over
the rows themselves (fp16's within ~0.03 %); what that does to the next-token distributions, docs/benchmarks.md and
tests/test_int8_kv_cache.py measure.

`fast_lm.install(int8_kv_cache=True)` (MUSICGEN_INT8_KV_CACHE) keeps the cache in int8 where the fp16 one would be.
A step's new key and value are written by the kernel's `store_int8` (the whole-layer step, app/csrc/lean_layer.cpp,
and `write` here for the Python lean step); a prompt's or a first step's go through `store` here, the same
operations in torch.
"""

import typing as tp

import torch

from . import half_attention

DTYPE = torch.int8
# Keys and values saturate at fp16's range, as in the fp16 cache: no row's scale is an infinity.
LIMIT = half_attention.LIMIT


def quantize(x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Rows (the last dimension) as int8 and their scales: x ~ int8 * scale[..., None]. A row of zeros: scale 0."""
    x = x.float().clamp(-LIMIT, LIMIT)
    scales = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / torch.where(scales > 0, scales, 1)).to(DTYPE), scales.squeeze(-1)


def store(cache: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> None:
    """Write rows `x` [b, h, t, d] into (a slice of) an int8 cache and its scales [b, h, t]."""
    numbers, row_scales = quantize(x)
    cache.copy_(numbers)
    scales.copy_(row_scales)


def write(cache: torch.Tensor, scales: torch.Tensor, at: int, x: torch.Tensor) -> None:
    """Write one step's rows `x` [b, h, 1, d] (each batch row's heads side by side, as a step projects them) into
    position `at` of an int8 cache and its scales, with the kernel's own `store_int8` (one call: `store`'s torch
    operators, ~10 a write, cost the Python lean step ~10 % of a step)."""
    _kernels().store_int8(x.squeeze(2), cache, scales, at)


def dequantize(cache: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 rows an int8 cache holds (a prompt's attention, which torch's kernels compute)."""
    return cache.float() * scales.unsqueeze(-1)


def attend(q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, v: torch.Tensor,
           v_scales: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per head: q float [b, h, 1, d], k and v int8 [b, h, n, d] with their
    scales [b, h, n]."""
    return _kernels().attend(q, k, v, k_scales, v_scales)


def _kernels() -> tp.Any:
    module = half_attention.load()  # the same extension, loaded (and its fallback logged) once
    assert module is not None, "the int8 cache is only installed where the kernel loads"
    return module
