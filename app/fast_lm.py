"""Faster decoding for audiocraft's LM without patching the installed package.

audiocraft 1.3.0 does two avoidable things at every decoding step of every layer:
- cross-attention projects the text conditioning to keys and values again, although that
  conditioning is fixed for the whole generation (reading 2 of the layer's 16 weight matrices for
  nothing on a musicgen-small-sized LM);
- self-attention grows its key/value cache with `torch.cat`, copying the whole cache each step.

`install` replaces the `forward` of those attention modules, on one LM instance, with versions that
compute the cross-attention keys/values once per generation (kept in the module's streaming state,
so audiocraft resets them with the rest of it) and, optionally, write self-attention keys/values
into a pre-allocated buffer. Both run the same kernels on the same values as stock, so greedy
decoding gives the same tokens (tests/test_fast_lm.py). Modules these replacements do not cover
(rope, kv_repeat, qk layer norm, past_context, PyTorch's own MHA) keep audiocraft's forward.

On CPU, `install` can also pack the weights (`PackedLinear`): a decoding step multiplies a 2-row
batch (the CFG pair) by every weight matrix, which is a read of the weights, and oneDNN reads a
weight reordered into its blocked layout at about twice the rate of a plain row-major one. Packing
changes the order of the sums, not the maths: logits stay within float rounding of stock.

With `int8_weights` (MUSICGEN_PRECISION=int8-dynamic) every one of those products is stored as int8
weights instead (`Int8Linear`): half the bytes of bf16, multiplied by int8 activations quantized at each call
(VNNI dot products, on this service's own kernel, app/int8_kernel.py, or fbgemm's). That does change the
numbers: app/precision.py says by how much.
"""

import contextlib
import ctypes
import functools
import types
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.transformer import StreamingMultiheadAttention, _get_attention_time_dimension
from einops import rearrange
from torch.nn import functional as F

from . import half_attention, huge_pages, int8_kernel, lean_lm
from . import int8_kv_cache as int8_cache
from . import lean_step as lean
from .pair_attention import shared as pair_attention_helper

# Headroom when a static cache must grow (a prompt longer than announced): grow by this factor.
GROWTH = 2
# The rows oneDNN picks a packed layout for: the CFG batch of one generation, one step at a time.
PACK_ROWS = 2


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight was reordered once for oneDNN's matrix products (what torch.compile's
    CPU "freezing" does). One core here read plain bf16 weights at 16 GB/s in 2-row products and packed
    ones at 32 GB/s. Inference only; the dense weight is not kept."""

    def __init__(self, weight: torch.Tensor, bias: tp.Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output row, symmetric) whose input is quantized to 8 bits
    at every call (one scale for the whole input, computed from it) and multiplied in integers: PyTorch's x86
    dynamic quantization. Its products run on this service's AVX512-VNNI kernel (app/int8_kernel.py) where
    `own_kernel` and it loads, else on fbgemm's kernels (VNNI dot products too). Returns fp32. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], own_kernel: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.kernel = int8_kernel.load() if own_kernel and self.in_features <= int8_kernel.MAX_INPUTS else None
        if self.kernel is not None:
            quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
            self.packed = self.kernel.pack(quantized)
            self.scales, self.sums = scales.contiguous(), quantized.sum(dim=1, dtype=torch.int32)
            self.bias = None if bias is None else bias.detach().float().contiguous()
            return
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales.double(), zeros, 0, torch.qint8)
        with _quantized_engine("fbgemm"):
            self.packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())
        # Without VNNI, fbgemm's 8-bit products saturate 16-bit sums unless the input keeps to 7 bits.
        self.reduce_range = not torch.cpu._is_vnni_supported()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.linear(x.float(), self.packed, self.scales, self.sums, self.bias)
        # Given a ScriptObject (the packed weight), torch looks `__torch_function__` up on it at every call, which
        # raises and catches an AttributeError: on a 1024x1024 product kept in the cache, 69 us a call with it and
        # 39 us without; a whole int8 step at musicgen-small size ran 1.09-1.16x faster (paired). No tensor subclass
        # comes here, so that look-up is skipped; the product is the same (bit-identical logits).
        with torch._C.DisableTorchFunctionSubclass():
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range)

    @property
    def product_args(self) -> tp.Optional[tp.Tuple[tp.Optional[torch.Tensor], ...]]:
        """What this service's kernel multiplies by (packed weight, scales, sums, bias), or None on fbgemm's."""
        return None if self.kernel is None else (self.packed, self.scales, self.sums, self.bias)

    def extra_repr(self) -> str:
        kernel = "fbgemm" if self.kernel is None else "own"
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=int8, kernel={kernel}"


@contextlib.contextmanager
def _quantized_engine(name: str) -> tp.Iterator[None]:
    """Prepacking follows the global engine; the packed weight then keeps its own kernels."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@functools.cache
def can_quantize() -> bool:
    """Whether this build and CPU run fbgemm's int8 products correctly (a tiny trial once)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    weight, x = torch.eye(16)[:8], torch.arange(32, dtype=torch.float32).view(2, 16)
    try:
        return torch.allclose(Int8Linear(weight, None, own_kernel=False)(x), x[:, :8], rtol=0.02, atol=0.2)
    except RuntimeError:
        return False


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs CPU weights in fp32, and in bf16 where the CPU computes bf16 natively."""
    return weight.device.type == "cpu" and _packing_works(weight.dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this build and CPU pack `dtype` weights and multiply by them correctly (a tiny trial once)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # oneDNN would emulate bf16, slower than plain fp32
    weight, x = torch.eye(16, dtype=dtype)[:8], torch.arange(32, dtype=dtype).view(2, 16)
    try:
        return torch.equal(PackedLinear(weight, None)(x), x[:, :8])
    except RuntimeError:  # a torch without these oneDNN operators
        return False


def _stock(module: StreamingMultiheadAttention, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
    if module.in_proj_weight is None:
        raise RuntimeError("this attention's weights are packed for streaming decoding only: build the LM "
                           "without packed_weights to use it otherwise")
    return StreamingMultiheadAttention.forward(module, *args, **kwargs)


def _layout(module: StreamingMultiheadAttention) -> str:
    return "b h t d" if _get_attention_time_dimension(module.memory_efficient) == 2 else "b t h d"


def _attend(module: StreamingMultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Attention and output projection with the same kernels audiocraft picks for this module,
    so that the numbers (not just the maths) match stock; `causal` masks a block of new queries
    that are the last of the keys."""
    layout = _layout(module)
    if module.attention_as_float32:
        q, k, v = q.float(), k.float(), v.float()
    k, v = k.to(q.dtype), v.to(q.dtype)  # an fp16 cache (`half_kv_cache`) outside the lean step: a prompt, say
    if module.memory_efficient:  # audiocraft's torch backend: scaled_dot_product_attention
        t, s = q.shape[-2], k.shape[-2]
        if causal and t != s:  # new queries after cached keys (stock raises here): mask aligned to the end
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        w = _scores(module, q, k, layout)
        if causal:
            t, s = w.shape[-2:]
            w = w + torch.full((t, s), float("-inf"), device=w.device, dtype=w.dtype).triu(s - t + 1)
        x = _mix(w, v, layout)
    x = rearrange(x.to(dtype), f"{layout} -> b t (h d)", h=module.num_heads)
    return module.out_proj(x)


def _scores(module: StreamingMultiheadAttention, q: torch.Tensor, k: torch.Tensor, layout: str) -> torch.Tensor:
    """audiocraft's einsum attention (its non-`memory_efficient` path): scaled query-key products, unmasked."""
    q = q / q.shape[-1] ** 0.5
    equation = f"{layout},{layout.replace('t', 'k')}-> b h t k"
    if q.device.type == "cuda" and module.safe_streaming:
        with torch.autocast(device_type="cuda", dtype=torch.float32):
            return torch.einsum(equation, q, k)
    return torch.einsum(equation, q, k)


def _mix(w: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
    """The values weighted by the softmax of masked scores `w`, as audiocraft's einsum path does."""
    return torch.einsum(f"b h t k, {layout.replace('t', 'k')} -> {layout}", torch.softmax(w, dim=-1).to(v), v)


def _project(module: StreamingMultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
    """The query (0), key (1) or value (2) projection of a cross-attention, as audiocraft slices it."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if weight is None:  # packed (`_pack_attention`): the query's rows packed, the keys' and values' kept dense
        if part == 0:
            return module.packed_query(x)
        weight, bias, part = module.key_value_weight, module.key_value_bias, part - 1
    rows = slice(part * module.embed_dim, (part + 1) * module.embed_dim)
    return F.linear(x, weight[rows], None if bias is None else bias[rows])


def _cross_forward(self: StreamingMultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   key_padding_mask: tp.Any = None, need_weights: bool = False, attn_mask: tp.Any = None,
                   average_attn_weights: bool = True, is_causal: bool = False) -> tp.Tuple[torch.Tensor, None]:
    """Cross-attention whose keys/values are projected once per streaming session (one generation)."""
    if not self._is_streaming or key is not value or attn_mask is not None or key_padding_mask is not None:
        return _stock(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                      is_causal)
    layout, state = _layout(self), self._streaming_state
    # The conditioning is the same tensor object at every step of one generation; anything else recomputes.
    if state.get("cross_src") is not key:
        k, v = [rearrange(_project(self, key, part), f"b t (h d) -> {layout}", h=self.num_heads) for part in (1, 2)]
        if self.attention_as_float32:
            k, v = k.float(), v.float()
        state["cross_src"], state["cross_k"], state["cross_v"] = key, k, v
        self.cross_kv_computed += 1
    q = rearrange(_project(self, query, 0), f"b t (h d) -> {layout}", h=self.num_heads)
    return _attend(self, q, state["cross_k"], state["cross_v"], False, query.dtype), None


def _static_forward(self: StreamingMultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_padding_mask: tp.Any = None, need_weights: bool = False, attn_mask: tp.Any = None,
                    average_attn_weights: bool = True, is_causal: bool = False) -> tp.Tuple[torch.Tensor, None]:
    """Causal self-attention that writes keys/values into a buffer sized for the whole generation."""
    if not self._is_streaming or attn_mask is not None or key_padding_mask is not None:
        return _stock(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                      is_causal)
    time_dim = _get_attention_time_dimension(self.memory_efficient)
    bound = "b h p t d" if time_dim == 2 else "b t p h d"
    if self.in_proj_weight is None:  # packed (`_pack_attention`)
        projected = self.packed_in_proj(query)
    else:
        projected = F.linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = torch.unbind(rearrange(projected, f"b t (p h d) -> {bound}", p=3, h=self.num_heads), dim=2)
    state, new = self._streaming_state, query.shape[1]
    length = state.get("static_length", 0)
    # With attention_as_float32 (bf16 weights, see app/precision.py) the cache is kept in fp32: each new row is
    # converted once instead of the whole cache at every step. With `half_kv_cache` (install) it is kept in fp16,
    # read by app/half_attention.py's kernel; with `int8_kv_cache` in int8 with a scale per row, "static_k_scale"
    # and "static_v_scale" (app/int8_kv_cache.py), read by the same kernel.
    dtype = getattr(self, "static_kv_dtype", None) or (torch.float32 if self.attention_as_float32 else q.dtype)
    int8 = dtype == int8_cache.DTYPE
    names = ("static_k", "static_v") + (("static_k_scale", "static_v_scale") if int8 else ())
    if "static_k" not in state or state["static_k"].shape[time_dim] < length + new:
        capacity = max(self.static_capacity, GROWTH * (length + new))
        arena = None  # on a CPU, huge pages: a generation's for all its caches, else this layer's
        if self.in_huge_pages and query.device.type == "cpu":
            arena = getattr(self, "static_arena", None) or huge_pages.Arena(expected=_caches_per_layer(self))
        shape = list(k.shape)
        shape[time_dim] = capacity
        # Keys and values, then an int8 cache's scales (fp32, torch's layout: [b, h, t]).
        specs = [(shape, dtype)] * 2 + [(shape[:-1], torch.float32)] * (len(names) - 2)
        for name, (buffer_shape, buffer_dtype) in zip(names, specs, strict=True):
            buffer = (arena.empty(buffer_shape, buffer_dtype) if arena is not None
                      else k.new_empty(buffer_shape, dtype=buffer_dtype))
            if length:
                buffer.narrow(time_dim, 0, length).copy_(state[name].narrow(time_dim, 0, length))
            state[name] = buffer
    if int8:
        for name, x in (("static_k", k), ("static_v", v)):
            int8_cache.store(state[name].narrow(time_dim, length, new),
                             state[name + "_scale"].narrow(time_dim, length, new), x)
    else:
        half_attention.store(state["static_k"].narrow(time_dim, length, new), k)
        half_attention.store(state["static_v"].narrow(time_dim, length, new), v)
    state["static_length"] = length + new  # a Python int: a 0-d tensor cost ~10 us a layer a step to make
    k, v, *scales = (state[name].narrow(time_dim, 0, length + new) for name in names)
    if int8:  # a prompt or a first step, outside the lean step: torch's kernels, on the numbers the cache holds
        k, v = int8_cache.dequantize(k, scales[0]), int8_cache.dequantize(v, scales[1])
    return _attend(self, q, k, v, new > 1, query.dtype), None


def _caches_per_layer(module: StreamingMultiheadAttention) -> float:
    """A layer's static caches, in units of its key cache's bytes: keys and values, and an int8 cache's scales
    (4 bytes a row of `head_dim` bytes): how much of a huge-page mapping a layer takes (`huge_pages.Arena`)."""
    if getattr(module, "static_kv_dtype", None) != int8_cache.DTYPE:
        return 2
    return 2 * (1 + 4 / (module.embed_dim // module.num_heads)) + 0.01  # + the scales' alignment


def _half_cache_fits(module: StreamingMultiheadAttention) -> bool:
    """The fp16 cache's kernel runs torch's attention layout (`memory_efficient`) on CPU, for heads it takes."""
    return (module.memory_efficient and module.in_proj_weight.device.type == "cpu"
            and half_attention.fits(module.embed_dim // module.num_heads) and half_attention.load() is not None)


def _covered(module: StreamingMultiheadAttention) -> bool:
    return module.custom and not module.qk_layer_norm and module.kv_repeat == 1


def _generate_sizing_cache(lm: LMModel, generate: tp.Callable[..., torch.Tensor], *args: tp.Any,
                           **kwargs: tp.Any) -> torch.Tensor:
    """LMModel.generate, with every static cache sized for this call's sequence (steps + pattern delays) and, on
    a CPU, placed in huge pages (app/huge_pages.py), all the call's caches in one mapping."""
    max_gen_len = kwargs.get("max_gen_len", args[3] if len(args) > 3 else 256)
    steps = lm.pattern_provider.get_pattern(max_gen_len).num_sequence_steps
    modules = [module for module in lm.modules() if hasattr(module, "static_capacity")]
    arena = huge_pages.Arena(expected=sum(_caches_per_layer(module) for module in modules))
    for module in modules:
        module.static_capacity, module.static_arena = steps, arena
    try:
        return generate(*args, **kwargs)
    finally:
        for module in modules:
            module.static_arena = None  # the caches go with the call; so does the arena


Packer = tp.Callable[[torch.Tensor, tp.Optional[torch.Tensor]], torch.nn.Module]


def _pack_attention(module: StreamingMultiheadAttention, pack: Packer = PackedLinear) -> None:
    """Pack the input projection that `_static_forward` (all of it) or `_cross_forward` (the query's rows)
    runs at every step; stock's forward then refuses to run (`_stock`), having no dense weights."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if module.cross_attention:
        dim = module.embed_dim
        module.packed_query = pack(weight[:dim], None if bias is None else bias[:dim])
        module.key_value_weight = weight[dim:].detach().clone()
        module.key_value_bias = None if bias is None else bias[dim:].detach().clone()
    else:
        module.packed_in_proj = pack(weight, bias)
    for name in ("in_proj_weight", "in_proj_bias"):
        delattr(module, name)  # the parameter (or the plain None of a layer without bias)
        setattr(module, name, None)


def _pack_linears(root: torch.nn.Module, pack: Packer = PackedLinear, int8: bool = False) -> int:
    """Pack every plain `nn.Linear` under `root` (as int8 with `int8`: any weight; else those oneDNN packs)."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (int8 or can_pack(child.weight)):
                setattr(parent, name, pack(child.weight, child.bias))
                count += 1
    return count


def _weights_into_huge_pages(lm: LMModel) -> int:
    """Move the weights this service's int8 kernel reads at every step side by side into huge pages
    (app/huge_pages.py); returns how many moved."""
    modules = [module for module in lm.modules() if isinstance(module, Int8Linear) and module.kernel is not None
               and module.packed.device.type == "cpu"]
    moved = 0
    for module, packed in zip(modules, huge_pages.gather([module.packed for module in modules]), strict=True):
        moved += packed.data_ptr() != module.packed.data_ptr()
        module.packed = packed
    return moved


def install(lm: LMModel, cross_kv_cache: bool = True, static_kv_cache: bool = False,
            packed_weights: bool = False, int8_weights: bool = False, lean_step: bool = True,
            pair_attention: bool = False, own_int8_kernel: bool = True,
            half_kv_cache: bool = False, whole_layer: bool = True, in_huge_pages: bool = True,
            int8_kv_cache: bool = False, whole_lm: bool = True) -> tp.Dict[str, int]:
    """Replace attention forwards on this LM instance, and with `packed_weights` pack (on CPU) the weights
    that decoding reads at every step, as int8 with `int8_weights` (where `can_quantize`; on this service's own
    kernel where `own_int8_kernel` and it loads, app/int8_kernel.py, else on fbgemm's); with both caches,
    give the layers app/lean_step.py's single-token step unless `lean_step` is False (same logits), its
    self-attention over long contexts on two cores with `pair_attention` (app/pair_attention.py), the static
    cache in fp16 with `half_kv_cache` where app/half_attention.py's kernel loads and fits (in int8 with a scale a
    row there with `int8_kv_cache` too, app/int8_kv_cache.py: `half_kv_cache` counts both), and, with
    `whole_layer`, the lean step of layers on both of this service's kernels (int8 products, fp16 or int8 cache) in one
    C++ call (`lean_step`'s whole-layer step, within float rounding of its Python one), and with `whole_lm` the LM's
    whole step in one where all its layers take that one (app/lean_lm.py; `whole_lm` counts the LM). With
    `in_huge_pages` the weights of this service's int8 kernel, and on a CPU the static caches, are placed in huge pages
    (app/huge_pages.py; `huge_pages` counts the weights moved there; the same numbers). Returns how
    many modules each change reached. A packed LM can only decode in streaming mode (what `generate` does), and
    cannot be copied or moved to another device."""
    counts = {"cross_kv_cache": 0, "static_kv_cache": 0, "packed_weights": 0, "lean_step": 0, "pair_attention": 0,
              "half_kv_cache": 0, "int8_kv_cache": 0, "whole_layer": 0, "whole_lm": 0, "huge_pages": 0}
    int8_weights = int8_weights and can_quantize()
    packed_weights = packed_weights or int8_weights  # int8 weights are packed for their kernels by nature
    pack: Packer = functools.partial(Int8Linear, own_kernel=own_int8_kernel) if int8_weights else PackedLinear
    for module in lm.modules():
        if not isinstance(module, StreamingMultiheadAttention) or not _covered(module):
            continue
        if module.cross_attention and cross_kv_cache:
            module.cross_kv_computed = 0  # how many times keys/values were projected (tests read it)
            module.forward = types.MethodType(_cross_forward, module)
            counts["cross_kv_cache"] += 1
        elif module.causal and static_kv_cache and module.rope is None and module.past_context is None:
            module.static_capacity, module.in_huge_pages = 0, in_huge_pages
            module.forward = types.MethodType(_static_forward, module)
            counts["static_kv_cache"] += 1
            if half_kv_cache and _half_cache_fits(module):
                module.static_kv_dtype = int8_cache.DTYPE if int8_kv_cache else half_attention.DTYPE
                counts["half_kv_cache"] += 1
                counts["int8_kv_cache"] += int8_kv_cache
        else:
            continue
        if packed_weights and (int8_weights or can_pack(module.in_proj_weight)):
            _pack_attention(module, pack)
            counts["packed_weights"] += 1
    if packed_weights:
        for root in (lm.transformer, lm.linears):
            counts["packed_weights"] += _pack_linears(root, pack, int8_weights)
    if int8_weights and in_huge_pages:
        counts["huge_pages"] = _weights_into_huge_pages(lm)
    if counts["static_kv_cache"]:
        lm.generate = functools.partial(_generate_sizing_cache, lm, lm.generate)
    if lean_step and counts["static_kv_cache"]:  # layers with cross-attention need its cache too (`lean._eligible`)
        # After packing: the plan binds the products as they end up.
        counts["lean_step"] = lean.install(lm, pair_attention_helper() if pair_attention else None, whole_layer)
        counts["pair_attention"], counts["whole_layer"] = lean.paired(lm), lean.whole(lm)
        counts["whole_lm"] = lean_lm.install(lm) if whole_lm else 0
    if counts["packed_weights"]:
        return_freed_memory()
    return counts


def return_freed_memory() -> None:
    """Give the dense weights that packing freed back to the system: glibc keeps freed blocks of a few MB in its
    heap (musicgen-small-sized: 2.8 GB resident after int8 packing, 1.6 GB after this)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
