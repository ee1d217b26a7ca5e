"""What people and tools read: the try-it page at `/` and the OpenAPI document.

The page is static (app/static, no build step, nothing from a CDN) and builds its form from the
OpenAPI document, so its defaults and ranges are the validator's own.
"""

import json

from flask import Blueprint, Response, current_app

from . import openapi

bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> Response:
    response = current_app.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"  # a new release must not meet a stale page
    return response


@bp.get("/api/v1/openapi.json")
def openapi_document() -> Response:
    # Not jsonify: it sorts keys, and the page shows the fields in the schema's order.
    return Response(json.dumps(openapi.document(), indent=1), mimetype="application/json")
