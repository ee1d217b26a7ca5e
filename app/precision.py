"""The LM's numeric precision on CPU (MUSICGEN_PRECISION).

Decoding one step reads every weight of the LM once, so on CPU a step costs about the time to
stream the weights from memory: halving their size nearly halves the step.
- `bf16`: the transformer and output heads in bfloat16 end to end (as transformers' MusicGen in bf16),
  except what must stay fp32: the codebook embeddings' sum, the sinusoidal positional embedding (audiocraft
  computes it in the input's dtype, and positions in bf16 are rounded to multiples of 8 past 1024), and
  the logits handed to sampling.
- `bf16-autocast`: weights of the matrix products in bf16 under CPU autocast, the way audiocraft runs fp16
  on CUDA (residual stream and norms in fp32): closer to fp32, slower (a cast around every product).
- `int8-dynamic`: PyTorch's dynamic int8 quantization of the `nn.Linear` layers.
On CUDA audiocraft's own fp16 autocast applies and this setting is ignored.
"""

import logging
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.transformer import StreamingMultiheadAttention, StreamingTransformer, create_sin_embedding

from .config import PRECISIONS

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "apply", "resolve"]


def resolve(precision: str, device: str) -> str:
    """`auto`: bf16 where the CPU computes it natively (AVX512-BF16/AMX), else fp32; on CUDA `autocast`
    (audiocraft's own fp16). bf16 is the fastest choice whose drift from fp32 is small (docs/benchmarks.md:
    mean KL of next-token distributions ~4e-4 nats, top-1 agreement ~93% on near-flat random-weight ones)."""
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
    """Convert `lm` in place for `precision` (one of PRECISIONS); returns the precision in effect."""
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
    elif resolved == "int8-dynamic":
        # Only nn.Linear is quantized: audiocraft's fused attention input projections stay fp32.
        for name in ("transformer", "linears"):
            torch.ao.quantization.quantize_dynamic(getattr(lm, name), {torch.nn.Linear}, dtype=torch.qint8,
                                                   inplace=True)
    return resolved
