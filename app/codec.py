"""The EnCodec decoder's precision on CPU (MUSICGEN_DECODER_PRECISION): tokens -> waveform in bf16.

The real 32 kHz EnCodec's decoder (28 M parameters: convolutions up to 32 kHz and a 2-layer LSTM over 1024
channels) took 200-300 ms per second of audio on one core in fp32, a fifth of a real-time job once the LM
runs in real time. In bf16 on a CPU with native bf16 it ran 2.7x faster, 1e-5 relative squared error from
fp32 (docs/benchmarks.md). Only the decoder changes: the quantizer's codebook look-up (what MultiBand
Diffusion also reads) stays fp32, and the decoder's input and output stay fp32 for every caller.
"""

import typing as tp

import torch
from audiocraft.models.encodec import CompressionModel, HFEncodecCompressionModel, InterleaveStereoCompressionModel

from .config import DECODER_PRECISIONS

__all__ = ["DECODER_PRECISIONS", "apply", "decoder_of", "resolve"]


def resolve(precision: str, device: str) -> str:
    """`auto`: bf16 where the CPU computes it natively (AVX512-BF16/AMX), else fp32; CUDA keeps fp32."""
    if not device.startswith("cpu"):
        return "fp32"
    if precision == "auto":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bf16" if native else "fp32"
    return precision


def decoder_of(codec: CompressionModel) -> tp.Optional[torch.nn.Module]:
    """The module that turns quantized latents into audio: audiocraft's SEANet decoder or transformers'."""
    if isinstance(codec, InterleaveStereoCompressionModel):
        codec = codec.model
    if isinstance(codec, HFEncodecCompressionModel):
        return codec.model.decoder
    return getattr(codec, "decoder", None)


def apply(codec: CompressionModel, precision: str, device: str) -> str:
    """Convert the decoder of `codec` in place for `precision`; returns the precision in effect."""
    resolved = resolve(precision, device)
    decoder = decoder_of(codec)
    if resolved != "bf16" or decoder is None:
        return "fp32"
    _fold_weight_norm(decoder)  # computed once in fp32, instead of in bf16 at every call
    decoder.to(torch.bfloat16)
    decoder.register_forward_pre_hook(_inputs_to_bf16)
    decoder.register_forward_hook(_output_to_fp32)
    return resolved


def _fold_weight_norm(module: torch.nn.Module) -> None:
    """Replace weight-normalised weights (transformers' parametrizations, audiocraft's hooks) by their value."""
    for child in list(module.modules()):
        if torch.nn.utils.parametrize.is_parametrized(child, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(child, "weight")
        for hook in list(child._forward_pre_hooks.values()):
            if isinstance(hook, torch.nn.utils.weight_norm.WeightNorm):
                torch.nn.utils.remove_weight_norm(child, hook.name)


def _inputs_to_bf16(module: torch.nn.Module, args: tp.Tuple[tp.Any, ...]) -> tp.Tuple[tp.Any, ...]:
    return tuple(x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else x for x in args)


def _output_to_fp32(module: torch.nn.Module, args: tp.Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()
