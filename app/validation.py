"""The request schema of `POST /api/v1/generate_music` and its parser (pure: no Flask, no torch).

The same pydantic model also yields the OpenAPI schema, so the document and the validator cannot drift.
A valid request becomes the domain's `GenerationParams`, whose defaults the schema states; its audio fields
(base64 text here) are decoded by the reader the caller passes (the view passes `app.audio_input.read`).
"""

import json
import typing as tp

import pydantic
from pydantic import Field, StringConstraints

from .config import NORMALIZATIONS
from .params import DEFAULTS, FORMATS, MAX_SEED, AudioClip, GenerationParams

MAX_DESCRIPTION_CHARS = 2000
MAX_DURATION_SECONDS = 60
AUDIO_FIELDS = ("melody", "audio_prompt")
ReadAudio = tp.Callable[[str, str], AudioClip]  # (field, base64 text) -> clip; raises naming the field


class InvalidRequest(ValueError):
    """The request body is not valid JSON, not an object, or breaks a field's rule (the message says which)."""


Description = tp.Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_DESCRIPTION_CHARS)]


class GenerateParams(pydantic.BaseModel):
    """One generation request. Strict: `"15"`, `15.5` and `true` are not integers here."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    description: Description = Field(description="What the music should sound like.")
    duration: int = Field(DEFAULTS.duration, ge=1, le=MAX_DURATION_SECONDS,
                          description="Length of the clip in seconds.")
    mbd: bool = Field(DEFAULTS.mbd, description="Decode with MultiBand Diffusion instead of the EnCodec decoder.")
    top_k: int = Field(DEFAULTS.top_k, ge=0, le=2048, description="Sample from the k likeliest tokens (0 disables).")
    top_p: float = Field(DEFAULTS.top_p, ge=0.0, le=1.0,
                         description="Nucleus sampling; when > 0 it overrides top_k.")
    temperature: float = Field(DEFAULTS.temperature, ge=0.0, le=10.0,
                               description="Softmax temperature; 0 is greedy decoding.")
    cfg_coef: float = Field(DEFAULTS.cfg_coef, ge=0.0, le=30.0, description="Classifier-free guidance coefficient.")
    seed: tp.Optional[int] = Field(DEFAULTS.seed, ge=0, le=MAX_SEED,
                                   description="Same seed, same audio. Random if absent.")
    melody: tp.Optional[str] = Field(
        DEFAULTS.melody, json_schema_extra={"contentEncoding": "base64"},
        description="Base64 of an audio file (WAV, FLAC, Ogg Vorbis/Opus, MP3) whose melody the clip follows. Melody "
                    "models only (GET /health: features.melody). 1 to 60 s, 8 to 192 kHz, any channel count.")
    audio_prompt: tp.Optional[str] = Field(
        DEFAULTS.audio_prompt, json_schema_extra={"contentEncoding": "base64"},
        description="Base64 of an audio file (same formats) that the clip begins with and continues. From 1 s to "
                    "the model's window less 1 s (29 s); duration, the whole clip's length, must exceed it by 1 s.")
    format: tp.Optional[tp.Literal[FORMATS]] = Field(
        DEFAULTS.format, description="The file completed.audio carries: wav (16-bit PCM), flac (16-bit), mp3 or ogg "
                                     "(Vorbis). Absent: wav.")
    normalization: tp.Optional[tp.Literal[NORMALIZATIONS]] = Field(
        DEFAULTS.normalization, description="How the clip's level is set: loudness, peak, rms or clip. Absent: the "
                                            "server's MUSICGEN_NORMALIZE.")
    stream_audio: tp.Optional[bool] = Field(
        DEFAULTS.stream_audio, description="Also stream the music while it is made, as audio events (16-bit PCM, "
                                           "about a second each) between the progress events. Absent: false.")


def parse_request(body: bytes, read_audio: tp.Optional[ReadAudio] = None) -> GenerationParams:
    """Parse a raw request body, raising `InvalidRequest` with a message that names the field and rule.

    The audio fields are decoded with `read_audio`, which raises its own error naming the field.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurdly deep nesting
        raise InvalidRequest(f"request body is not valid JSON: {_short(e)}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        request = GenerateParams.model_validate(data)
    except pydantic.ValidationError as e:
        raise InvalidRequest(describe(e.errors()[0])) from None
    fields = request.model_dump()
    for name in AUDIO_FIELDS:
        if fields[name] is not None:
            if read_audio is None:
                raise TypeError("parse_request needs read_audio for a request with audio")
            fields[name] = read_audio(name, fields[name])
    return GenerationParams(**fields)


# pydantic error types whose rule reads the same for every field.
_RULES = {
    "missing": "required",
    "string_too_short": "must not be empty",
    "string_too_long": f"at most {MAX_DESCRIPTION_CHARS} characters",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
}


def describe(error: tp.Mapping[str, tp.Any]) -> str:
    """One pydantic error as `field: rule`."""
    field = ".".join(str(part) for part in error["loc"]) or "body"
    kind = error["type"]
    if kind in _RULES:
        return f"{field}: {_RULES[kind]}"
    if kind == "extra_forbidden":
        return f"{field}: unknown field (accepted: {', '.join(GenerateParams.model_fields)})"
    if kind == "literal_error":
        return f"{field}: must be one of {', '.join(tp.get_args(_unwrap(field)))}"
    bounds = error.get("ctx") or {}
    if "ge" in bounds or "le" in bounds:
        low, high = _range(field)
        return f"{field}: must be between {low} and {high}"
    return f"{field}: {error['msg']}"


def _unwrap(field: str) -> tp.Any:
    """A field's type without its `Optional`."""
    return next(arg for arg in tp.get_args(GenerateParams.model_fields[field].annotation) if arg is not type(None))


def _range(field: str) -> tp.Tuple[tp.Any, tp.Any]:
    low = high = None
    for rule in GenerateParams.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 200 else text[:200] + "..."
