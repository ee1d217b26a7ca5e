"""The HTTP API: parse, take the slot, stream. No torch and no threads here."""

import queue
import time
import typing as tp

from flask import Blueprint, Response, current_app, jsonify, request

from . import audio_input, sse
from .config import Settings
from .generation import GenerationService, Job
from .params import FORMATS, AudioClip
from .validation import parse_request

bp = Blueprint("api", __name__)


def _service() -> GenerationService:
    return current_app.extensions["musicgen"]


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


@bp.post("/api/v1/generate_music")
def generate_music() -> Response:
    service = _service()

    def read_audio(field: str, text: str) -> AudioClip:
        service.check_available()  # a busy server answers 503 at once, without decoding the file first
        return audio_input.read(field, text)

    # 400 / 413 before anything else; the audio fields are decoded here too, on this request's thread.
    params = parse_request(request.get_data(cache=False), read_audio)
    job = service.submit(params)  # 503 at once when busy
    # Nothing may fail between taking the slot and returning the response: closing the response
    # (end of stream, or the client went away) is what cancels the job, even if it never started.
    response = Response(stream(job, _settings().keepalive_seconds),
                        content_type=sse.MIMETYPE, headers=sse.HEADERS)
    response.call_on_close(job.cancel)
    return response


def stream(job: Job, keepalive_seconds: float) -> tp.Iterator[str]:
    """SSE messages from the job's queue, and a keep-alive comment whenever it is quiet.

    Under gunicorn a vanished client surfaces only as a failed write (the second after it left),
    so regular writes are what bound the time to notice it.
    """
    while True:
        try:
            event = job.events.get(timeout=keepalive_seconds)
        except queue.Empty:
            yield sse.KEEPALIVE
            continue
        yield sse.message(event)
        if sse.is_terminal(event):
            return


@bp.get("/health")
@bp.get("/api/v1/health")
def health() -> Response:
    """Cheap and never blocked by a running generation."""
    service = _service()
    model = service.model
    return jsonify(
        status=service.state,
        model=model.name if model else _settings().model,
        model_loaded=model is not None,  # false while loading, and after an idle unload (still "ready")
        device=model.device if model else None,
        sample_rate=model.sample_rate if model else None,
        channels=model.channels if model else None,
        error=service.load_error,
        uptime_seconds=round(time.time() - service.started_at, 1),
        features={"melody": bool(model and model.melody), "audio_prompt": True,
                  "stream_audio": bool(model and model.streams), "formats": list(FORMATS)},
    )
