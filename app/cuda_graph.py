"""Decoding over fixed buffers, and on CUDA each decoding step replayed as one CUDA graph (MUSICGEN_CUDA_GRAPH).

On a GPU audiocraft's decoding step is bound by Python and kernel launches, and it cannot be captured as a
CUDA graph: its self-attention cache grows with `torch.cat` (new address and shape every step), its masks
and positions come from Python lengths, and sampling calls `torch.multinomial`, which checks its input on
the host. `install` gives one LM instance a decoder that keeps every tensor a step touches at a fixed
address and shape (docs/gpu-decoding-plan.md):

- self-attention keys/values in buffers sized for the longest window, written at `position`, a device
  tensor; a step attends over the whole buffer with a mask built from `position`;
- cross-attention keys/values projected once per generation;
- sampling (CFG mix, temperature, top-k/top-p) with audiocraft's own operations, and the draw done the way
  `torch.multinomial` does it for one sample, without its host-side checks.

audiocraft's `generate` loop (patterns, windows, progress callback, cancellation) stays as it is: the decoder
takes the place of the instance's `_sample_next_token`. The first call of a generation (the first token, or a
window's prompt) runs eagerly; each later step replays a graph captured on first use for that batch,
conditioning length and sampling settings. On CUDA the LM's matrix weights are stored in fp16, which is what
audiocraft's fp16 autocast multiplies with anyway, so stock's own code still computes the same numbers.
On CPU the same step runs eagerly (`graphs=False`): that is how the tests check it against stock.
"""

import collections
import contextlib
import dataclasses
import functools
import logging
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.transformer import (
    StreamingMultiheadAttention,
    _get_attention_time_dimension,
    create_sin_embedding,
)
from einops import rearrange

from . import fast_lm

log = logging.getLogger(__name__)

# Key buffers are rounded up to this many steps: the memory-efficient attention kernel wants its mask aligned.
ALIGN = 64
# Captured graphs kept (one per batch, conditioning length and sampling settings); the least recently used goes.
MAX_GRAPHS = 8
# Eager steps run on a side stream before a capture, as torch.cuda.graphs asks (lazy kernel initialisation).
WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The settings of `_sample_next_token`; a graph bakes them in, as audiocraft's Python scalars."""

    use_sampling: bool
    temp: float
    top_k: int
    top_p: float
    cfg_coef: float


@dataclasses.dataclass
class _Graph:
    graph: tp.Any  # torch.cuda.CUDAGraph
    cross: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]  # the conditioning's keys/values it reads, per layer


@dataclasses.dataclass
class _Generation:
    sampling: Sampling
    cross: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]
    key: tp.Tuple[tp.Any, ...]
    steps: int  # positions written so far
    graph: tp.Optional[_Graph] = None


def unsupported(lm: LMModel) -> tp.Optional[str]:
    """Why this LM's step is not covered here (it then decodes as stock), or None."""
    transformer = lm.transformer
    if transformer.positional_embedding != "sin":
        return f"positional embedding {transformer.positional_embedding!r}"
    if lm.two_step_cfg:
        return "two-step classifier-free guidance"
    if any(conditions for method, conditions in lm.fuser.fuse2cond.items() if method != "cross"):
        return "conditions fused other than by cross-attention (e.g. a melody's chroma, prepended)"
    for layer in transformer.layers:
        attention = layer.self_attn
        if not layer.norm_first or not attention.causal or not fast_lm._covered(attention) \
                or attention.rope is not None or attention.past_context is not None:
            return "a transformer layer of another kind than MusicGen's"
        if layer.cross_attention is not None and not fast_lm._covered(layer.cross_attention):
            return "a cross-attention of another kind than MusicGen's"
    return None


def install(lm: LMModel, capacity: int, graphs: tp.Optional[bool] = None) -> str:
    """Decode `lm` with a `StaticDecoder` holding `capacity` steps (grown when a generation needs more);
    `graphs` (default: on CUDA) replays steps as CUDA graphs. Returns what was done, for the log."""
    reason = unsupported(lm)
    if reason is not None:
        return f"off ({reason})"
    device = next(lm.parameters()).device
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise ValueError("CUDA graphs need the LM on a CUDA device")
    if device.type == "cuda":
        _matrices_to_half(lm)
    decoder = StaticDecoder(lm, capacity, graphs)
    lm.static_decoder = decoder
    lm._sample_next_token = decoder.sample_next_token
    lm.generate = functools.partial(_generate, decoder, lm.generate)
    return (f"on ({'CUDA graphs' if graphs else 'eager steps'}, {decoder.capacity} key positions"
            f"{', fp16 matrix weights' if device.type == 'cuda' else ''})")


def _matrices_to_half(lm: LMModel) -> None:
    """fp16 weights for every matrix product of a step: audiocraft's CUDA autocast casts them to fp16 at each
    use, and leaves tensors already in fp16 as they are, so stock code computes the same numbers with them."""
    for module in list(lm.transformer.modules()) + list(lm.linears.modules()):
        if isinstance(module, torch.nn.Linear):
            params = [module.weight, module.bias]
        elif isinstance(module, StreamingMultiheadAttention) and module.custom:
            params = [module.in_proj_weight, module.in_proj_bias]
        else:
            continue
        for param in params:
            if param is not None:
                param.data = param.data.half()


def _generate(decoder: "StaticDecoder", generate: tp.Callable[..., torch.Tensor], *args: tp.Any,
              **kwargs: tp.Any) -> torch.Tensor:
    """LMModel.generate, marking where a generation starts and ends for the decoder."""
    max_gen_len = kwargs.get("max_gen_len", args[3] if len(args) > 3 else 256)
    decoder.begin(decoder.lm.pattern_provider.get_pattern(max_gen_len).num_sequence_steps)
    try:
        return generate(*args, **kwargs)
    finally:
        decoder.end()


def _align(steps: int) -> int:
    return -(-steps // ALIGN) * ALIGN


class StaticDecoder:
    """One LM's decoding state at fixed addresses: key/value buffers, the step's input and output tokens,
    the position, and the graphs captured over them."""

    def __init__(self, lm: LMModel, capacity: int, graphs: bool):
        self.lm = lm
        self.device = next(lm.parameters()).device
        self.graphs = graphs
        self.capacity = _align(capacity)
        self.layers = list(lm.transformer.layers)
        with torch.inference_mode(False):  # buffers updated in place across generations, in and out of it
            self.position = torch.zeros((), dtype=torch.long, device=self.device)
            self._keys = torch.arange(self.capacity, device=self.device)
        self._cache: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]] = []  # self-attention keys/values per layer
        self._io: tp.Dict[int, tp.Tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (step input, step output)
        self._graphs: collections.OrderedDict[tp.Tuple[tp.Any, ...], _Graph] = collections.OrderedDict()
        self._fresh = False  # a generation began and has not made its first call yet
        self._generation: tp.Optional[_Generation] = None  # None: stock decodes the current generation
        self.captures = 0  # graphs captured (tests and the benchmark read these)
        self.replays = 0
        # On CUDA every step runs under audiocraft's fp16 autocast (the matrix weights are fp16), as MusicGen
        # runs the LM; on CPU nothing changes.
        self._autocast = _autocast if self.device.type == "cuda" else contextlib.nullcontext

    def begin(self, steps: int) -> None:
        """A generation of `steps` sequence steps starts (called by the wrapped `generate`)."""
        if steps > self.capacity:
            log.info("growing the decoding buffers from %d to %d steps", self.capacity, _align(steps))
            self.capacity = _align(steps)
            with torch.inference_mode(False):
                self._keys = torch.arange(self.capacity, device=self.device)
            self._cache = []
            self._graphs.clear()
        self._fresh, self._generation = True, None

    def end(self) -> None:
        self._fresh, self._generation = False, None

    def sample_next_token(self, sequence: torch.Tensor, cfg_conditions: tp.Any, unconditional_state: tp.Any,
                          use_sampling: bool = False, temp: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                          cfg_coef: tp.Optional[float] = None,
                          two_step_cfg: tp.Optional[bool] = None) -> torch.Tensor:
        """`LMModel._sample_next_token` for this LM: the same tokens, from fixed buffers."""
        args = (sequence, cfg_conditions, unconditional_state, use_sampling, temp, top_k, top_p)
        if self._fresh:
            self._fresh = False
            two_step = self.lm.two_step_cfg if two_step_cfg is None else two_step_cfg
            if not two_step and isinstance(cfg_conditions, dict) and cfg_conditions:
                sampling = Sampling(bool(use_sampling), float(temp), int(top_k), float(top_p),
                                    float(self.lm.cfg_coef if cfg_coef is None else cfg_coef))
                return self._prefill(sequence, cfg_conditions, sampling)
        if self._generation is None:  # unconditional or two-step CFG: stock's own step
            return LMModel._sample_next_token(self.lm, *args, cfg_coef=cfg_coef, two_step_cfg=two_step_cfg)
        return self._next_step(sequence)

    # The first call of a generation: its prompt (or first token), eagerly.

    def _prefill(self, sequence: torch.Tensor, cfg_conditions: tp.Dict[str, tp.Any],
                 sampling: Sampling) -> torch.Tensor:
        batch, _, length = sequence.shape
        if length > self.capacity:
            raise RuntimeError(f"a prompt of {length} steps does not fit {self.capacity} key positions")
        tokens = torch.cat([sequence, sequence], dim=0)  # the CFG batch: conditional, then null conditions
        self._allocate_io(batch, sequence)
        with self._autocast():
            _, source = self.lm.fuser(torch.zeros(tokens.shape[0], 0, self.lm.dim, device=self.device),
                                      cfg_conditions)
            cross = self._cross_keys_values(source)
            logits = self._forward(tokens, torch.arange(length, device=self.device), cross, valid=None)
            next_token = _sample(logits, sampling)
        self.position.fill_(length)
        self._generation = _Generation(sampling, cross, (batch, source.shape[1], sampling), length)
        return next_token

    def _cross_keys_values(self, source: torch.Tensor) -> tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys/values, as audiocraft projects them (at every step) from the
        conditioning the fuser hands to cross-attention."""
        cross = []
        for layer in self.layers:
            module = layer.cross_attention
            if module is None:
                cross.append((None, None))
                continue
            layout = fast_lm._layout(module)
            k, v = [rearrange(fast_lm._project(module, source, part), f"b t (h d) -> {layout}", h=module.num_heads)
                    for part in (1, 2)]
            if module.attention_as_float32:
                k, v = k.float(), v.float()
            cross.append((k, v))
        return cross

    def _allocate_io(self, batch: int, sequence: torch.Tensor) -> None:
        if batch not in self._io:
            with torch.inference_mode(False):
                self._io[batch] = (torch.zeros(batch, sequence.shape[1], 1, dtype=sequence.dtype, device=self.device),
                                   torch.zeros(batch, sequence.shape[1], 1, dtype=torch.long, device=self.device))

    # Every later call: one step, replayed as a graph or run eagerly, over the same buffers.

    def _next_step(self, sequence: torch.Tensor) -> torch.Tensor:
        generation = self._generation
        assert generation is not None
        if sequence.shape[-1] != 1 or generation.steps >= self.capacity:
            raise RuntimeError("the static decoder takes one step at a time within its buffers")
        tokens, next_token = self._io[sequence.shape[0]]
        tokens.copy_(sequence)
        if self.graphs:
            graph = generation.graph or self._graph_for(generation)
            if graph is not None:
                graph.graph.replay()
                self.replays += 1
                generation.steps += 1
                return next_token
        with self._autocast():
            self._step(tokens, next_token, generation.cross, generation.sampling)
        generation.steps += 1
        return next_token

    def _step(self, tokens: torch.Tensor, next_token: torch.Tensor,
              cross: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]], sampling: Sampling) -> None:
        """The graph-ready step: reads `tokens` and `position`, writes the keys/values at `position`,
        `next_token`, and `position + 1`; every shape is fixed and nothing reads back to the host."""
        logits = self._forward(torch.cat([tokens, tokens], dim=0), self.position.view(1), cross,
                               valid=self._keys <= self.position)
        next_token.copy_(_sample(logits, sampling))
        self.position.add_(1)

    def _graph_for(self, generation: _Generation) -> tp.Optional[_Graph]:
        graph = self._graphs.get(generation.key)
        if graph is None:
            try:
                graph = self._capture(generation)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                log.exception("CUDA graph capture failed: decoding eagerly over the static buffers from now on")
                self.graphs = False
                return None
        else:
            self._graphs.move_to_end(generation.key)
            for (k, v), (static_k, static_v) in zip(generation.cross, graph.cross, strict=True):
                if k is not None:
                    static_k.copy_(k)
                    static_v.copy_(v)
        generation.graph = graph
        return graph

    def _capture(self, generation: _Generation) -> _Graph:
        """Warm up on a side stream (then undo what the warm-up changed), then capture one step."""
        with torch.inference_mode(False):
            cross = [(None, None) if k is None else (k.clone(), v.clone()) for k, v in generation.cross]
        tokens, next_token = self._io[generation.key[0]]
        graph = _Graph(torch.cuda.CUDAGraph(), cross)
        position, rng = self.position.clone(), torch.cuda.get_rng_state(self.device)
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side), _autocast():
                    for _ in range(WARMUP_STEPS):
                        self._step(tokens, next_token, cross, generation.sampling)
                        self.position.copy_(position)
            finally:
                torch.cuda.current_stream().wait_stream(side)
                self.position.copy_(position)
                torch.cuda.set_rng_state(rng, self.device)
            with torch.cuda.graph(graph.graph), _autocast():
                self._step(tokens, next_token, cross, generation.sampling)
        self._graphs[generation.key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self.captures += 1
        log.info("captured a CUDA graph of one decoding step (batch %d, %d conditioning tokens, %s)",
                 *generation.key)
        return graph

    # The LM's forward over fixed buffers: MusicGen's layers (pre-norm, sinusoidal positions, cross-attention).

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                 cross: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]],
                 valid: tp.Optional[torch.Tensor]) -> torch.Tensor:
        """Logits `[B, K, S, card]` for `tokens` `[B, K, S]` at `positions`; `valid` (a step) marks the key
        positions written so far, None (a prefill at position 0) attends among the new keys only."""
        lm, transformer = self.lm, self.lm.transformer
        x = sum([lm.emb[k](tokens[:, k]) for k in range(lm.num_codebooks)])
        x = x + transformer.positional_scale * create_sin_embedding(
            positions.view(1, -1, 1), x.shape[-1], max_period=transformer.max_period, dtype=x.dtype)
        masks: tp.Dict[torch.dtype, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            attended = self._self_attention(index, layer.self_attn, layer.norm1(x), positions, valid, masks)
            x = x + layer.layer_scale_1(attended)
            if layer.cross_attention is not None:
                module, (k, v) = layer.cross_attention, cross[index]
                h = layer.norm_cross(x)
                q = rearrange(fast_lm._project(module, h, 0), f"b t (h d) -> {fast_lm._layout(module)}",
                              h=module.num_heads)
                x = x + layer.layer_scale_cross(fast_lm._attend(module, q, k, v, False, h.dtype))
            x = x + layer.layer_scale_2(layer.linear2(layer.activation(layer.linear1(layer.norm2(x)))))
        out = lm.out_norm(x) if lm.out_norm is not None else x
        return torch.stack([lm.linears[k](out) for k in range(lm.num_codebooks)], dim=1)

    def _self_attention(self, index: int, module: StreamingMultiheadAttention, h: torch.Tensor,
                        positions: torch.Tensor, valid: tp.Optional[torch.Tensor],
                        masks: tp.Dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
        time_dim = _get_attention_time_dimension(module.memory_efficient)
        bound = "b h p t d" if time_dim == 2 else "b t p h d"
        projected = torch.nn.functional.linear(h, module.in_proj_weight, module.in_proj_bias)
        q, k, v = torch.unbind(rearrange(projected, f"b t (p h d) -> {bound}", p=3, h=module.num_heads), dim=2)
        keys, values = self._buffers(index, k, time_dim)
        keys.index_copy_(time_dim, positions, k)
        values.index_copy_(time_dim, positions, v)
        if valid is None:  # the cache was empty: attend among the new keys, as stock does
            return fast_lm._attend(module, q, k, v, k.shape[time_dim] > 1, h.dtype)
        return _attend_masked(module, q, keys, values, valid, masks, h.dtype)

    def _buffers(self, index: int, k: torch.Tensor, time_dim: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        shape = list(k.shape)
        shape[time_dim] = self.capacity
        if index >= len(self._cache) or list(self._cache[index][0].shape) != shape \
                or self._cache[index][0].dtype != k.dtype:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("decoding buffers must exist before a capture")
            del self._cache[index:]
            self._graphs.clear()  # they read the buffers being replaced
            with torch.inference_mode(False):  # zeros: masked keys get weight 0, and 0 * NaN would not be 0
                self._cache.append((torch.zeros(shape, dtype=k.dtype, device=k.device),
                                    torch.zeros(shape, dtype=k.dtype, device=k.device)))
        return self._cache[index]


def _attend_masked(module: StreamingMultiheadAttention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   valid: torch.Tensor, masks: tp.Dict[torch.dtype, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Attention of one new query over every key position, the unwritten ones masked out; otherwise the
    operations audiocraft runs for this module (`fast_lm._attend`)."""
    layout = fast_lm._layout(module)
    if module.attention_as_float32:
        q, keys, values = q.float(), keys.float(), values.float()
    if module.memory_efficient:
        x = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=_mask(masks, valid, q.dtype))
    else:
        w = fast_lm._scores(module, q, keys, layout)
        w = w + _mask(masks, valid, dtype)  # stock adds its (all-zero) causal mask, in the input's dtype
        x = fast_lm._mix(w, values, layout)
    x = rearrange(x.to(dtype), f"{layout} -> b t (h d)", h=module.num_heads)
    return module.out_proj(x)


def _mask(masks: tp.Dict[torch.dtype, torch.Tensor], valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a key was written, -inf elsewhere; built once per step and dtype."""
    if dtype not in masks:
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
        masks[dtype] = mask.view(1, 1, 1, -1)  # [B, H, queries, keys], broadcast
    return masks[dtype]


def _autocast() -> tp.ContextManager[None]:
    """audiocraft's CUDA autocast, without the weight-cast cache, which graphs must not read from."""
    return torch.autocast("cuda", dtype=torch.float16, cache_enabled=False)


def _sample(all_logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The tail of LMModel._sample_next_token for single-step CFG: next tokens `[B, K, 1]`."""
    cond, uncond = all_logits.split(all_logits.shape[0] // 2, dim=0)
    logits = (uncond + (cond - uncond) * s.cfg_coef).permute(0, 1, 3, 2)[..., -1]  # [B, K, card]
    if s.use_sampling and s.temp > 0.0:
        probs = torch.softmax(logits / s.temp, dim=-1)
        if s.top_p > 0.0:
            return _sample_top_p(probs, s.top_p)
        if s.top_k > 0:
            return _sample_top_k(probs, s.top_k)
        return _multinomial(probs)
    return torch.argmax(logits, dim=-1, keepdim=True)


def _multinomial(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row, as `torch.multinomial(probs, 1)` makes it (argmax of p / q with q ~ Exp(1), the same
    random numbers from the same generator) minus its checks, which read the probabilities back to the host."""
    flat = probs.reshape(-1, probs.shape[-1])
    q = torch.empty_like(flat).exponential_(1)
    return torch.argmax(flat / q, dim=-1, keepdim=True).reshape(*probs.shape[:-1], 1)


def _sample_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """audiocraft.utils.utils.sample_top_k with `_multinomial`."""
    top_k_value, _ = torch.topk(probs, k, dim=-1)
    probs *= (probs >= top_k_value[..., -1:]).float()  # audiocraft indexes [..., [-1]]: the same values, copied
    probs.div_(probs.sum(dim=-1, keepdim=True))
    return _multinomial(probs)


def _sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """audiocraft.utils.utils.sample_top_p with `_multinomial`."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort *= (~(probs_sum - probs_sort > p)).float()
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, _multinomial(probs_sort))
