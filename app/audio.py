"""Generated waveform -> the bytes of an audio file (WAV, FLAC, MP3 or Ogg Vorbis), in memory.

libsndfile (soundfile) writes all four itself: no ffmpeg, no temporary file. The waveform is normalized
first, with the request's strategy or the server's.
"""

import io
import typing as tp

import soundfile
import torch
from audiocraft.data.audio_utils import normalize_audio

from .params import FORMATS

# audiocraft's demo writes its clips with exactly these loudness settings.
DEMO_LOUDNESS = {"loudness_headroom_db": 16, "loudness_compressor": True}


class Encoding(tp.NamedTuple):
    """How one format is written: libsndfile's container and codec, its quality setting, its MIME type."""

    container: str
    subtype: str
    compression_level: tp.Optional[float]  # libsndfile's 0 (best quality) to 1 (smallest); None: not applicable
    bitrate_mode: tp.Optional[str]
    mime_type: str


ENCODINGS: tp.Dict[str, Encoding] = {
    "wav": Encoding("WAV", "PCM_16", None, None, "audio/wav"),
    # Lossless, at libsndfile's default level (the highest saved 0.1 % more on a test clip).
    "flac": Encoding("FLAC", "PCM_16", None, None, "audio/flac"),
    # LAME variable bit rate at quality 2 (`lame -V 2`, the "standard" preset): ~75 kbit/s mono, ~150 stereo.
    "mp3": Encoding("MP3", "MPEG_LAYER_III", 0.2, "VARIABLE", "audio/mpeg"),
    # Vorbis quality 5 (`oggenc -q 5`; libsndfile's quality is 1 - compression_level): ~75 kbit/s mono.
    "ogg": Encoding("OGG", "VORBIS", 0.5, None, "audio/ogg"),
}
assert tuple(ENCODINGS) == FORMATS
# libvorbis allocates the whole pending buffer on the stack: a minute written in one call overflowed it
# (a segfault) where 60 s still passed. Writing one second at a time keeps every call small.
WRITE_SECONDS = 1


def encode(wav: torch.Tensor, sample_rate: int, format: str = "wav", strategy: str = "loudness") -> bytes:
    """Normalize a `[channels, samples]` float waveform and encode it as one audio file.

    Args:
        wav: the model's output for one clip.
        sample_rate: samples per second of `wav` (kept: nothing is resampled).
        format: one of `ENCODINGS`.
        strategy: `loudness`, `peak`, `rms` or `clip` (see `audiocraft.data.audio_utils.normalize_audio`).
    Returns:
        The file's bytes, one channel per row of `wav`.
    """
    encoding = ENCODINGS[format]
    samples = normalize(wav, sample_rate, strategy).t().numpy()
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", sample_rate, samples.shape[1], encoding.subtype, format=encoding.container,
                             compression_level=encoding.compression_level, bitrate_mode=encoding.bitrate_mode) as f:
        step = WRITE_SECONDS * sample_rate
        for start in range(0, len(samples), step):
            f.write(samples[start:start + step])
    return buffer.getvalue()


def to_wav(wav: torch.Tensor, sample_rate: int, strategy: str = "loudness") -> bytes:
    """The WAV file (32 kHz, PCM 16-bit) of version 1.0."""
    return encode(wav, sample_rate, "wav", strategy)


def pcm16(wav: torch.Tensor) -> bytes:
    """A `[channels, samples]` float waveform within [-1, 1] as 16-bit little-endian interleaved PCM, scaled and
    rounded (down) as libsndfile writes the WAV files above, so that equal samples give equal bytes."""
    samples = (wav.detach().float().cpu() * 32768).floor().clamp(-32768, 32767).to(torch.int16)
    return samples.t().contiguous().numpy().astype("<i2", copy=False).tobytes()


def normalize(wav: torch.Tensor, sample_rate: int, strategy: str) -> torch.Tensor:
    """The waveform at its final level, within [-1, 1]; silent or non-finite output becomes silence."""
    wav = torch.nan_to_num(wav.detach().float().cpu())
    if strategy == "clip":
        return wav.clamp(-1, 1)
    wav = normalize_audio(wav, strategy=strategy, sample_rate=sample_rate, **DEMO_LOUDNESS)
    # peak normalization of pure silence divides by zero; anything non-finite is silence.
    return torch.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1, 1)
