"""MUSICGEN_DECODER_PRECISION: the EnCodec decoder in bf16 stays close to fp32, for audiocraft's and
transformers' EnCodec (what the released checkpoints load), and its callers still see fp32."""

import copy

import pytest
import torch
from audiocraft.models.encodec import HFEncodecCompressionModel, InterleaveStereoCompressionModel
from transformers import EncodecConfig, EncodecModel

from app import codec, debug_models
from app.config import ConfigError, Settings

needs_bf16 = pytest.mark.skipif(codec.resolve("auto", "cpu") != "bf16", reason="no native bf16 on this CPU")


def hf_encodec() -> HFEncodecCompressionModel:
    """transformers' EnCodec with the 32 kHz model's structure (weight norm, LSTM), tiny, random codebooks."""
    config = EncodecConfig(audio_channels=1, codebook_size=64, codebook_dim=16, hidden_size=16, num_filters=4,
                           num_lstm_layers=2, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.2],  # 4 codebooks
                           norm_type="weight_norm",
                           sampling_rate=32000, normalize=False, chunk_length_s=None, overlap=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EncodecModel(config).eval()
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()  # zeros (the initial value) decode to silence
    return HFEncodecCompressionModel(model)


def relative_error(codec_model, other, codes):
    with torch.inference_mode():
        expected, got = codec_model.decode(codes), other.decode(codes)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    return float((got - expected).pow(2).mean() / expected.pow(2).mean())


@needs_bf16
@pytest.mark.parametrize("kind", ["audiocraft", "transformers"])
def test_bf16_decoder_stays_close_to_fp32(kind):
    build = debug_models.build_compression_model if kind == "audiocraft" else hf_encodec
    stock, fast = build(), build()  # the same seeded weights (weight-normalised modules cannot be deep-copied)
    assert codec.apply(fast, "auto", "cpu") == "bf16"
    decoder = codec.decoder_of(fast)
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in decoder.modules())  # weight norm folded
    torch.manual_seed(1)
    codes = torch.randint(0, fast.cardinality, (2, fast.num_codebooks, 40))
    error = relative_error(stock, fast, codes)
    assert 0 < error < 1e-3, error
    # The quantizer (what MultiBand Diffusion reads through decode_latent) is untouched.
    with torch.inference_mode():
        assert torch.equal(fast.decode_latent(codes), stock.decode_latent(codes))


@needs_bf16
def test_stereo_codec_decodes_both_channels_in_bf16():
    stereo = InterleaveStereoCompressionModel(debug_models.build_compression_model())
    fast = copy.deepcopy(stereo)
    assert codec.apply(fast, "bf16", "cpu") == "bf16"
    assert codec.decoder_of(fast) is fast.model.decoder
    codes = torch.randint(0, fast.cardinality, (1, fast.num_codebooks, 20))
    assert relative_error(stereo, fast, codes) < 1e-3


def test_fp32_and_cuda_leave_the_decoder_alone():
    model = debug_models.build_compression_model()
    assert codec.apply(model, "fp32", "cpu") == "fp32"
    assert codec.resolve("bf16", "cuda") == "fp32"
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_decoder_precision_setting_is_validated():
    assert Settings().decoder_precision == "auto"
    assert Settings.from_env({"MUSICGEN_DECODER_PRECISION": "fp32"}).decoder_precision == "fp32"
    with pytest.raises(ConfigError, match="MUSICGEN_DECODER_PRECISION"):
        Settings.from_env({"MUSICGEN_DECODER_PRECISION": "int8"})
