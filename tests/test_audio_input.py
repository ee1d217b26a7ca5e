"""Reading audio inputs (app/audio_input.py): every format libsndfile reads, any rate and channel count in
range, and every broken or hostile file refused with the field's name, without decoding more than it must."""

import base64
import tracemalloc

import numpy as np
import pytest
import torch
from audiocraft.data.audio_utils import convert_audio

from app import audio_input
from app.audio_input import AudioInputError
from tests.audio_samples import INPUT_FORMATS, b64, bad_inputs, encode, flac_claiming, tone, wav64


@pytest.mark.parametrize("name", list(INPUT_FORMATS))
def test_every_input_format_becomes_32khz(name):
    container, subtype, rate = INPUT_FORMATS[name]
    clip = audio_input.read("audio_prompt", b64(encode(tone(3.0, rate, 2), rate, container, subtype)))
    assert clip.sample_rate == 32000 and clip.wav.dtype == torch.float32
    assert clip.wav.shape[0] == 2 and abs(clip.seconds - 3.0) < 0.01, clip.wav.shape


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000, 192000])
def test_usual_rates_resample_as_audiocraft_does(rate):
    samples = tone(2.0, rate)
    clip = audio_input.read("melody", wav64(2.0, rate))
    # What generate_continuation / generate_with_chroma would have made of the same samples.
    quantized = torch.from_numpy(np.round(samples.T * 32767) / 32768).float()
    assert torch.allclose(clip.wav, convert_audio(quantized, rate, 32000, 1), atol=1e-4)
    assert clip.wav.shape == (1, 64000)


def test_an_odd_rate_is_resampled_quickly_and_faithfully():
    # julius would build 32000 filters for 44101 Hz (over a minute of work): soxr takes it.
    clip = audio_input.read("melody", wav64(3.0, 44101, freq=1000.0))
    assert clip.wav.shape == (1, 96000)
    spectrum = torch.fft.rfft(clip.wav[0, 16000:80000]).abs()
    assert abs(spectrum.argmax().item() / 2 - 1000) <= 1  # still a 1 kHz tone (bins of 0.5 Hz)


def test_eight_channels_keep_their_first_two_and_mono_stays_mono():
    samples = tone(2.0, 48000, 8)
    clip = audio_input.read("audio_prompt", b64(encode(samples, 48000)))
    assert clip.wav.shape == (2, 64000)
    expected = convert_audio(torch.from_numpy(np.round(samples[:, :2].T * 32767) / 32768).float(), 48000, 32000, 2)
    assert torch.allclose(clip.wav, expected, atol=1e-4)
    assert audio_input.read("audio_prompt", wav64(2.0)).wav.shape == (1, 64000)


def test_base64_with_line_breaks_or_a_data_url_prefix_is_accepted():
    data = encode(tone(1.5), 32000)
    wrapped = base64.encodebytes(data).decode()  # 76-character lines, as `base64` prints them
    assert "\n" in wrapped
    for text in (wrapped, "data:audio/wav;base64," + b64(data), "data:;base64," + b64(data)):
        assert audio_input.read("melody", text).wav.shape == (1, 48000)


def test_a_flac_stream_of_unknown_length_is_read_to_its_end():
    # What a FLAC encoder writing to a pipe makes: STREAMINFO's total is 0; soundfile's own read fails there.
    assert audio_input.read("audio_prompt", b64(flac_claiming(0, 5.0, rate=48000))).seconds == 5.0


def test_silence_and_exact_limits_are_accepted():
    assert audio_input.read("melody", b64(encode(np.zeros((32000, 1), np.float32), 32000))).wav.abs().max() == 0
    assert audio_input.read("melody", wav64(60.0, rate=8000)).seconds == 60.0
    assert audio_input.read("melody", wav64(1.0, rate=8000)).seconds == 1.0


@pytest.mark.parametrize("what, text, says", bad_inputs(), ids=[case[0] for case in bad_inputs()])
@pytest.mark.parametrize("field", ["melody", "audio_prompt"])
def test_bad_inputs_are_refused_naming_the_field(field, what, text, says):
    with pytest.raises(AudioInputError) as refused:
        audio_input.read(field, text)
    assert str(refused.value).startswith(f"{field}: ") and says in str(refused.value), str(refused.value)
    assert refused.value.field == field


@pytest.mark.parametrize("claimed", [0, 100])
def test_a_small_file_that_expands_to_minutes_stops_decoding_early(claimed):
    """Ten minutes of 48 kHz silence: 87 KiB of FLAC, 115 MB as float32. Whether its header says
    it is unknown (0) or short (100 frames), decoding stops a little past 60 s, in bounded memory."""
    data = flac_claiming(claimed, 600.0, rate=48000)
    assert len(data) < 128 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(AudioInputError, match="too long|too short"):
            audio_input.read("melody", b64(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB"  # 60 s of mono float32 at 48 kHz is 11 MiB
