"""Server-Sent Events framing (pure).

Every message is one `data: <JSON>` line plus a blank line: the original document's clients split
on blank lines and parse what follows `data: `, so a message must never span several data lines.
"""

import json
import typing as tp

# A message made of a comment line only. The original clients ignore it (it does not start with
# `data: `); proxies see traffic; and the write is how a vanished client is noticed.
KEEPALIVE = ": keep-alive\n\n"

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each message on at once
}
MIMETYPE = "text/event-stream"

TERMINAL_EVENTS = ("completed", "error")


def message(event: tp.Mapping[str, tp.Any]) -> str:
    """One SSE message. json.dumps escapes newlines inside strings, so it is always a single line."""
    return f"data: {json.dumps(event)}\n\n"


def is_terminal(event: tp.Mapping[str, tp.Any]) -> bool:
    return event.get("event") in TERMINAL_EVENTS
