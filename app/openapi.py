"""The OpenAPI 3.1 document of the API, built from the request schema the validator itself uses.

`GenerateParams.model_json_schema()` is the request body's schema, so bounds and defaults in the
document cannot drift from what the server accepts. The rest (events, errors, health) is written
here once; tests check it against the real server.
"""

import copy
import functools
import importlib.metadata
import typing as tp

from .params import FORMATS
from .validation import GenerateParams

REF = "#/components/schemas/{model}"
JSON = "application/json"


def _ref(name: str) -> tp.Dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _event(name: str, description: str, properties: tp.Optional[tp.Dict[str, tp.Any]] = None,
           required: tp.Sequence[str] = ()) -> tp.Dict[str, tp.Any]:
    """An SSE `data:` payload. Open to extra fields: the contract lets events carry more."""
    return {
        "type": "object",
        "description": description,
        "properties": {"event": {"const": name}, **(properties or {})},
        "required": ["event", *required],
    }


_DESCRIBED = {
    "sample_rate": {"type": "integer", "description": "Samples per second of the audio (32000)."},
    "channels": {"type": "integer", "enum": [1, 2], "description": "1 for mono models, 2 for stereo ones."},
    "duration": {"type": "integer", "description": "Requested length in seconds."},
    "seed": {"type": "integer", "description": "The seed used; send it back to get the same audio."},
}
_FORMAT = {"enum": list(FORMATS), "description": "The format of `completed.audio` (only when the request used a "
                                                  "version 1.1 field)."}
_CLIP = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["seconds"], "properties": {
    "seconds": {"type": "number", "description": "Decoded length of the audio input."}}}]}
_INPUTS = {  # only when the request used a version 1.1 field: what the job runs with
    "format": _FORMAT,
    "normalization": {"enum": ["loudness", "peak", "rms", "clip"], "description": "As resolved (the server's "
                                                                                   "when the request had none)."},
    "melody": {**_CLIP, "description": "null, or the melody's decoded length."},
    "audio_prompt": {**_CLIP, "description": "null, or the decoded length of the audio the clip continues."},
    "stream_audio": {"type": "boolean", "description": "Whether `audio` events stream the music as it is made."},
}

EVENTS = {
    "StartEvent": _event("start", "Sent at once when the generation is accepted.", {
        "model": {"type": "string"}, **_DESCRIBED, "mbd": {"type": "boolean"}, **_INPUTS}),
    "ProgressEvent": _event("progress", "Share of the whole job done; never goes backwards.", {
        "progress": {"type": "number", "minimum": 0, "maximum": 100}}, ["progress"]),
    "AudioEvent": _event("audio", "Only with `stream_audio`: the next piece of the music, as it is made, between "
                                  "progress events. Chunks cover the newly generated music (after an "
                                  "`audio_prompt`) back to back, without gaps or overlaps: about a second each, the "
                                  "first once about a second of music exists. Decoded with EnCodec (also with `mbd`) "
                                  "at a steady level; `completed` remains the reference rendition.", {
        "seq": {"type": "integer", "minimum": 0, "description": "0, 1, 2, ... in order."},
        "start": {"type": "number", "minimum": 0,
                  "description": "Seconds from the clip's start (an audio prompt included) of the chunk's first "
                                 "sample; `start` times the sample rate is a whole number of samples."},
        "pcm": {"type": "string", "contentEncoding": "base64",
                "description": "16-bit signed little-endian PCM, channels interleaved, at the model's `sample_rate` "
                               "and `channels` (those of `start`)."}}, ["seq", "start", "pcm"]),
    "CompletedEvent": _event("completed", "Terminal: the audio.", {
        "audio": {"type": "string", "contentEncoding": "base64",
                  "description": "The clip as a base64 audio file at 32000 Hz: WAV (16-bit signed PCM) unless the "
                                 "request asked for another `format` (flac, mp3, ogg)."},
        **_DESCRIBED, "format": _FORMAT}, ["audio"]),
    "ErrorEvent": _event("error", "Terminal: the generation failed or was cancelled; the server serves the "
                                  "next request.", {"message": {"type": "string"}}, ["message"]),
}

STREAM_DESCRIPTION = (
    "Server-Sent Events. Every message is one line `data: <JSON>` followed by a blank line; the JSON is a "
    "`StreamEvent`: one `start`, then `progress` events (and, with `stream_audio`, `audio` events), then "
    "exactly one terminal `completed` or `error`, "
    "then the stream ends. Between messages the server writes comment messages (`: keep-alive`), which "
    "clients ignore. Closing the connection cancels the generation; the slot is free within 2 s.")


def _error(description: str, headers: tp.Optional[tp.Dict[str, tp.Any]] = None) -> tp.Dict[str, tp.Any]:
    response: tp.Dict[str, tp.Any] = {"description": description,
                                      "content": {JSON: {"schema": _ref("ErrorResponse")}}}
    if headers:
        response["headers"] = headers
    return response


# Every answer, to a page of an allowed origin (MUSICGEN_CORS_ORIGINS, app/cors.py).
CORS_HEADERS = {
    "Access-Control-Allow-Origin": {
        "description": "`*` (the default: any origin), or the page's own origin when MUSICGEN_CORS_ORIGINS lists "
                       "it; absent for other origins, whose pages the browser then keeps from reading the answer.",
        "schema": {"type": "string"}},
    "Access-Control-Expose-Headers": {"description": "Headers a page may read beyond the safelisted ones.",
                                      "schema": {"const": "Retry-After"}},
}
PREFLIGHT = {
    "operationId": "generateMusicPreflight",
    "summary": "CORS preflight, sent by browsers before a cross-origin POST",
    "description": "Answered at once, before the token check (none is needed) and without taking the generation "
                   "slot or counting as a request. For an origin that is not allowed, 204 without CORS headers.",
    "security": [{}],
    "responses": {"204": {"description": "No content.", "headers": {
        "Access-Control-Allow-Origin": {"$ref": "#/components/headers/Access-Control-Allow-Origin"},
        "Access-Control-Allow-Methods": {"schema": {"const": "GET, POST"}},
        "Access-Control-Allow-Headers": {"description": "The requested ones among Content-Type and Authorization.",
                                         "schema": {"type": "string"}},
        "Access-Control-Max-Age": {"description": "Seconds a browser may keep this answer.",
                                   "schema": {"type": "integer"}}}}},
}


def _with_cors(paths: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Every documented answer carries the CORS headers; the generation endpoint also takes a preflight."""
    for operation in (op for ops in paths.values() for op in ops.values()):
        for response in operation["responses"].values():
            response["headers"] = {**response.get("headers", {}), **{
                name: {"$ref": f"#/components/headers/{name}"} for name in CORS_HEADERS}}
    paths["/api/v1/generate_music"]["options"] = copy.deepcopy(PREFLIGHT)
    return paths


def _request_schema() -> tp.Dict[str, tp.Any]:
    schema = copy.deepcopy(GenerateParams.model_json_schema(ref_template=REF))
    schema["properties"]["description"]["description"] += (
        " Leading and trailing whitespace is trimmed before the length is checked.")
    return schema


def _version() -> str:
    try:
        return importlib.metadata.version("musicgen-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def document() -> tp.Dict[str, tp.Any]:
    """The whole document (built once; callers must not mutate it)."""
    generate = {
        "operationId": "generateMusic",
        "summary": "Generate music from a text description, streaming progress",
        "description": "One generation at a time per process: a second request while one runs gets 503 at "
                       "once (not queued). Answers other than 200 are plain JSON, never a stream. A body "
                       "without `Content-Type: application/json` is still parsed as JSON.",
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("GenerateParams")}}},
        "responses": {
            "200": {"description": STREAM_DESCRIPTION,
                    "headers": {"Cache-Control": {"schema": {"const": "no-cache"}},
                                "X-Accel-Buffering": {"schema": {"const": "no"}}},
                    "content": {"text/event-stream": {
                        "schema": {"type": "string", "description": "`data: <StreamEvent JSON>` messages."},
                        "x-sse-data": _ref("StreamEvent"),
                        "example": 'data: {"event": "start"}\n\ndata: {"event": "progress", "progress": 25.5}'
                                   '\n\n: keep-alive\n\ndata: {"event": "completed", "audio": "UklGR..."}\n\n'}}},
            "400": _error("The body is not valid JSON, not an object, or a field is invalid (an audio field that is "
                          "not base64 or not a readable audio file in its limits, a melody to a model that takes "
                          "none, ...); the message names the field and the rule it broke."),
            "401": _error("Only when the server is configured with a token (MUSICGEN_AUTH_TOKEN): the "
                          "`Authorization: Bearer <token>` header is missing or wrong.",
                          {"WWW-Authenticate": {"schema": {"const": "Bearer"}}}),
            "413": _error("The body is larger than the configured limit (default 16 MiB)."),
            "503": _error("Busy: another generation is running (with `Retry-After`); or the model failed "
                          "to load (without it: retrying this backend will not help).",
                          {"Retry-After": {"description": "Seconds to wait before trying again (when busy).",
                                           "schema": {"type": "integer", "minimum": 0}}}),
            "500": _error("Unexpected failure before streaming; details go to the server log."),
            "default": _error("Any other error (404 unknown path, 405 wrong method), same shape."),
        },
    }
    health = {
        "summary": "State of the service; never blocked by a running generation",
        "responses": {"200": {"description": "The state.", "content": {JSON: {"schema": _ref("Health")}}}},
    }
    schemas: tp.Dict[str, tp.Any] = {
        "GenerateParams": _request_schema(),
        **EVENTS,
        "StreamEvent": {"oneOf": [_ref(name) for name in EVENTS],
                        "discriminator": {"propertyName": "event", "mapping": {
                            EVENTS[name]["properties"]["event"]["const"]: REF.format(model=name)
                            for name in EVENTS}}},
        "ErrorResponse": {"type": "object", "required": ["event", "message"], "properties": {
            "event": {"const": "error"}, "message": {"type": "string"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"enum": ["loading", "ready", "busy", "failed"]},
            "model": {"type": "string"},
            "model_loaded": {"type": "boolean", "description": "False while loading and after an idle unload."},
            "device": {"type": ["string", "null"]},
            "sample_rate": {"type": ["integer", "null"]},
            "channels": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"], "description": "Why the model failed to load."},
            "uptime_seconds": {"type": "number"},
            "features": {"type": "object", "description": "What the loaded model can do.", "properties": {
                "melody": {"type": "boolean", "description": "It takes a `melody` (a melody model)."},
                "audio_prompt": {"type": "boolean", "description": "It continues an `audio_prompt`."},
                "stream_audio": {"type": "boolean", "description": "It streams its audio while it is made "
                                                                   "(`stream_audio`)."},
                "formats": {"type": "array", "items": {"enum": list(FORMATS)}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "MusicGen text-to-music API", "version": _version(),
                 "description": "Text-to-music with MusicGen, optionally following a melody or continuing audio; "
                                "progress streamed as Server-Sent Events. Audio is 32000 Hz, mono or stereo as the "
                                "model gives: WAV (16-bit PCM) by default, or FLAC, MP3, Ogg Vorbis."},
        "paths": _with_cors({
            "/api/v1/generate_music": {"post": generate},
            "/health": {"get": {**health, "operationId": "health"}},
            "/api/v1/health": {"get": {**health, "operationId": "healthV1"}},
            "/api/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                             "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                                                   "content": {JSON: {}}}}}},
        }),
        "components": {"schemas": schemas, "headers": copy.deepcopy(CORS_HEADERS),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Only when MUSICGEN_AUTH_TOKEN is set."}}},
    }
