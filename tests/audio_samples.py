"""Audio files for tests, made in memory with soundfile: tones in every input format, and broken ones."""

import base64
import io
import struct
import typing as tp

import numpy as np
import soundfile

# (format, subtype) of every container the API documents as input, and the rate each is written at
# (Opus only takes 8, 12, 16, 24 or 48 kHz).
INPUT_FORMATS = {"wav": ("WAV", "PCM_16", 44100), "flac": ("FLAC", "PCM_24", 44100),
                 "mp3": ("MP3", "MPEG_LAYER_III", 44100), "vorbis": ("OGG", "VORBIS", 44100),
                 "opus": ("OGG", "OPUS", 48000)}


def tone(seconds: float, rate: int = 32000, channels: int = 1, freq: float = 220.0,
         amplitude: float = 0.5) -> np.ndarray:
    """`[frames, channels]` float32: a note with a slow tremolo, a different pitch per channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    columns = [amplitude * np.sin(2 * np.pi * freq * (1 + c / 4) * t) * (0.75 + 0.25 * np.sin(2 * np.pi * t))
               for c in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


def melody(seconds: float, rate: int = 32000) -> np.ndarray:
    """`[frames, 1]` float32: a tune of four notes a second, so that a chromagram has something to follow."""
    notes = [261.6, 329.6, 392.0, 523.3, 440.0, 349.2, 293.7, 246.9]
    t = np.arange(int(round(seconds * rate))) / rate
    freq = np.array(notes)[(t * 4).astype(int) % len(notes)]
    return (0.5 * np.sin(2 * np.pi * np.cumsum(freq) / rate))[:, None].astype(np.float32)


def encode(samples: np.ndarray, rate: int, container: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, samples.shape[1], subtype, format=container) as f:
        for start in range(0, len(samples), rate):  # a second at a time (libvorbis and long single writes)
            f.write(samples[start:start + rate])
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wav64(seconds: float, rate: int = 32000, channels: int = 1, **kwargs: tp.Any) -> str:
    """Base64 of a 16-bit WAV tone."""
    return b64(encode(tone(seconds, rate, channels, **kwargs), rate))


def decode(data: bytes) -> tp.Tuple[np.ndarray, int]:
    """`([frames, channels] float32, rate)` of an audio file."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, rate


def flac_claiming(total_frames: int, seconds: float, rate: int = 8000) -> bytes:
    """A FLAC file of `seconds` of silence whose STREAMINFO says it holds `total_frames` (0: unknown)."""
    data = bytearray(encode(np.zeros((int(seconds * rate), 1), np.float32), rate, "FLAC", "PCM_16"))
    # "fLaC", the block header (4 bytes), then STREAMINFO: 10 bytes of block/frame sizes, then 64 bits
    # of sample rate (20), channels (3), bits per sample (5) and total samples (36).
    (packed,) = struct.unpack_from(">Q", data, 18)
    struct.pack_into(">Q", data, 18, (packed & ~(2**36 - 1)) | total_frames)
    return bytes(data)


def wav_claiming(data_bytes: int, frames: int = 1000, rate: int = 32000) -> bytes:
    """A 16-bit mono WAV of `frames` whose header says its data chunk is `data_bytes` long."""
    data = bytearray(encode(tone(frames / rate, rate), rate))
    assert data[36:40] == b"data"
    struct.pack_into("<I", data, 40, data_bytes)
    struct.pack_into("<I", data, 4, data_bytes + 36)
    return bytes(data)


def bad_inputs() -> tp.List[tp.Tuple[str, str, str]]:
    """(what, base64 text, what the 400's message must say after `FIELD: `), for either audio field."""
    one_second = encode(tone(1.0), 32000)
    return [
        ("not base64", "this is not base64!", "not valid base64"),
        ("non-ASCII text", "mélodie", "not valid base64"),
        ("base64 cut short", b64(one_second)[:-3], "not valid base64"),
        ("a data: URL with broken base64", "data:audio/wav;base64,@@@@", "not valid base64"),
        ("empty string", "", "empty"),
        ("only whitespace", "  \n ", "empty"),
        ("base64 of nothing", "====", "not valid base64"),
        ("random bytes", b64(np.random.default_rng(0).bytes(4096)), "not a readable audio file"),
        ("zero bytes", b64(bytes(4096)), "not a readable audio file"),
        ("a text file", b64(b"hello, this is not music\n" * 40), "not a readable audio file"),
        ("truncated header", b64(one_second[:20]), "not a readable audio file"),
        ("header only, no data chunk", b64(one_second[:36]), "not a readable audio file"),
        ("zero frames", b64(encode(np.zeros((0, 1), np.float32), 32000)), "contains no audio"),
        ("a WAV header that claims an hour", b64(wav_claiming(32000 * 2 * 3600)), "too short"),
        ("a FLAC header that claims an hour", b64(flac_claiming(8000 * 3600, 2.0)), "too long: 3600.0 s"),
        ("0.1 s", wav64(0.1), "too short: 0.10 s"),
        ("0.99 s of MP3", b64(encode(tone(0.99, 44100), 44100, "MP3", "MPEG_LAYER_III")), "too short"),
        ("NaN floats", b64(encode(np.full((32000, 1), np.nan, np.float32), 32000, "WAV", "FLOAT")), "NaN"),
        ("infinite floats", b64(encode(np.full((32000, 1), np.inf, np.float32), 32000, "WAV", "FLOAT")), "infinite"),
        ("4 kHz", wav64(2.0, rate=4000), "sample rate 4000 Hz"),
        ("384 kHz", wav64(1.5, rate=384000), "sample rate 384000 Hz"),
        ("61 s of WAV", wav64(61.0, rate=8000), "too long: 61.0 s"),
        ("10 minutes of FLAC silence (a 14 KB file)", b64(flac_claiming(8000 * 600, 600.0)), "too long: 600.0 s"),
        ("10 minutes of FLAC silence, length unknown", b64(flac_claiming(0, 600.0)), "too long: more than 60 s"),
        ("90 s of Ogg Vorbis", b64(encode(np.zeros((8000 * 90, 1), np.float32), 8000, "OGG", "VORBIS")),
         "too long"),
    ]
