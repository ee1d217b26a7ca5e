import io
import math

import numpy as np
import pytest
import soundfile
import torch

from app.audio import ENCODINGS, encode, normalize, to_wav
from tests.audio_samples import decode
from tests.helpers import wav_info


def tone(channels=1, seconds=1.0, amplitude=0.5):
    t = torch.arange(int(32000 * seconds)) / 32000
    return torch.stack([amplitude * torch.sin(2 * math.pi * (220 + 110 * c) * t) for c in range(channels)])


@pytest.mark.parametrize("strategy", ["loudness", "peak", "rms", "clip"])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_is_32khz_16bit_with_the_model_channels(strategy, channels):
    data = to_wav(tone(channels, 2.0), 32000, strategy)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert wav_info(data) == (32000, 2, channels, 2.0)


def test_loudness_matches_audiocraft_demo_settings_and_never_clips():
    loud = to_wav(tone(amplitude=3.0), 32000, "loudness")  # far over full scale
    samples = torch.frombuffer(bytearray(loud[44:]), dtype=torch.int16)
    assert samples.abs().max() < 32767  # tanh soft clipping keeps it inside


@pytest.mark.parametrize("strategy", ["loudness", "peak", "rms", "clip"])
def test_silence_and_nan_become_silence_not_an_error(strategy):
    for wav in (torch.zeros(1, 32000), torch.full((1, 32000), float("nan"))):
        data = to_wav(wav, 32000, strategy)
        assert torch.frombuffer(bytearray(data[44:]), dtype=torch.int16).abs().max() == 0


@pytest.mark.parametrize("format", list(ENCODINGS))
@pytest.mark.parametrize("channels", [1, 2])
def test_every_format_decodes_back_to_32khz_with_its_channels_and_length(format, channels):
    data = encode(tone(channels, 3.0), 32000, format)
    samples, rate = decode(data)
    assert (rate, samples.shape[1]) == (32000, channels)
    assert abs(len(samples) - 3 * 32000) <= (1152 if format == "mp3" else 0), len(samples)  # MP3: one frame
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype) == ENCODINGS[format][:2]


def test_compressed_formats_are_smaller_and_a_minute_of_ogg_does_not_crash():
    wav = tone(2, 60.0)  # libvorbis overflowed its stack on a minute written in one call
    sizes = {format: len(encode(wav, 32000, format)) for format in ENCODINGS}
    assert sizes["mp3"] < sizes["wav"] / 4 and sizes["ogg"] < sizes["wav"] / 4 and sizes["flac"] < sizes["wav"]


def test_wav_is_byte_for_byte_what_version_1_0_wrote():
    wav = tone(2, 2.0, amplitude=0.9)
    old = io.BytesIO()
    soundfile.write(old, normalize(wav, 32000, "loudness").t().numpy(), 32000, format="WAV", subtype="PCM_16")
    assert to_wav(wav, 32000) == encode(wav, 32000, "wav", "loudness") == old.getvalue()


@pytest.mark.parametrize("format", list(ENCODINGS))
def test_every_strategy_sets_a_different_level(format):
    levels = {strategy: float(np.abs(decode(encode(tone(amplitude=0.1), 32000, format, strategy))[0]).max())
              for strategy in ("loudness", "peak", "rms", "clip")}
    assert abs(levels["peak"] - 10 ** (-1 / 20)) < 0.02  # -1 dBFS
    assert abs(levels["clip"] - 0.1) < 0.02  # the raw level
    assert len({round(level, 2) for level in levels.values()}) == 4, levels
