"""Audio while it is made (`stream_audio`, version 1.1) through a real gunicorn with the tiny models and the
server's defaults (int8 LM, bf16 EnCodec decoder where the CPU has it): the `audio` events as docs/API.md
says, against the `completed` clip of the same job."""

import base64
import time
import typing as tp

import numpy as np
import pytest

from tests.audio_samples import decode, wav64
from tests.helpers import events, generate

RATE = 32000
# The stream is levelled as it goes, the final clip over its whole length (app/stream_level.py): with the
# default loudness normalization they agree within this (dB of signal to difference; 54 dB measured).
MIN_SNR_DB = 15.0


class Stream(tp.NamedTuple):
    received: tp.List[tp.Dict[str, tp.Any]]
    chunks: tp.List[np.ndarray]  # [samples, channels] in [-1, 1), in seq order
    starts: tp.List[int]  # samples from the clip's start
    clip: np.ndarray  # the completed file's samples
    progress_before_first: float  # the last progress event before the first audio event


def streamed(url: str, channels: int = 1, **body: tp.Any) -> Stream:
    """One streamed generation that must complete, with what every stream must be checked on the way."""
    with generate(url, {"description": "streamed", "stream_audio": True, **body}) as r:
        assert r.status_code == 200, r.text
        received = list(events(r))
    start, done = received[0], received[-1]
    assert done["event"] == "completed", done
    assert start["stream_audio"] is True and done["format"] == body.get("format", "wav")
    audio = [e for e in received if e["event"] == "audio"]
    assert [e["seq"] for e in audio] == list(range(len(audio))) and audio
    assert all(set(e) == {"event", "seq", "start", "pcm"} for e in audio)
    chunks = [np.frombuffer(base64.b64decode(e["pcm"], validate=True), "<i2").reshape(-1, channels) / 32768
              for e in audio]
    starts = [round(e["start"] * RATE) for e in audio]
    assert all(abs(e["start"] * RATE - s) < 1e-6 for e, s in zip(audio, starts, strict=True))
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    first = received.index(audio[0])
    before = [e["progress"] for e in received[:first] if e["event"] == "progress"]
    clip, rate = decode(base64.b64decode(done["audio"]))
    assert rate == RATE and clip.shape[1] == channels == done["channels"]
    return Stream(received, chunks, starts, clip, before[-1] if before else 0.0)


def check_contiguous(stream: Stream, first_sample: int = 0) -> np.ndarray:
    """Chunks back to back to the sample from `first_sample` to the clip's end, about a second each, no clipping,
    no seam; returns them concatenated."""
    sizes = [len(chunk) for chunk in stream.chunks]
    assert stream.starts[0] == first_sample
    assert [s + n for s, n in zip(stream.starts, sizes, strict=True)][:-1] == stream.starts[1:]
    assert stream.starts[-1] + sizes[-1] == len(stream.clip)  # the total length is the clip's
    assert all(abs(n - RATE) <= RATE // 10 for n in sizes[:-1]) and 0 < sizes[-1] <= RATE * 1.1, sizes
    joined = np.concatenate(stream.chunks)
    assert np.abs(joined).max() < 32767 / 32768, "a streamed sample at full scale: clipped"
    assert np.abs(joined).max() > 0.01  # music, not silence
    for boundary in np.cumsum(sizes)[:-1]:  # a seam jumps no more than the music's own neighbouring samples
        around = np.abs(np.diff(joined[boundary - 64:boundary + 64], axis=0))
        jump = around[63]
        assert (jump <= np.delete(around, 63, axis=0).max(axis=0) + 1 / 32768).all(), boundary
    return joined


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - test) ** 2).sum(), 1e-30)))


def test_streamed_audio_is_the_clip_heard_early(idle_server):
    stream = streamed(idle_server.url, duration=5, seed=3)
    assert stream.progress_before_first < 60, stream.progress_before_first
    joined = check_contiguous(stream)
    snr = snr_db(stream.clip, joined)
    print(f"stream vs completed (loudness): {snr:.1f} dB SNR; first chunk after {stream.progress_before_first} %")
    assert snr > MIN_SNR_DB
    # The job is otherwise the 1.1 job it always was: events in order, one terminal event.
    kinds = [e["event"] for e in stream.received]
    assert kinds[0] == "start" and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert set(kinds) == {"start", "progress", "audio", "completed"}


def test_with_the_models_own_level_the_stream_is_the_completed_clip(idle_server):
    """`clip` normalization keeps the model's level: the stream and the final WAV are the same samples."""
    stream = streamed(idle_server.url, duration=4, seed=5, normalization="clip", format="flac")
    joined = check_contiguous(stream)
    assert np.abs(joined - stream.clip).max() <= 1 / 32768


def test_without_stream_audio_no_audio_events(idle_server):
    for extra in ({}, {"stream_audio": False}):
        with generate(idle_server.url, {"description": "quiet", "duration": 2, **extra}) as r:
            received = list(events(r))
        assert received[-1]["event"] == "completed"
        assert all(e["event"] != "audio" for e in received)
        assert received[0].get("stream_audio", False) is False and ("stream_audio" in received[0]) == bool(extra)


@pytest.mark.parametrize("value", ["true", 1, 0, "yes", [True], {"on": True}])
def test_stream_audio_must_be_a_boolean(idle_server, value):
    r = generate(idle_server.url, {"description": "bad", "stream_audio": value}, timeout=60)
    assert r.status_code == 400 and r.json()["message"] == "stream_audio: must be true or false", r.text
    assert idle_server.health()["status"] == "ready"


def test_health_says_the_model_streams(idle_server):
    assert idle_server.health()["features"]["stream_audio"] is True


def test_chunks_start_after_an_audio_prompt(idle_server):
    stream = streamed(idle_server.url, duration=5, seed=2, audio_prompt=wav64(2.0), normalization="clip")
    assert stream.received[0]["audio_prompt"] == {"seconds": 2.0}
    joined = check_contiguous(stream, first_sample=2 * RATE)
    assert np.abs(joined - stream.clip[2 * RATE:]).max() <= 1 / 32768


def test_past_the_30_s_window_only_new_music_is_streamed(idle_server):
    stream = streamed(idle_server.url, duration=32, seed=7, normalization="clip")
    assert len(stream.clip) == 32 * RATE
    joined = check_contiguous(stream)
    assert np.abs(joined - stream.clip).max() <= 1 / 32768


def test_with_mbd_chunks_come_from_encodec_and_completed_from_mbd(idle_server):
    stream = streamed(idle_server.url, duration=3, seed=4, mbd=True)
    assert stream.received[0]["mbd"] is True
    joined = check_contiguous(stream)
    assert snr_db(stream.clip, joined) < MIN_SNR_DB  # a different decoder: not the same waveform


def test_a_client_leaving_after_the_first_chunk_frees_the_slot(idle_server):
    with generate(idle_server.url, {"description": "leaving", "duration": 60, "stream_audio": True}) as r:
        for event in events(r):
            if event["event"] == "audio":
                break
        assert idle_server.health()["status"] == "busy"
    left = time.monotonic()
    idle_server.wait(timeout=10)
    assert time.monotonic() - left < 2.0


def test_a_stereo_model_streams_interleaved_stereo(stereo_server):
    stream = streamed(stereo_server.url, channels=2, duration=3, seed=1, normalization="clip")
    joined = check_contiguous(stream)
    assert np.abs(joined - stream.clip).max() <= 1 / 32768
    assert np.abs(joined[:, 0] - joined[:, 1]).max() > 1e-3  # two channels, not one twice
    # after a stereo prompt, with the default level
    stream = streamed(stereo_server.url, channels=2, duration=4, seed=1, audio_prompt=wav64(1.5, channels=2))
    check_contiguous(stream, first_sample=38 * 1280)  # the prompt as EnCodec frames it: 37.5 -> 38 frames of 25 Hz


def test_a_melody_model_streams_a_melody_and_a_prompt_at_once(melody_server):
    """The path that runs audiocraft's steps itself (`_generate_tokens`, then `generate_audio`) streams too."""
    stream = streamed(melody_server.url, duration=4, seed=2, melody=wav64(3.0, freq=330.0),
                      audio_prompt=wav64(2.0), normalization="clip")
    assert stream.received[0]["melody"] == {"seconds": 3.0}
    joined = check_contiguous(stream, first_sample=2 * RATE)
    assert np.abs(joined - stream.clip[2 * RATE:]).max() <= 1 / 32768
