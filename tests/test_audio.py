import math

import pytest
import torch

from app.audio import to_wav
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
