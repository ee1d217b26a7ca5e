"""Domain exceptions and their one mapping to HTTP.

Every answer that is not a stream has the API's error shape `{"event": "error", "message": ...}`,
also Flask's own 404/405/413, so a client (or nginx retrying on another backend) sees one format.
"""

import logging
import typing as tp

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error that becomes a JSON answer with `status` before any stream byte."""

    status = 500

    def __init__(self, message: str, headers: tp.Optional[tp.Dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Busy(ApiError):
    """Another generation holds the slot; the request is refused, not queued."""

    status = 503


class ModelUnavailable(ApiError):
    """The model failed to load; retrying the same backend will not help."""

    status = 503


class Cancelled(Exception):
    """Raised inside generation when the client went away or the server is stopping."""


def error_response(status: int, message: str, headers: tp.Optional[tp.Mapping[str, str]] = None) -> Response:
    response = jsonify(event="error", message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> Response:
        return error_response(e.status, e.message, e.headers)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        # Keep headers such as Allow (405); the body becomes JSON.
        headers = {k: v for k, v in e.get_headers() if k.lower() != "content-type"}
        return error_response(e.code or 500, e.description or e.name, headers)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unexpected error before streaming")
        return error_response(500, "internal server error")
