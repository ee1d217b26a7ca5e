"""The HTTP layer in-process (Flask's test client) with a fake model: statuses, shapes, headers.

tests/test_server.py covers the same endpoints through a real gunicorn and audiocraft.
"""

import json
import threading

import pytest

from app import create_app
from app.config import Settings
from tests.test_generation import FakeModel


@pytest.fixture
def gated():
    """A fake model whose generation waits until the test lets it go."""
    model = FakeModel()
    model.release.clear()
    yield model
    model.release.set()


@pytest.fixture
def app(gated):
    app = create_app(Settings(model="fake", keepalive_seconds=0.05), load_model=lambda: gated)
    yield app
    gated.release.set()
    app.extensions["musicgen"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/api/v1/generate_music", data=data, **kwargs)


def sse_events(response):
    text = response.get_data(as_text=True)
    return [json.loads(m[len("data: "):]) for m in text.split("\n\n") if m.startswith("data: ")]


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b"", "not valid JSON"),
    ({"duration": 5}, "description: required"),
    ({"description": "   "}, "description: must not be empty"),
    ({"description": "x" * 2001}, "description: at most 2000"),
    ({"description": "x", "duration": 0}, "duration: must be between 1 and 60"),
    ({"description": "x", "duration": 61}, "duration: must be between 1 and 60"),
    ({"description": "x", "duration": 1.5}, "duration: must be an integer"),
    ({"description": "x", "duration": "10"}, "duration: must be an integer"),
    ({"description": "x", "duration": True}, "duration: must be an integer"),
    ({"description": "x", "mbd": "yes"}, "mbd: must be true or false"),
    ({"description": "x", "top_k": 2049}, "top_k: must be between 0 and 2048"),
    ({"description": "x", "top_p": 1.5}, "top_p: must be between 0.0 and 1.0"),
    ({"description": "x", "temperature": -1}, "temperature: must be between 0.0 and 10.0"),
    ({"description": "x", "cfg_coef": 31}, "cfg_coef: must be between 0.0 and 30.0"),
    ({"description": "x", "seed": -1}, "seed: must be between 0 and 4294967295"),
    ({"description": "x", "colour": "red"}, "colour: unknown field"),
    (b'{"description": "x", "temperature": NaN}', "temperature: must be a finite number"),
    (b'{"description": "x", "cfg_coef": Infinity}', "cfg_coef: must be a finite number"),
])
def test_bad_requests_are_400_json_naming_the_field(client, body, fragment):
    response = post(client, body, content_type="application/json")
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.json["event"] == "error" and fragment in response.json["message"]


def test_a_body_over_the_limit_is_413_json(client):
    response = post(client, {"description": "x" * 16 * 2**20}, content_type="application/json")  # 16 MiB + JSON
    assert response.status_code == 413 and response.json["event"] == "error"


def test_unknown_path_and_wrong_method_answer_json(client):
    missing = client.get("/api/v1/nothing")
    assert missing.status_code == 404 and missing.json["event"] == "error"
    wrong = client.get("/api/v1/generate_music")
    assert wrong.status_code == 405 and wrong.json["event"] == "error" and "POST" in wrong.headers["Allow"]


def test_a_body_without_content_type_is_still_json(client, gated):
    gated.release.set()
    response = post(client, {"description": "no content type", "duration": 1})
    assert response.status_code == 200
    assert [e["event"] for e in sse_events(response)][-1] == "completed"


def test_busy_is_503_json_with_retry_after_and_no_stream(client, gated):
    first = post(client, {"description": "first"}, buffered=False)
    assert first.status_code == 200
    busy = post(client, {"description": "second"})
    assert busy.status_code == 503 and busy.mimetype == "application/json"
    assert busy.json["event"] == "error" and "another generation" in busy.json["message"]
    assert int(busy.headers["Retry-After"]) > 0
    gated.release.set()
    assert sse_events(first)[-1]["event"] == "completed"


def test_closing_the_response_before_reading_it_cancels_and_frees_the_slot(app, client, gated):
    response = post(client, {"description": "abandoned"}, buffered=False)
    response.close()  # the client went away before a single byte: the generator never started
    gated.release.set()
    service = app.extensions["musicgen"]
    done = threading.Event()
    while not done.wait(0.01):
        if service.state == "ready":
            done.set()
    again = post(client, {"description": "next", "duration": 1})
    assert again.status_code == 200 and sse_events(again)[-1]["event"] == "completed"


def test_stream_messages_and_keepalives_are_well_formed(client, gated):
    threading.Timer(0.3, gated.release.set).start()  # a quiet phase first: keep-alives fill it
    text = post(client, {"description": "x", "duration": 1}).get_data(as_text=True)
    messages = text.split("\n\n")
    assert messages[-1] == ""
    assert ": keep-alive" in messages
    for message in messages[:-1]:
        assert message == ": keep-alive" or (message.startswith("data: ") and "\n" not in message)


def test_health_reports_state_without_waiting_for_a_generation(client, gated):
    assert client.get("/health").json["status"] in ("loading", "ready")
    post(client, {"description": "x"}, buffered=False)
    health = client.get("/api/v1/health").json
    assert health["status"] == "busy" and health["model"] == "fake"
