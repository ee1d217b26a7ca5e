"""The LM's numeric precision on CPU (MUSICGEN_PRECISION).

Decoding one step reads every weight of the LM once, so on CPU a step costs about the time to
stream the weights from memory: halving their size nearly halves the step.
- `bf16`: the transformer and output heads in bfloat16 end to end (as transformers' MusicGen in bf16),
  except what must stay fp32: the codebook embeddings' sum, the sinusoidal positional embedding (audiocraft
  computes it in the input's dtype, and positions in bf16 are rounded to multiples of 8 past 1024), and
  the logits handed to sampling.
- `bf16-autocast`: weights of the matrix products in bf16 under CPU autocast, the way audiocraft runs fp16
  on CUDA (residual stream and norms in fp32): closer to fp32, slower (a cast around every product).
- `int8-dynamic`: every matrix product a decoding step runs (attention projections, audiocraft's fused ones
  included, feed-forward, output heads) with int8 weights and int8 activations quantized at each call, the
  rest in fp32 (`app/fast_lm.py`'s `Int8Linear`, applied by `fast_lm.install(int8_weights=True)`): a quarter
  of fp32's bytes, and on AVX512-VNNI it drifted less from fp32 than `bf16` (docs/benchmarks.md).
On CUDA audiocraft's own fp16 autocast applies and this setting is ignored.
"""

import logging
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.transformer import StreamingMultiheadAttention, StreamingTransformer, create_sin_embedding

from . import fast_lm
from .config import PRECISIONS

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "apply", "resolve"]


def resolve(precision: str, device: str) -> str:
    """`auto`: int8-dynamic where the CPU has VNNI (8-bit dot products), else bf16 where it computes bf16
    natively (AVX512-BF16/AMX), else fp32; on CUDA `autocast` (audiocraft's own fp16). int8-dynamic was the
    fastest choice and drifted less from fp32 than bf16, on random weights and on sharpened output heads
    (docs/benchmarks.md); without VNNI its activations keep 7 bits, a drift not measured, so it is not chosen."""
    if not device.startswith("cpu"):
        return "autocast"
    if precision == "auto":
        if fast_lm.can_quantize() and torch.cpu._is_vnni_supported():
            return "int8-dynamic"
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    if precision == "int8-dynamic" and not fast_lm.can_quantize():
        log.warning("MUSICGEN_PRECISION=int8-dynamic: this torch build or CPU has no fbgemm int8 kernels; fp32")
        return "fp32"
    return precision


def _matmul_weights(lm: LMModel) -> tp.Iterator[torch.nn.Parameter]:
    for module in list(lm.transformer.modules()) + list(lm.linears.modules()):
        if isinstance(module, torch.nn.Linear):
            yield from (p for p in (module.weight, module.bias) if p is not None)
        elif isinstance(module, StreamingMultiheadAttention) and module.custom:
            yield from (p for p in (module.in_proj_weight, module.in_proj_bias) if p is not None)


class _AutocastLM(LMModel):
    """The LM under CPU bf16 autocast (a class, not a wrapped bound method, so that copies stay right)."""

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = super().forward(*args, **kwargs)
        return logits.float()  # sampling (softmax, top-k/top-p, CFG mix) stays in fp32


def _logits_to_fp32(module: LMModel, args: tp.Any, logits: torch.Tensor) -> torch.Tensor:
    return logits.float()


def _to_bf16_with_fp32_positions(lm: LMModel) -> None:
    transformer: StreamingTransformer = lm.transformer
    for module in (transformer, lm.out_norm, lm.linears):
        if module is not None:
            module.to(torch.bfloat16)
    for module in transformer.modules():
        if isinstance(module, StreamingMultiheadAttention):
            # Attention itself in fp32: torch's CPU attention kernels ran bf16 at half the speed of fp32 over long
            # contexts, and the weights (what makes a step slow) are bf16 either way.
            module.attention_as_float32 = True
    sin = transformer.positional_embedding in ("sin", "sin_rope")
    if sin:  # added in fp32 by the hook below instead; rope (if any) keeps its own path
        transformer.positional_embedding = "rope" if transformer.positional_embedding == "sin_rope" else "none"
    last: tp.Dict[str, torch.Tensor] = {}  # the conditioning's bf16 copy, one per generation (same object each step)

    def enter_bf16(module: StreamingTransformer, args: tp.Tuple[tp.Any, ...],
                   kwargs: tp.Dict[str, tp.Any]) -> tp.Tuple[tp.Tuple[tp.Any, ...], tp.Dict[str, tp.Any]]:
        x = args[0]
        if sin:  # what StreamingTransformer.forward does, in fp32, from the same streaming offsets
            B, T, C = x.shape
            offsets = module._streaming_state.get("offsets", torch.zeros(B, dtype=torch.long, device=x.device))
            positions = torch.arange(T, device=x.device).view(1, -1, 1) + offsets.view(-1, 1, 1)
            x = x + module.positional_scale * create_sin_embedding(positions, C, module.max_period, dtype=x.dtype)
        src = kwargs.get("cross_attention_src")
        if src is not None and src.dtype != torch.bfloat16:
            if last.get("src") is not src:
                last["src"], last["bf16"] = src, src.to(torch.bfloat16)
            kwargs["cross_attention_src"] = last["bf16"]
        return (x.to(torch.bfloat16), *args[1:]), kwargs

    transformer.register_forward_pre_hook(enter_bf16, with_kwargs=True)
    lm.register_forward_hook(_logits_to_fp32)


def apply(lm: LMModel, precision: str, device: str) -> str:
    """Convert `lm` in place for `precision` (one of PRECISIONS); returns the precision in effect.
    `int8-dynamic` leaves the weights as they are here: `fast_lm.install(int8_weights=True)` quantizes them,
    as it packs them, since it is what reaches audiocraft's fused attention projections."""
    resolved = resolve(precision, device)
    if resolved == "autocast" and precision not in ("auto", "fp32"):
        log.warning("MUSICGEN_PRECISION=%s applies on CPU only; %s uses audiocraft's fp16 autocast", precision, device)
    if resolved == "bf16":
        _to_bf16_with_fp32_positions(lm)
    elif resolved == "bf16-autocast":
        for param in _matmul_weights(lm):
            param.data = param.data.to(torch.bfloat16)  # autocast leaves tensors already in bf16 as they are
        if type(lm) is LMModel:
            lm.__class__ = _AutocastLM
    return resolved
