"""Optional bearer-token authentication (MUSICGEN_AUTH_TOKEN), checked before the body is even read."""

import hmac

from flask import Flask, request

# Generation is what costs GPU time. /health stays open for load balancers; /metrics is meant for the
# instance's private port (deploy/nginx-musicgen.conf refuses it from outside).
PROTECTED_ENDPOINTS = frozenset({"api.generate_music"})


class Unauthorized(Exception):
    """The bearer token is missing or wrong."""


def install(app: Flask, token: str) -> None:
    if not token:
        return
    expected = token.encode()

    @app.before_request
    def _require_token() -> None:
        # A CORS preflight (OPTIONS) never carries the token and never reaches the view: it must get its 204.
        if request.endpoint not in PROTECTED_ENDPOINTS or request.method == "OPTIONS":
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")
