"""A lean single-token decoding step for the transformer layers that `fast_lm` sped up (both caches installed).

With int8 products at musicgen-small's size, a step spent about as long in Python and small operators as in
reading its weights: audiocraft's module calls, einops, dropout and identity modules, and, at every look-up of
a submodule or parameter, an AttributeError that `nn.Module.__getattr__` turns into the attribute. `install`
gives each eligible layer a `forward` that runs the same kernels in the same order on tensors of the same shapes
and strides, from a plan of its kernels and weights looked up once: the logits are bit-identical to fast_lm's
(tests/test_lean_step.py). Anything but the steady state (a prompt or first step, a cache to grow, a new
conditioning, masks, training) goes through the layer's stock forward, which `fast_lm` already covers.
The lean step calls the layer's submodules' `forward` directly: hooks registered on them do not run.
The plan is taken at install, like packing: an LM converted or moved afterwards must be installed again.

Where a layer runs on both of this service's C++ kernels (int8 products on its own kernel, fast_lm's fp16 or int8
cache) the whole step is one call, `whole_layer` (app/csrc/lean_layer.cpp): layer norms, cache writes, attention
(cross-attention too), residuals and the activation on raw rows, without a Python operator between the products.
Its logits agree with the Python step's within float rounding, not bit for bit (its own layer norm, its own
cross-attention kernel).
"""

import functools
import types
import typing as tp

import torch
from audiocraft.modules.transformer import (
    StreamingMultiheadAttention,
    StreamingTransformerLayer,
    _get_attention_time_dimension,
)
from torch.nn import functional as F

from . import half_attention, int8_kv_cache
from .kernel_build import build
from .pair_attention import PairAttention

__all__ = ["install", "paired", "whole"]

Kernel = tp.Callable[[torch.Tensor], torch.Tensor]


class _Norm(tp.NamedTuple):
    shape: tp.Tuple[int, ...]
    weight: tp.Optional[torch.Tensor]
    bias: tp.Optional[torch.Tensor]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Linear(tp.NamedTuple):
    """A dense product on the first `rows` rows of a weight, sliced as fast_lm slices it (tensors, not closures,
    so that a copy of the LM multiplies by its own weights)."""
    weight: torch.Tensor
    bias: tp.Optional[torch.Tensor]
    rows: tp.Optional[int] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight[:self.rows], None if self.bias is None else self.bias[:self.rows])


class _Attention(tp.NamedTuple):
    module: StreamingMultiheadAttention  # its streaming state holds the caches
    project: Kernel  # fused q/k/v (self-attention) or the query's rows (cross-attention)
    out: Kernel
    heads: int
    time_dim: int  # 2: "b h t d" (torch's scaled_dot_product_attention), 1: "b t h d" (einsum)
    memory_efficient: bool
    as_float32: bool
    pair: tp.Optional[PairAttention] = None  # splits the batch across two cores over long contexts
    half: bool = False  # the self-attention cache is fast_lm's fp16 one (`half_kv_cache`)
    int8: bool = False  # ... or its int8 one, with a scale per row (`int8_kv_cache`)


class _Plan(tp.NamedTuple):
    norm1: _Norm
    self_attention: _Attention
    scale1: tp.Optional[Kernel]
    norm_cross: tp.Optional[_Norm]
    cross_attention: tp.Optional[_Attention]
    scale_cross: tp.Optional[Kernel]
    norm2: _Norm
    linear1: Kernel
    activation: Kernel
    linear2: Kernel
    scale2: tp.Optional[Kernel]
    whole: tp.Any = None  # the extension's `Layer`: the whole step in one call (`_whole_layer`)


def install(lm: torch.nn.Module, pair: tp.Optional[PairAttention] = None, whole_layer: bool = True) -> int:
    """Give every eligible transformer layer of `lm` the lean step, its self-attention split across two cores
    over long contexts with `pair` (app/pair_attention.py), in one C++ call with `whole_layer` where the layer
    runs on this service's kernels; returns how many."""
    count = 0
    for layer in lm.transformer.layers:
        if _eligible(layer):
            plan = _plan(layer, pair)
            layer.lean_plan = plan._replace(whole=_whole_layer(layer, plan)) if whole_layer else plan
            layer.forward = types.MethodType(_layer_forward, layer)
            count += 1
    return count


def paired(lm: torch.nn.Module) -> int:
    """How many layers split their self-attention across two cores."""
    return sum(plan.self_attention.pair is not None for plan in _plans(lm))


def whole(lm: torch.nn.Module) -> int:
    """How many layers run their step in one C++ call."""
    return sum(plan.whole is not None for plan in _plans(lm))


def _plans(lm: torch.nn.Module) -> tp.Iterator[_Plan]:
    plans = (getattr(layer, "lean_plan", None) for layer in lm.transformer.layers)
    return (plan for plan in plans if plan is not None)


def _eligible(layer: torch.nn.Module) -> bool:
    """Pre-norm layers on CPU with LayerNorms and fast_lm's static self-attention and cross-attention K/V caches
    (fast_lm leaves CUDA's attention as audiocraft runs it)."""
    if not isinstance(layer, StreamingTransformerLayer) or not layer.norm_first:
        return False
    cross = layer.cross_attention
    norms = [layer.norm1, layer.norm2] + ([layer.norm_cross] if cross is not None else [])
    return (all(type(norm) is torch.nn.LayerNorm and norm.weight.device.type == "cpu" for norm in norms)
            and hasattr(layer.self_attn, "static_capacity") and (cross is None or hasattr(cross, "cross_kv_computed")))


def _plan(layer: StreamingTransformerLayer, pair: tp.Optional[PairAttention]) -> _Plan:
    cross = layer.cross_attention
    return _Plan(
        norm1=_norm(layer.norm1), self_attention=_attention(layer.self_attn, pair),
        scale1=_scale(layer.layer_scale_1),
        norm_cross=None if cross is None else _norm(layer.norm_cross),
        cross_attention=None if cross is None else _attention(cross),
        scale_cross=None if cross is None else _scale(layer.layer_scale_cross),
        norm2=_norm(layer.norm2), linear1=_kernel(layer.linear1), activation=layer.activation,
        linear2=_kernel(layer.linear2), scale2=_scale(layer.layer_scale_2))


def _whole_layer(layer: StreamingTransformerLayer, plan: _Plan) -> tp.Any:
    """The extension's `Layer` for a layer whose products all run on this service's int8 kernel, whose
    self-attention cache is fp16 or int8 and whose attention runs torch's layout, in fp32, without layer scales; else
    None."""
    own_cache = plan.self_attention.half or plan.self_attention.int8
    if not own_cache or any(scale is not None for scale in (plan.scale1, plan.scale_cross, plan.scale2)):
        return None
    if layer.activation not in (F.relu, F.gelu):
        return None
    attentions = [(layer.self_attn, getattr(layer.self_attn, "packed_in_proj", None))]
    if plan.cross_attention is not None:
        if not plan.cross_attention.memory_efficient:  # the einsum path's layout: not the extension's
            return None
        attentions.append((layer.cross_attention, getattr(layer.cross_attention, "packed_query", None)))
    products = [_product_args(module) for attn, project in attentions for module in (project, attn.out_proj)]
    products += [_product_args(layer.linear1), _product_args(layer.linear2)]
    kernels = _kernels()
    if kernels is None or any(args is None for args in products):
        return None
    norms = [(norm.weight, norm.bias, norm.eps) for norm in (plan.norm1, plan.norm_cross, plan.norm2) if norm]
    cross_parts = (norms[1], products[2], products[3]) if plan.cross_attention is not None else (None, None, None)
    try:
        return kernels.Layer(plan.self_attention.heads, layer.activation.__name__, norms[0], products[0], products[1],
                             *cross_parts, norms[-1], products[-2], products[-1])
    except RuntimeError:  # what it does not take (heads or rows not of 16 floats, norms not fp32): the Python step
        return None


@functools.cache
def _kernels() -> tp.Optional[types.ModuleType]:
    """The extension, looked up (and its fallback logged) once a process."""
    return build("whole-layer decoding steps", "the lean step in Python")


def _product_args(module: torch.nn.Module) -> tp.Optional[tp.Tuple[tp.Optional[torch.Tensor], ...]]:
    """A product's arguments to this service's int8 kernel (fast_lm.Int8Linear on it), else None."""
    return getattr(module, "product_args", None)


def _norm(norm: torch.nn.LayerNorm) -> _Norm:
    return _Norm(tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps)


def _scale(module: torch.nn.Module) -> tp.Optional[Kernel]:
    return None if isinstance(module, torch.nn.Identity) else module.forward


def _kernel(module: torch.nn.Module) -> Kernel:
    """The product's forward, with an `nn.Linear`'s weights bound once (packed ones hold theirs)."""
    if type(module) is torch.nn.Linear:
        return _Linear(module.weight, module.bias)
    return module.forward


def _attention(attn: StreamingMultiheadAttention, pair: tp.Optional[PairAttention] = None) -> _Attention:
    """The projections as fast_lm left them: packed (`_pack_attention`) or audiocraft's fused weight; `pair` where
    the attention runs torch's kernel (audiocraft's `memory_efficient`, what the released checkpoints use)."""
    project: Kernel
    dtype = getattr(attn, "static_kv_dtype", None)  # fast_lm's fp16 or int8 cache: this service's kernel
    half, int8 = dtype == half_attention.DTYPE, dtype == int8_kv_cache.DTYPE
    if attn.in_proj_weight is None:
        project = attn.packed_query.forward if attn.cross_attention else attn.packed_in_proj.forward
    else:
        project = _Linear(attn.in_proj_weight, attn.in_proj_bias, attn.embed_dim if attn.cross_attention else None)
    return _Attention(attn, project, _kernel(attn.out_proj), attn.num_heads,
                      _get_attention_time_dimension(attn.memory_efficient), attn.memory_efficient,
                      attn.attention_as_float32, pair if attn.memory_efficient and not (half or int8) else None, half,
                      int8)


def _layer_forward(self: StreamingTransformerLayer, src: torch.Tensor, src_mask: tp.Any = None,
                   src_key_padding_mask: tp.Any = None, cross_attention_src: tp.Any = None) -> torch.Tensor:
    plan: _Plan = self.lean_plan
    length = _steady(self, plan, src, src_mask, src_key_padding_mask, cross_attention_src)
    if length is None:
        return StreamingTransformerLayer.forward(self, src, src_mask, src_key_padding_mask, cross_attention_src)
    if plan.whole is not None:  # int8 products: the layer computes in fp32, what the extension takes
        return _whole_step(plan, src, length)
    x = src
    x = x + _scaled(plan.scale1, _self_attention(plan.self_attention, plan.norm1(x), length))
    if plan.cross_attention is not None:
        x = x + _scaled(plan.scale_cross, _cross_attention(plan.cross_attention, plan.norm_cross(x)))
    h = plan.activation(plan.linear1(plan.norm2(x)))
    return x + _scaled(plan.scale2, plan.linear2(h))


def _whole_step(plan: _Plan, x: torch.Tensor, length: int) -> torch.Tensor:
    """The layer's step in one call of the extension (`_whole_layer`), `length` keys cached before it."""
    state = plan.self_attention.module._streaming_state
    cross_k = cross_v = None
    if plan.cross_attention is not None:
        cross = plan.cross_attention.module._streaming_state
        cross_k, cross_v = cross["cross_k"], cross["cross_v"]
    x = plan.whole.step(x, state["static_k"], state["static_v"], length, cross_k, cross_v,
                        state.get("static_k_scale"), state.get("static_v_scale"))
    state["static_length"] = length + 1
    return x


def _steady(layer: StreamingTransformerLayer, plan: _Plan, src: torch.Tensor, src_mask: tp.Any,
            src_key_padding_mask: tp.Any, cross_attention_src: tp.Any) -> tp.Optional[int]:
    """How many keys the self-attention cache holds, where the lean step applies (one new token, no masks, in
    inference, with room in that cache and this conditioning's cross-attention keys/values already cached); else
    None."""
    attn = plan.self_attention
    state = attn.module._streaming_state
    if (src.shape[1] != 1 or src_mask is not None or src_key_padding_mask is not None or layer.training
            or not attn.module._is_streaming or "static_k" not in state):
        return None
    length = state["static_length"]  # fast_lm's count of cached keys
    if state["static_k"].shape[attn.time_dim] <= length:
        return None
    cross = plan.cross_attention
    if cross is None:
        return length if cross_attention_src is None else None
    return length if cross.module._streaming_state.get("cross_src") is cross_attention_src else None


def _scaled(scale: tp.Optional[Kernel], x: torch.Tensor) -> torch.Tensor:
    return x if scale is None else scale(x)


def _heads(x: torch.Tensor, attn: _Attention, parts: int) -> torch.Tensor:
    """`b t (p h d) -> b h p t d` (time_dim 2) or `b t p h d`: the views einops makes in fast_lm."""
    x = x.view(x.shape[0], x.shape[1], parts, attn.heads, -1)
    return x.permute(0, 3, 2, 1, 4) if attn.time_dim == 2 else x


def _self_attention(attn: _Attention, x: torch.Tensor, length: int) -> torch.Tensor:
    """fast_lm's `_static_forward` for one new token in a cache with room for it, after `length` keys."""
    q, k, v = torch.unbind(_heads(attn.project(x), attn, 3), dim=2)
    state, time_dim = attn.module._streaming_state, attn.time_dim
    keys, values = state["static_k"], state["static_v"]
    if attn.int8:  # fast_lm's int8 cache (torch's layout: time_dim 2), on this service's kernel
        scales = [state[name].narrow(2, 0, length + 1) for name in ("static_k_scale", "static_v_scale")]
        int8_kv_cache.write(keys, state["static_k_scale"], length, k)
        int8_kv_cache.write(values, state["static_v_scale"], length, v)
        state["static_length"] = length + 1
        attended = int8_kv_cache.attend(q.float(), keys.narrow(2, 0, length + 1), scales[0],
                                        values.narrow(2, 0, length + 1), scales[1])
        return _output(attn, attended, x.dtype)
    half_attention.store(keys.narrow(time_dim, length, 1), k)
    half_attention.store(values.narrow(time_dim, length, 1), v)
    state["static_length"] = length + 1
    return _attend(attn, q, keys.narrow(time_dim, 0, length + 1), values.narrow(time_dim, 0, length + 1), x.dtype)


def _cross_attention(attn: _Attention, x: torch.Tensor) -> torch.Tensor:
    """fast_lm's `_cross_forward` once the conditioning's keys/values are cached."""
    state = attn.module._streaming_state
    return _attend(attn, _heads(attn.project(x), attn, 1).squeeze(2), state["cross_k"], state["cross_v"], x.dtype)


def _attend(attn: _Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fast_lm's `_attend` for one query, the last of the keys (no mask), on CPU."""
    if attn.half:  # fast_lm's fp16 self-attention cache, on its own kernel (the pair's split would not pay there)
        return _output(attn, half_attention.attend(q.float(), k, v), dtype)
    if attn.as_float32:
        q, k, v = q.float(), k.float(), v.float()
    if attn.pair is not None and attn.pair.wanted(q, k):
        x = attn.pair(q, k, v)
    elif attn.memory_efficient:
        x = F.scaled_dot_product_attention(q, k, v)
    else:  # audiocraft's einsum path, whose layout is always "b t h d"
        q = q / q.shape[-1] ** 0.5
        w = torch.einsum("b t h d, b k h d -> b h t k", q, k)
        x = torch.einsum("b h t k, b k h d -> b t h d", torch.softmax(w, dim=-1).to(v), v)
    return _output(attn, x, dtype)


def _output(attn: _Attention, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    if attn.time_dim == 2:
        x = x.permute(0, 2, 1, 3)
    return attn.out(x.reshape(x.shape[0], x.shape[1], -1))
