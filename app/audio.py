"""Generated waveform -> WAV bytes (32 kHz, 16-bit PCM), in memory."""

import io

import soundfile
import torch
from audiocraft.data.audio_utils import normalize_audio

# audiocraft's demo writes its clips with exactly these loudness settings.
DEMO_LOUDNESS = {"loudness_headroom_db": 16, "loudness_compressor": True}


def to_wav(wav: torch.Tensor, sample_rate: int, strategy: str = "loudness") -> bytes:
    """Encode a `[channels, samples]` float waveform as a WAV file.

    Args:
        wav: the model's output for one clip.
        sample_rate: samples per second of `wav`.
        strategy: `loudness`, `peak`, `rms` or `clip` (see `audiocraft.data.audio_utils.normalize_audio`).
    Returns:
        The bytes of a RIFF/WAVE file, PCM 16-bit, one channel per row of `wav`.
    """
    wav = torch.nan_to_num(wav.detach().float().cpu())
    if strategy == "clip":
        wav = wav.clamp(-1, 1)
    else:
        wav = normalize_audio(wav, strategy=strategy, sample_rate=sample_rate, **DEMO_LOUDNESS)
        # peak normalization of pure silence divides by zero; anything non-finite is silence.
        wav = torch.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1, 1)
    buffer = io.BytesIO()
    soundfile.write(buffer, wav.t().numpy(), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
