"""What people and tools read: the try-it page at `/` and the OpenAPI document.

The page is static (app/static, no build step, nothing from a CDN) and builds its form from the
OpenAPI document, so its defaults and ranges are the validator's own.
"""

import json

from flask import Blueprint, Response, current_app, request

from . import openapi

bp = Blueprint("web", __name__)

# The page loads nothing from elsewhere: its own script, style sheet and JSON, and the finished clip as a blob:
# URL (the <audio> player; the download link is a navigation, which CSP leaves alone).
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
    "img-src 'self' data:",  # the empty `data:,` favicon, which spares a request for /favicon.ico
    "media-src 'self' blob:", "base-uri 'none'", "form-action 'self'", "frame-ancestors 'none'"))
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}
PAGE_ENDPOINTS = frozenset({"web.index", "static"})


@bp.get("/")
def index() -> Response:
    response = current_app.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"  # a new release must not meet a stale page
    return response


@bp.get("/api/v1/openapi.json")
def openapi_document() -> Response:
    # Not jsonify: it sorts keys, and the page shows the fields in the schema's order.
    return Response(json.dumps(openapi.document(), indent=1), mimetype="application/json")


@bp.after_app_request
def _browser_headers(response: Response) -> Response:
    """Every answer is read as the type it says it is; the page and its files also get their policy."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.endpoint in PAGE_ENDPOINTS:
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    return response
