"""The LM's numeric precision on CPU (MUSICGEN_PRECISION).

Decoding one step reads every weight of the LM once, so on CPU a step costs about the time to
stream the weights from memory: halving their size nearly halves the step. `bf16` stores the
weights of the LM's matrix products in bfloat16 and runs the LM under CPU autocast, the way
audiocraft runs fp16 on CUDA: matrix products in bf16, the residual stream, norms, positional
embedding and softmax of the logits in fp32 (positions in bf16 would be rounded to multiples of 8
past 1024). `int8-dynamic` quantizes the `nn.Linear` layers with PyTorch's dynamic quantization.
On CUDA audiocraft's own fp16 autocast applies and this setting is ignored.
"""

import logging
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.transformer import StreamingMultiheadAttention

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8-dynamic")


def resolve(precision: str, device: str) -> str:
    """`auto`: bf16 where the CPU computes it natively (AVX512-BF16/AMX; measured drift is small,
    see docs/benchmarks.md), else fp32. On CUDA: `autocast` (audiocraft's own fp16)."""
    if not device.startswith("cpu"):
        return "autocast"
    if precision == "auto":
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    return precision


def _matmul_weights(lm: LMModel) -> tp.Iterator[torch.nn.Parameter]:
    for module in list(lm.transformer.modules()) + list(lm.linears.modules()):
        if isinstance(module, torch.nn.Linear):
            yield from (p for p in (module.weight, module.bias) if p is not None)
        elif isinstance(module, StreamingMultiheadAttention) and module.custom:
            yield from (p for p in (module.in_proj_weight, module.in_proj_bias) if p is not None)


def _autocast_forward(forward: tp.Callable[..., torch.Tensor]) -> tp.Callable[..., torch.Tensor]:
    def bf16_forward(*args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(*args, **kwargs)
        return logits.float()  # sampling (softmax, top-k/top-p, CFG mix) stays in fp32
    return bf16_forward


def apply(lm: LMModel, precision: str, device: str) -> str:
    """Convert `lm` in place for `precision` (one of PRECISIONS); returns the precision in effect."""
    resolved = resolve(precision, device)
    if resolved == "autocast" and precision not in ("auto", "fp32"):
        log.warning("MUSICGEN_PRECISION=%s applies on CPU only; %s uses audiocraft's fp16 autocast", precision, device)
    if resolved == "bf16":
        for param in _matmul_weights(lm):
            param.data = param.data.to(torch.bfloat16)  # autocast leaves tensors already in bf16 as they are
        lm.forward = _autocast_forward(lm.forward)
    elif resolved == "int8-dynamic":
        # Only nn.Linear is quantized: audiocraft's fused attention input projections stay fp32.
        for name in ("transformer", "linears"):
            torch.ao.quantization.quantize_dynamic(getattr(lm, name), {torch.nn.Linear}, dtype=torch.qint8,
                                                   inplace=True)
    return resolved
