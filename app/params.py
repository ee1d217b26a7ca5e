"""What one generation is asked to do: the domain's own parameters (no HTTP, no schema library).

The edge (`app/validation.py`, `app/api.py`) checks a request against its schema, decodes its audio
inputs and builds these; everything below it (generation, model, audio) takes them as they are. The
defaults live here, and the schema states them.
"""

import dataclasses
import math
import typing as tp

if tp.TYPE_CHECKING:
    import torch

MAX_SEED = 2**32 - 1
FORMATS = ("wav", "flac", "mp3", "ogg")
MIN_CONTINUATION_SECONDS = 1.0  # a continuation adds at least this much to its prompt


class UnsupportedRequest(ValueError):
    """The request asks for what this clip or the loaded model cannot do; the message names the field."""


@dataclasses.dataclass(frozen=True, eq=False)
class AudioClip:
    """A decoded audio input: a `[channels, samples]` float waveform, already checked (app/audio_input.py)."""

    wav: "torch.Tensor"
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.wav.shape[-1] / self.sample_rate


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One clip to generate: the text, its length, how to sample, what audio to follow or continue, how to
    decode and how to deliver it."""

    description: str
    duration: int = 30  # seconds, the whole clip (a continued prompt included)
    mbd: bool = False  # decode with MultiBand Diffusion instead of EnCodec
    top_k: int = 250  # 0 disables top-k
    top_p: float = 0.0  # > 0 replaces top-k
    temperature: float = 1.0  # 0 is greedy decoding
    cfg_coef: float = 3.0  # classifier-free guidance
    seed: tp.Optional[int] = None  # None: the service draws one
    melody: tp.Optional[AudioClip] = None  # follow this clip's melody (melody models only)
    audio_prompt: tp.Optional[AudioClip] = None  # the clip begins with this audio and continues it
    format: tp.Optional[str] = None  # wav, flac, mp3 or ogg; None: WAV, and events exactly as in version 1.0
    normalization: tp.Optional[str] = None  # loudness, peak, rms or clip; None: the server's MUSICGEN_NORMALIZE
    stream_audio: tp.Optional[bool] = None  # also stream the audio while it is made; None: no (as false)

    def __post_init__(self) -> None:
        prompt = self.audio_prompt
        if prompt is not None and prompt.seconds > self.duration - MIN_CONTINUATION_SECONDS:
            raise UnsupportedRequest(
                f"audio_prompt: {prompt.seconds:.2f} s long, so duration ({self.duration} s, the whole clip) must "
                f"be at least {MIN_CONTINUATION_SECONDS:g} s longer: at least "
                f"{math.ceil(prompt.seconds + MIN_CONTINUATION_SECONDS)} s")

    @property
    def output_format(self) -> str:
        return self.format or "wav"

    @property
    def uses_audio_features(self) -> bool:
        """Whether the request used a version 1.1 field; only then do its events carry the 1.1 fields."""
        return any(value is not None for value in (self.melody, self.audio_prompt, self.format, self.normalization,
                                                   self.stream_audio))


DEFAULTS = GenerationParams(description="")
