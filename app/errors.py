"""The one mapping of exceptions to HTTP answers.

The exceptions live where they are raised and know nothing of HTTP: the request's (`app/validation.py`,
`app/auth.py`, `app/audio_input.py`) and the domain's (`app/generation.py`, `app/params.py`). Every answer
that is not a stream has the API's error shape `{"event": "error", "message": ...}`, also Flask's own
404/405/413, so a client (or nginx retrying on another backend) sees one format.
"""

import logging
import typing as tp

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from .audio_input import AudioInputError
from .auth import Unauthorized
from .generation import Busy, ModelUnavailable
from .params import UnsupportedRequest
from .validation import InvalidRequest

log = logging.getLogger(__name__)

STATUSES: tp.Dict[tp.Type[Exception], int] = {
    InvalidRequest: 400,
    AudioInputError: 400,  # an audio field that is not base64, not audio, or out of its limits
    UnsupportedRequest: 400,  # what the loaded model or the clip cannot do (a melody to a non-melody model)
    Unauthorized: 401,
    Busy: 503,  # with Retry-After: this server will take requests again
    ModelUnavailable: 503,  # without: waiting will not help this one (nginx tries another backend either way)
}


def error_response(status: int, message: str, headers: tp.Optional[tp.Mapping[str, str]] = None) -> Response:
    response = jsonify(event="error", message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _headers(e: Exception) -> tp.Dict[str, str]:
    if isinstance(e, Busy):
        return {"Retry-After": str(current_app.config["SETTINGS"].retry_after_seconds)}
    if isinstance(e, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="musicgen"'}
    return {}


def register_error_handlers(app: Flask) -> None:
    for exception, status in STATUSES.items():
        app.register_error_handler(exception, lambda e, status=status: error_response(status, str(e), _headers(e)))

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        # Keep headers such as Allow (405); the body becomes JSON.
        headers = {k: v for k, v in e.get_headers() if k.lower() != "content-type"}
        return error_response(e.code or 500, e.description or e.name, headers)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unexpected error before streaming")
        return error_response(500, "internal server error")
