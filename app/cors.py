"""Cross-origin answers (CORS), so that the original JavaScript client works from any web page.

flask-cors writes the headers, on every answer (the stream, every JSON error, health, OpenAPI) from an
after-request hook and its exception wrappers. What it leaves to us: a preflight is answered here, at once,
with 204, before the token check and far from the view, so it never takes the generation slot.
CORS only decides which pages may *read* answers; it protects nothing (README, "Browsers on other origins").
"""

import re
import typing as tp

from flask import Flask, Response, request
from flask_cors import CORS

METHODS = ("GET", "POST")
HEADERS = ("Content-Type", "Authorization")
EXPOSED = ("Retry-After",)  # a page reads a busy answer's wait; the other headers it needs are safelisted
MAX_AGE_SECONDS = 600  # a browser asks again after 10 minutes at most (Chromium caps this at 2 hours)


def install(app: Flask, origins: tp.Sequence[str]) -> None:
    """Answer CORS for `origins`: ("*",) for any origin, else the exact origins listed."""
    any_origin = tuple(origins) == ("*",)
    CORS(app,
         # Exact, case-insensitive matches: flask-cors would read a string such as http://[::1]:8000 as a regex.
         origins="*" if any_origin else [re.compile(re.escape(o) + r"\Z", re.IGNORECASE) for o in origins],
         send_wildcard=any_origin,  # `*` itself, not the page's origin echoed back
         always_send=any_origin,  # `*` also without an Origin header (curl): the same answer for every client
         supports_credentials=False,  # the token travels in Authorization, which a page sets itself; no cookies
         methods=list(METHODS), allow_headers=list(HEADERS), expose_headers=list(EXPOSED), max_age=MAX_AGE_SECONDS,
         # Chromium asks before a public page reaches a private address: yes only to origins named one by one.
         allow_private_network=not any_origin)
    app.before_request(_preflight)


def _preflight() -> tp.Optional[Response]:
    """A routed preflight gets 204 (flask-cors adds its headers); an unknown path keeps its 404."""
    preflight = (request.method == "OPTIONS" and "Origin" in request.headers
                 and "Access-Control-Request-Method" in request.headers)
    if not preflight or request.routing_exception is not None:
        return None
    response = Response(status=204)
    del response.headers["Content-Type"]  # no body, so no type
    return response
