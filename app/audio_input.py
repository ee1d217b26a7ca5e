"""A request's audio inputs (`melody`, `audio_prompt`): base64 text -> a checked waveform at the model's rate.

Runs on the request thread before the slot is taken, so a bad file costs its client a 400 and nobody else
anything. libsndfile (soundfile) reads WAV, FLAC, Ogg Vorbis/Opus, MP3 and more. The limits are checked from
the header before any sample is decoded, and decoding runs in blocks that stop as soon as the file is known
to be too long: a small compressed file that claims, or holds, hours never expands in memory.
"""

import base64
import binascii
import io
import math
import re
import typing as tp

import numpy as np
import soundfile
import soxr
import torch
from audiocraft.data.audio_utils import convert_audio

from .params import AudioClip

MODEL_SAMPLE_RATE = 32000  # every MusicGen checkpoint's; the model converts again if one ever differs
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MIN_SECONDS, MAX_SECONDS = 1.0, 60.0
MAX_CHANNELS = 2  # more are reduced to their first two while decoding, as audiocraft maps them for stereo
BLOCK_SAMPLES = 1 << 18  # samples (all channels together) decoded at a time
# julius, audiocraft's resampler, makes one filter per output phase: 320 for 44.1 kHz -> 32 kHz, but 32000
# (over a minute of work per 10 s) for an odd rate such as 44101 Hz. Those go through soxr instead.
MAX_JULIUS_PHASES = 1280
UNKNOWN_LENGTH = 2**63 - 1  # libsndfile's SF_COUNT_MAX: a stream whose header does not say how long it is
_DATA_URL = re.compile(r"data:[\w/+.-]*(?:;[\w=.+-]+)*;base64,", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


class AudioInputError(ValueError):
    """An audio field is not base64, not a decodable audio file, or breaks a limit; the message names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def read(field: str, text: str, sample_rate: int = MODEL_SAMPLE_RATE) -> AudioClip:
    """Decode one audio field.

    Args:
        field: the request field, named in every error.
        text: base64 of an audio file; a `data:...;base64,` prefix and line breaks are allowed.
        sample_rate: the rate the waveform is resampled to.
    Returns:
        A float32 `[channels, samples]` clip (1 or 2 channels) at `sample_rate`, 1 to 60 s long.
    Raises:
        AudioInputError: naming `field` and what was wrong.
    """
    data = _from_base64(field, text)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            _check_header(field, f)
            wav, rate = _decode(field, f), f.samplerate
    except soundfile.SoundFileError as e:
        raise AudioInputError(field, f"not a readable audio file ({_reason(e)}); send WAV, FLAC, Ogg Vorbis/Opus "
                                     "or MP3") from None
    seconds = wav.shape[-1] / rate
    if seconds < MIN_SECONDS:
        raise AudioInputError(field, f"too short: {seconds:.2f} s of audio, at least {MIN_SECONDS:g} s")
    if not np.isfinite(wav).all():
        raise AudioInputError(field, "has samples that are NaN or infinite")
    return AudioClip(resample(torch.from_numpy(wav), rate, sample_rate), sample_rate)


def resample(wav: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """`[channels, samples]` from one rate to another: audiocraft's `convert_audio` (julius) where that is
    cheap, which covers every usual rate, and soxr's very-high-quality resampler for odd rates."""
    if from_rate == to_rate:
        return wav
    if to_rate // math.gcd(from_rate, to_rate) <= MAX_JULIUS_PHASES:
        return convert_audio(wav, from_rate, to_rate, wav.shape[0])
    resampled = soxr.resample(wav.t().numpy(), from_rate, to_rate, quality="VHQ")
    return torch.from_numpy(np.ascontiguousarray(resampled.T, dtype=np.float32))


def _from_base64(field: str, text: str) -> bytes:
    if not text.strip():
        raise AudioInputError(field, "empty: send the audio file as base64")
    prefix = _DATA_URL.match(text)
    try:
        raw = text[prefix.end() if prefix else 0:].encode("ascii")
        data = base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise AudioInputError(field, "not valid base64 (send the audio file's bytes as standard base64)") from None
    if not data:
        raise AudioInputError(field, "empty: send the audio file as base64")
    return data


def _check_header(field: str, f: soundfile.SoundFile) -> None:
    """What the header says, before a sample is decoded. Its length may be unknown or wrong: `_decode`
    counts again."""
    if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
        raise AudioInputError(field, f"sample rate {f.samplerate} Hz is not supported: {MIN_SAMPLE_RATE} to "
                                     f"{MAX_SAMPLE_RATE} Hz")
    if f.channels < 1:
        raise AudioInputError(field, "has no audio channels")
    if f.frames <= 0:
        raise AudioInputError(field, "contains no audio (0 samples)")
    if f.frames > MAX_SECONDS * f.samplerate and f.frames != UNKNOWN_LENGTH:
        raise AudioInputError(field, _too_long(f.frames / f.samplerate))


def _decode(field: str, f: soundfile.SoundFile) -> np.ndarray:
    """Decode block by block into `[channels, samples]` float32, at most MAX_CHANNELS channels, stopping
    as soon as the file is longer than MAX_SECONDS whatever its header said."""
    limit = int(MAX_SECONDS * f.samplerate)
    buffer = np.empty((max(1024, BLOCK_SAMPLES // f.channels), f.channels), dtype=np.float32)
    blocks: tp.List[np.ndarray] = []
    frames = 0
    while True:
        count = _read_into(f, buffer)
        if not count:
            break
        frames += count
        if frames > limit:
            raise AudioInputError(field, _too_long(None))
        blocks.append(buffer[:count, :MAX_CHANNELS].T.copy())
    if not blocks:
        raise AudioInputError(field, "contains no audio (0 samples)")
    return np.concatenate(blocks, axis=1)


def _read_into(f: soundfile.SoundFile, buffer: np.ndarray) -> int:
    """libsndfile's `sf_readf_float`: the frames it decoded into `buffer`, 0 at the end.

    Not `SoundFile.read`, which seeks to where it stopped after each read: at the end of a FLAC stream
    whose header does not give its length (what encoders writing to a pipe make), that seek fails.
    """
    pointer = soundfile._ffi.cast("float *", buffer.ctypes.data)
    count = soundfile._snd.sf_readf_float(f._file, pointer, len(buffer))
    error = soundfile._snd.sf_error(f._file)
    if error:
        raise soundfile.LibsndfileError(error)
    return count


def _too_long(seconds: tp.Optional[float]) -> str:
    length = f"{seconds:.1f} s" if seconds is not None else f"more than {MAX_SECONDS:g} s"
    return f"too long: {length} of audio, at most {MAX_SECONDS:g} s"


def _reason(error: soundfile.SoundFileError) -> str:
    """libsndfile's own words, without the `Error opening <_io.BytesIO object at 0x...>:` prefix."""
    text = str(getattr(error, "error_string", "")).strip().rstrip(".")
    return text[:200] or "unknown error"
