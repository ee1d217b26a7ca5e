"""The LM's whole decoding step in one C++ call, over app/lean_step.py's whole-layer steps.

With every layer's step one call of this service's kernels (lean_step's `whole_layer`), what was left of a step in
Python was audiocraft around the layers: LMModel.forward's embeddings, fuser and output heads, and
StreamingTransformer.forward's sinusoid and module call per layer, ~1-1.5 ms of a ~15 ms step on two cores at
musicgen-small's size. `install` gives such an LM a `forward` that runs the steady step (one new token of every
codebook, in streaming mode, conditions already encoded) in one call of app/csrc/lean_lm.cpp: the codebooks'
embeddings summed, the position's sinusoid, every layer's step, the output norm and heads. It then moves the
streaming state on as audiocraft would (the transformer's and the fuser's offsets, each layer's cache length).
Anything else (a prompt or first step, a stage, a conditioning summed into the input, a cache to grow, training)
runs LMModel.forward, which app/fast_lm.py and app/lean_step.py cover.

Logits agree with the layers' steps under audiocraft's LM within float rounding (the sinusoid's cos and sin are the
C library's, not torch's). The layers' forward pre-hooks run before each layer, as audiocraft's forward runs them
(app/model.py's, where the threads policy looks between layers); a layer with any other hook takes audiocraft's
forward; hooks on the embeddings, the transformer, the output norm and heads do not run on that step (the LM's own
do). The call leaves the interpreter to the server's other threads while it runs, and takes it back for each pre-hook.
"""

import functools
import types
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from torch.nn.modules import module as module_hooks

from .kernel_build import build

__all__ = ["install", "installed"]


class _Plan(tp.NamedTuple):
    step: tp.Any  # the extension's `LM`
    # Per layer: the self-attention module (its streaming state holds the cache) and the cross-attention's or None.
    attentions: tp.List[tp.Tuple[torch.nn.Module, tp.Optional[torch.nn.Module]]]


class _Caches(tp.NamedTuple):
    """One steady step's arguments: every layer's caches, as the extension's `LM.step` takes them."""
    length: int
    states: tp.List[tp.Dict[str, tp.Any]]
    keys: tp.List[torch.Tensor]
    values: tp.List[torch.Tensor]
    cross_keys: tp.List[tp.Optional[torch.Tensor]]
    cross_values: tp.List[tp.Optional[torch.Tensor]]
    key_scales: tp.List[tp.Optional[torch.Tensor]]
    value_scales: tp.List[tp.Optional[torch.Tensor]]


def install(lm: LMModel) -> int:
    """Give `lm` the whole step where every one of its layers runs lean_step's whole-layer step and its own parts
    fit the extension; returns 1 where it did, else 0."""
    plans = [getattr(layer, "lean_plan", None) for layer in lm.transformer.layers]
    if type(lm).forward is not LMModel.forward or not plans or any(plan is None or plan.whole is None
                                                                  for plan in plans):
        return 0  # a subclass's own forward (MAGNeT's LM, say) is not what the extension computes
    parts = _parts(lm)
    kernels = _kernels()
    if parts is None or kernels is None:
        return 0
    try:
        step = kernels.LM(*parts[:3], [plan.whole for plan in plans], *parts[3:])
    except RuntimeError:  # what it does not take (widths, an output norm's shape, heads of different sizes)
        return 0
    attentions = [(plan.self_attention.module, None if plan.cross_attention is None else plan.cross_attention.module)
                  for plan in plans]
    lm.lean_lm = _Plan(step, attentions)
    lm.forward = types.MethodType(_forward, lm)
    return 1


def installed(lm: LMModel) -> bool:
    """Whether `install` gave `lm` the whole step."""
    return getattr(lm, "lean_lm", None) is not None


@functools.cache
def _kernels() -> tp.Optional[types.ModuleType]:
    return build("whole-LM decoding steps", "the layers' steps under audiocraft's LM")


def _parts(lm: LMModel) -> tp.Optional[tp.Tuple[tp.Any, ...]]:
    """The extension's `LM` arguments but the layers: embeddings, the sinusoid's periods, its scale, the output norm,
    the heads; None where a part is not what the extension computes."""
    transformer = lm.transformer
    if transformer.positional_embedding != "sin" or any(type(emb).forward is not torch.nn.Embedding.forward
                                                        or emb.max_norm is not None for emb in lm.emb):
        return None
    embeddings = [emb.weight.detach() for emb in lm.emb]
    if any(weight.dtype != torch.float32 or weight.device.type != "cpu" for weight in embeddings):
        return None
    heads = [getattr(linear, "product_args", None) for linear in lm.linears]  # on this service's int8 kernel
    if any(head is None for head in heads):
        return None
    norm = lm.out_norm
    if norm is not None and type(norm) is not torch.nn.LayerNorm:
        return None
    out_norm = None if norm is None else (norm.weight, norm.bias, norm.eps)
    # audiocraft's create_sin_embedding divides each position by these, made by torch as it makes them.
    half = lm.dim // 2
    exponents = torch.arange(half, dtype=torch.float32) / (half - 1)
    periods = torch.full([], transformer.max_period, dtype=torch.float32) ** exponents
    return ([weight.contiguous() for weight in embeddings], periods, float(transformer.positional_scale), out_norm,
            heads)


def _forward(self: LMModel, sequence: torch.Tensor, conditions: tp.List[tp.Any],
             condition_tensors: tp.Optional[tp.Dict[str, tp.Any]] = None, stage: int = -1) -> torch.Tensor:
    plan: _Plan = self.lean_lm
    caches = _steady(self, plan, sequence, conditions, condition_tensors, stage)
    if caches is None:
        return LMModel.forward(self, sequence, conditions, condition_tensors, stage)
    transformer, fuser = self.transformer._streaming_state, self.fuser._streaming_state
    position = int(transformer["offsets"][0])
    logits = plan.step.step(sequence, position, caches.length, caches.keys, caches.values, caches.cross_keys,
                            caches.cross_values, caches.key_scales, caches.value_scales, _pre_hooks(self))
    for state in caches.states:
        state["static_length"] = caches.length + 1
    transformer["offsets"] = transformer["offsets"] + 1
    fuser["offsets"] = fuser["offsets"] + 1
    return logits


def _steady(lm: LMModel, plan: _Plan, sequence: torch.Tensor, conditions: tp.List[tp.Any],
            condition_tensors: tp.Optional[tp.Dict[str, tp.Any]], stage: int) -> tp.Optional[_Caches]:
    """Every layer's caches, where the whole step applies: one new token of every codebook in streaming mode after
    a first step, conditions encoded and only cross-attended (or prepended before), every layer's cache with the
    same length and room for one more, its cross-attention's keys and values those of this conditioning; else
    None."""
    if (conditions or condition_tensors is None or stage >= 0 or lm.training or not lm._is_streaming
            or sequence.dim() != 3 or sequence.shape[-1] != 1 or "offsets" not in lm.fuser._streaming_state
            or "offsets" not in lm.transformer._streaming_state or not _plain_hooks_only(lm)):
        return None
    cross_src = _cross_source(lm.fuser, condition_tensors)
    length = plan.attentions[0][0]._streaming_state.get("static_length")
    if length is None:
        return None
    caches = _Caches(length, [], [], [], [], [], [], [])
    for attention, cross in plan.attentions:
        state = attention._streaming_state
        if state.get("static_length") != length or state["static_k"].shape[2] <= length:
            return None
        caches.states.append(state)
        caches.keys.append(state["static_k"])
        caches.values.append(state["static_v"])
        caches.key_scales.append(state.get("static_k_scale"))
        caches.value_scales.append(state.get("static_v_scale"))
        if cross is None:
            caches.cross_keys.append(None)
            caches.cross_values.append(None)
            continue
        cross_state = cross._streaming_state
        if cross_src is None or cross_state.get("cross_src") is not cross_src:
            return None
        caches.cross_keys.append(cross_state["cross_k"])
        caches.cross_values.append(cross_state["cross_v"])
    return caches


def _plain_hooks_only(lm: LMModel) -> bool:
    """Whether the layers' hooks are forward pre-hooks called with the input alone (what `_pre_hooks` runs), and no
    global module hook is registered."""
    if module_hooks._global_forward_pre_hooks or module_hooks._global_forward_hooks:
        return False
    return not any(layer._forward_hooks or layer._forward_pre_hooks_with_kwargs for layer in lm.transformer.layers)


def _pre_hooks(lm: LMModel) -> tp.Optional[tp.Callable[[int, torch.Tensor], tp.Optional[torch.Tensor]]]:
    """The extension's `before_layer`: layer `index`'s forward pre-hooks on its input `x`, as a module call runs
    them (an input one returns goes on to the next and to the layer); None where no layer has one."""
    layers = lm.transformer.layers
    if not any(layer._forward_pre_hooks for layer in layers):
        return None

    def before_layer(index: int, x: torch.Tensor) -> tp.Optional[torch.Tensor]:
        layer, given = layers[index], x
        for hook in tuple(layer._forward_pre_hooks.values()):
            result = hook(layer, (x,))
            if result is not None:
                x = result[0] if isinstance(result, tuple) else result
        return None if x is given else x

    return before_layer


def _cross_source(fuser: torch.nn.Module, condition_tensors: tp.Dict[str, tp.Any]) -> tp.Optional[torch.Tensor]:
    """What audiocraft's ConditionFuser gives the layers to cross-attend to after a first step, where that is one
    condition as it is and nothing else changes the input; else None."""
    if fuser.cross_attention_pos_emb:
        return None
    crossed = []
    for name, (condition, _) in condition_tensors.items():
        method = fuser.cond2fuse.get(name)
        if method == "cross":
            crossed.append(condition)
        elif method != "prepend":  # summed into or interpolated onto the input, or unknown: audiocraft's forward
            return None
    return crossed[0] if len(crossed) == 1 else None
