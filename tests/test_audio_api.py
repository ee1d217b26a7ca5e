"""Version 1.1 through a real gunicorn with the tiny models: formats, normalization, continuation, and every
kind of bad audio input refused with a 400 that names its field, leaving the slot free."""

import base64
import json
import typing as tp

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings

from app import audio_input, debug_models
from app import codec as codec_precision
from app.config import Settings
from tests.audio_samples import b64, bad_inputs, decode, encode, melody, tone, wav64
from tests.helpers import events, generate, wav_info

V1_0_START = {"event", "model", "sample_rate", "channels", "duration", "seed", "mbd"}
V1_0_COMPLETED = {"event", "sample_rate", "channels", "duration", "seed", "audio"}


def run(url: str, **body: tp.Any) -> tp.List[tp.Dict[str, tp.Any]]:
    """Every event of one generation that must be accepted."""
    with generate(url, {"description": "audio in, audio out", **body}) as r:
        assert r.status_code == 200, r.text
        received = list(events(r))
    assert received[-1]["event"] == "completed", received[-1]
    return received


def refused(url: str, **body: tp.Any) -> str:
    """The message of a 400 (and the slot is still free)."""
    r = generate(url, {"description": "refused", "duration": 3, **body}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"] == "application/json" and r.json()["event"] == "error"
    return r.json()["message"]


def samples_of(done: tp.Dict[str, tp.Any]) -> tp.Tuple[np.ndarray, int]:
    return decode(base64.b64decode(done["audio"], validate=True))


def test_a_request_without_the_new_fields_gets_the_1_0_stream(idle_server):
    plain = run(idle_server.url, duration=2, seed=11)
    assert set(plain[0]) == V1_0_START and set(plain[-1]) == V1_0_COMPLETED
    assert wav_info(base64.b64decode(plain[-1]["audio"])) == (32000, 2, 1, 2.0)
    # The same clip asked for in 1.1 terms (WAV, the server's normalization) is the same file.
    explicit = run(idle_server.url, duration=2, seed=11, format="wav", normalization="loudness")
    assert explicit[-1]["audio"] == plain[-1]["audio"]
    assert explicit[0]["format"] == explicit[-1]["format"] == "wav"
    start = explicit[0]
    assert (start["normalization"], start["melody"], start["audio_prompt"]) == ("loudness", None, None)


@pytest.mark.parametrize("format", ["wav", "flac", "mp3", "ogg"])
def test_each_format_decodes_back_to_32khz_with_the_models_channels_and_length(idle_server, format):
    received = run(idle_server.url, duration=3, seed=4, format=format)
    start, done = received[0], received[-1]
    assert start["format"] == done["format"] == format and start["normalization"] == "loudness"
    samples, rate = samples_of(done)
    assert (rate, samples.shape[1]) == (32000, 1)
    assert abs(len(samples) - 3 * 32000) <= (1152 if format == "mp3" else 0), len(samples)
    assert np.abs(samples).max() > 0.1  # music, not silence


def test_normalization_is_per_request(idle_server):
    levels = {}
    for strategy in ("peak", "clip", "rms"):
        received = run(idle_server.url, duration=2, seed=8, normalization=strategy)
        assert received[0]["normalization"] == strategy
        levels[strategy] = float(np.abs(samples_of(received[-1])[0]).max())
    assert abs(levels["peak"] - 10 ** (-1 / 20)) < 0.01  # -1 dBFS
    assert len({round(level, 3) for level in levels.values()}) == 3, levels


def codec_rendering(clip: torch.Tensor, model: str = "debug") -> torch.Tensor:
    """What the served debug model's EnCodec makes of a waveform (its weights are seeded: the same here, and its
    decoder in the precision the server gives it)."""
    codec = debug_models.build_musicgen(model).compression_model
    codec_precision.apply(codec, Settings().decoder_precision, "cpu")
    with torch.no_grad():
        return codec.decode(codec.encode(clip[None])[0])[0]


def test_a_continuation_keeps_its_prompt_and_continues_it(idle_server):
    """Its first seconds are the prompt as the codec renders it; two seeds agree there and differ after."""
    prompt = wav64(3.0, rate=44100, channels=2)  # resampled to 32 kHz and mixed down for the mono model
    rendered = codec_rendering(audio_input.read("audio_prompt", prompt).wav.mean(0, keepdim=True))
    clips = []
    for seed in (1, 2):
        received = run(idle_server.url, duration=6, seed=seed, audio_prompt=prompt, normalization="clip")
        assert received[0]["audio_prompt"] == {"seconds": 3.0} and received[0]["melody"] is None
        progress = [e["progress"] for e in received if e["event"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == 100
        samples, _ = samples_of(received[-1])
        assert samples.shape == (6 * 32000, 1)
        clips.append(samples[:, 0])
    kept = 3 * 32000 - 6400  # the last frames before the seam also hear what follows
    assert np.abs(clips[0][:kept] - rendered[0, :kept].numpy()).max() < 1e-3  # 16-bit rounding
    assert np.array_equal(clips[0][:kept], clips[1][:kept])
    assert np.abs(clips[0][3 * 32000:] - clips[1][3 * 32000:]).mean() > 1e-3


def test_a_continuation_past_the_30_s_window(idle_server):
    received = run(idle_server.url, duration=32, seed=3, audio_prompt=wav64(2.0), format="flac",
                   normalization="clip")
    samples, rate = samples_of(received[-1])
    assert (rate, samples.shape) == (32000, (32 * 32000, 1))
    rendered = codec_rendering(audio_input.read("audio_prompt", wav64(2.0)).wav)
    assert np.abs(samples[:32000, 0] - rendered[0, :32000].numpy()).max() < 1e-3
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100


@pytest.mark.parametrize("rate, channels", [(192000, 1), (48000, 8), (8000, 2)])
def test_any_rate_and_channel_count_in_range_is_accepted(idle_server, rate, channels):
    received = run(idle_server.url, duration=2, audio_prompt=wav64(1.0, rate=rate, channels=channels))
    assert received[0]["audio_prompt"] == {"seconds": 1.0}


@pytest.mark.parametrize("what, text, says", bad_inputs(), ids=[case[0] for case in bad_inputs()])
def test_bad_audio_inputs_are_400_naming_the_field(idle_server, what, text, says):
    for field in ("melody", "audio_prompt"):
        message = refused(idle_server.url, **{field: text})
        assert message.startswith(f"{field}: ") and says in message, message
    assert idle_server.health()["status"] == "ready"  # none of them took the slot


@pytest.mark.parametrize("body, says", [
    ({"melody": wav64(2.0)}, "melody: the loaded model (debug) does not take a melody"),
    ({"audio_prompt": wav64(3.0), "duration": 3}, "audio_prompt: 3.00 s long, so duration (3 s"),
    ({"audio_prompt": wav64(2.5), "duration": 3}, "audio_prompt: 2.50 s long, so duration (3 s"),
    ({"audio_prompt": wav64(30.0, rate=8000), "duration": 45}, "audio_prompt: 30.00 s long, at most 29 s"),
    ({"audio_prompt": wav64(1.0), "melody": wav64(1.0), "duration": 5}, "melody: the loaded model"),
    ({"format": "aac"}, "format: must be one of wav, flac, mp3, ogg"),
    ({"format": "WAV"}, "format: must be one of"),
    ({"normalization": "loud"}, "normalization: must be one of loudness, peak, rms, clip"),
    ({"melody": 123}, "melody: must be a string"),
    ({"audio_prompt": ["UklGRg=="]}, "audio_prompt: must be a string"),
])
def test_what_the_model_or_the_clip_cannot_do_is_400(idle_server, body, says):
    assert says in refused(idle_server.url, **body)
    assert idle_server.health()["status"] == "ready"


def test_a_busy_server_answers_503_without_decoding_the_audio(idle_server):
    with generate(idle_server.url, {"description": "hold the slot", "duration": 60, "mbd": True}) as holder:
        assert holder.status_code == 200
        for audio in (wav64(2.0), "not even base64"):  # the file is not looked at: busy comes first
            r = generate(idle_server.url, {"description": "second", "duration": 3, "audio_prompt": audio}, timeout=30)
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        assert refused(idle_server.url, format="aac").startswith("format: ")  # the schema still comes first
    idle_server.wait(timeout=10)


def test_health_says_what_the_model_can_do(idle_server):
    assert idle_server.health()["features"] == {"melody": False, "audio_prompt": True, "stream_audio": True,
                                               "formats": ["wav", "flac", "mp3", "ogg"]}


def test_a_melody_changes_the_clip_against_no_melody_same_seed(melody_server):
    assert melody_server.health()["features"]["melody"] is True
    tune = b64(encode(melody(5.0, 44100), 44100, "OGG", "VORBIS"))
    plain = run(melody_server.url, duration=3, seed=9, normalization="clip")
    followed = run(melody_server.url, duration=3, seed=9, normalization="clip", melody=tune)
    assert abs(followed[0]["melody"]["seconds"] - 5.0) < 0.01 and followed[0]["audio_prompt"] is None
    with_melody, without = samples_of(followed[-1])[0], samples_of(plain[-1])[0]
    assert with_melody.shape == without.shape == (3 * 32000, 1)
    assert np.abs(with_melody - without).mean() > 1e-4


def test_melody_and_continuation_at_once(melody_server):
    prompt = wav64(2.0)
    received = run(melody_server.url, duration=4, seed=2, melody=wav64(3.0, freq=330.0), audio_prompt=prompt,
                   format="flac", normalization="clip")
    start, done = received[0], received[-1]
    assert start["melody"] == {"seconds": 3.0} and start["audio_prompt"] == {"seconds": 2.0}
    samples, rate = samples_of(done)
    assert (rate, samples.shape, done["format"]) == (32000, (4 * 32000, 1), "flac")
    rendered = codec_rendering(audio_input.read("audio_prompt", prompt).wav, "debug-melody")
    kept = 2 * 32000 - 6400
    assert np.abs(samples[:kept, 0] - rendered[0, :kept].numpy()).max() < 1e-3  # the prompt is kept
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100


def test_a_stereo_model_continues_in_stereo_in_every_format(stereo_server):
    for format in ("wav", "flac", "mp3", "ogg"):
        received = run(stereo_server.url, duration=2, format=format, audio_prompt=wav64(1.0, channels=1))
        samples, rate = samples_of(received[-1])
        assert (rate, samples.shape[1], received[-1]["channels"]) == (32000, 2, 2)
        assert abs(len(samples) - 2 * 32000) <= (1152 if format == "mp3" else 0)


# Audio fields as a client might fill them: real files of every length/rate/channel count around the limits,
# broken ones, and plain junk; the other new fields valid or not.
_rates = st.sampled_from([4000, 8000, 11025, 16000, 44100, 48000, 192000, 200000])
_files = st.builds(lambda seconds, rate, channels, container: encode(tone(seconds, rate, channels), rate, *container),
                   st.floats(0.0, 4.0), _rates, st.integers(1, 3),
                   st.sampled_from([("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16")]))
_audio_text = (_files.map(b64) | _files.map(lambda data: b64(data[:len(data) // 2]))
               | st.binary(max_size=2000).map(b64) | st.text(max_size=200) | st.none())
_new_fields = st.fixed_dictionaries({}, optional={
    "melody": _audio_text | st.integers() | st.lists(st.text(max_size=5), max_size=2),
    "audio_prompt": _audio_text | st.booleans(),
    "format": st.sampled_from(["wav", "flac", "mp3", "ogg", "aac", "", "Wav"]) | st.none() | st.integers(),
    "normalization": st.sampled_from(["loudness", "peak", "rms", "clip", "none"]) | st.none() | st.floats(),
    "duration": st.integers(0, 6),
})


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                               HealthCheck.too_slow])
@given(fields=_new_fields)
def test_fuzzed_audio_fields_never_get_a_5xx(idle_server, fields):
    r = generate(idle_server.url, json.dumps({"description": "fuzz", "duration": 2, **fields}).encode(), timeout=60)
    try:
        assert r.status_code in (200, 400), (r.status_code, r.text[:300])
        event(f"HTTP {r.status_code}")
        if r.status_code == 400:
            message = r.json()["message"]
            assert message.split(":")[0] in {"melody", "audio_prompt", "format", "normalization", "duration"}, message
    finally:
        r.close()  # a valid body started a generation: leaving cancels it
    idle_server.wait(timeout=30)
