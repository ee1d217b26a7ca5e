"""Operating the service: metrics, bearer-token auth, idle unload and graceful shutdown.

The app-level tests run create_app with the fake model of tests/test_generation.py through Flask's
test client; the shutdown tests send SIGTERM to a real gunicorn (`scripts/serve`) mid-generation.
"""

import json
import signal
import threading
import time
import typing as tp

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.config import ConfigError, Settings
from app.generation import Busy, GenerationService
from tests.helpers import Server, events, generate
from tests.test_generation import FakeModel, drain, params


def sse_events(response) -> tp.List[tp.Dict[str, tp.Any]]:
    return [json.loads(m[len("data: "):]) for m in response.get_data(as_text=True).split("\n\n")
            if m.startswith("data: ")]


def scrape(text: str) -> tp.Dict[tp.Tuple[str, tp.Tuple[tp.Tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def make_app():
    apps = []

    def make(model: tp.Optional[FakeModel] = None, **settings: tp.Any):
        model = model or FakeModel()
        app = create_app(Settings(model="fake", **settings), load_model=lambda: model)
        apps.append(app)
        deadline = time.monotonic() + 10
        while app.extensions["musicgen"].state == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        return app

    yield make
    for app in apps:
        app.extensions["musicgen"].stop()


def post(client, body: tp.Any, **headers: str):
    return client.post("/api/v1/generate_music", data=json.dumps(body), headers=headers)


def test_metrics_count_outcomes_and_generation(make_app):
    model = FakeModel(steps=40, step_seconds=0.001)
    app = make_app(model)
    client = app.test_client()
    assert sse_events(post(client, {"description": "ok", "duration": 2}))[-1]["event"] == "completed"
    assert post(client, {"description": ""}).status_code == 400
    assert client.post("/api/v1/generate_music", data=b"x" * (16 * 2**20 + 1)).status_code == 413

    model.release.clear()  # hold the next generation so that one more request finds the slot busy
    held = post(client, {"description": "held", "duration": 1})
    assert post(client, {"description": "refused"}).status_code == 503
    model.release.set()
    assert sse_events(held)[-1]["event"] == "completed"

    app.extensions["musicgen"].submit(params()).cancel()  # left before it began: dropped unrun
    deadline = time.monotonic() + 10
    while (samples := scrape(client.get("/metrics").get_data(as_text=True)))[
            ("musicgen_requests_total", (("outcome", "cancelled"),))] == 0:
        assert time.monotonic() < deadline, "the abandoned job was not counted"
        time.sleep(0.02)
    outcome = {o: samples[("musicgen_requests_total", (("outcome", o),))]
               for o in ("completed", "error", "cancelled", "busy", "invalid", "unauthorized")}
    assert outcome == {"completed": 2, "error": 0, "cancelled": 1, "busy": 1, "invalid": 2, "unauthorized": 0}
    assert samples[("musicgen_generation_seconds_count", ())] == 2
    assert samples[("musicgen_audio_seconds_total", ())] == 3
    assert samples[("musicgen_decoding_steps_per_second", ())] > 0
    assert samples[("musicgen_state", (("state", "ready"),))] == 1
    assert samples[("musicgen_state", (("state", "busy"),))] == 0
    assert samples[("musicgen_model_loaded", ())] == 1
    assert samples[("musicgen_uptime_seconds", ())] > 0
    assert not any(name.startswith("musicgen_gpu") for name, _ in samples)  # CPU: no GPU series


def test_two_apps_in_one_process_keep_their_own_metrics(make_app):
    first, second = make_app(), make_app()
    post(first.test_client(), {"description": ""})
    count = ("musicgen_requests_total", (("outcome", "invalid"),))
    assert scrape(first.test_client().get("/metrics").get_data(as_text=True))[count] == 1
    assert scrape(second.test_client().get("/metrics").get_data(as_text=True))[count] == 0


def test_bearer_token_is_checked_before_any_work(make_app):
    model = FakeModel()
    app = make_app(model, auth_token="s3cret")
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                    {"Authorization": "s3cret"}):
        r = post(client, {"description": "x" * 5000}, **headers)  # invalid too: the token is checked first
        assert r.status_code == 401, headers
        assert r.json["event"] == "error" and "bearer token" in r.json["message"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert model.completed_steps == 0
    r = post(client, {"description": "ok", "duration": 1}, Authorization="Bearer s3cret")
    assert sse_events(r)[-1]["event"] == "completed"
    assert client.get("/health").status_code == 200  # load balancers need no token
    assert "s3cret" not in repr(app.config["SETTINGS"])
    samples = scrape(client.get("/metrics").get_data(as_text=True))
    assert samples[("musicgen_requests_total", (("outcome", "unauthorized"),))] == 4


def test_no_token_configured_means_no_authentication(make_app):
    r = post(make_app().test_client(), {"description": "ok", "duration": 1})
    assert sse_events(r)[-1]["event"] == "completed"


def test_idle_unload_runs_on_the_generation_thread_and_the_next_request_reloads(make_app):
    loads: tp.List[str] = []
    model = FakeModel()

    def load() -> FakeModel:
        loads.append(threading.current_thread().name)
        return model

    app = create_app(Settings(model="fake", idle_unload_seconds=0.3), load_model=load)
    service = app.extensions["musicgen"]
    try:
        client = app.test_client()
        deadline = time.monotonic() + 10
        while (health := client.get("/health").json)["model_loaded"] or health["status"] != "ready":
            assert time.monotonic() < deadline, f"the model was not unloaded: {health}"
            time.sleep(0.05)
        assert health["device"] is None and loads == ["generation"]
        received = sse_events(post(client, {"description": "wake up", "duration": 1}))
        assert [e["event"] for e in received][0] == "start" and received[-1]["event"] == "completed"
        assert loads == ["generation", "generation"]
    finally:
        service.stop()


def test_idle_unload_setting_is_validated():
    with pytest.raises(ConfigError):
        Settings.from_env({"MUSICGEN_IDLE_UNLOAD_SECONDS": "-1"})
    assert Settings.from_env({"MUSICGEN_IDLE_UNLOAD_SECONDS": "600"}).idle_unload_seconds == 600


def test_shutdown_ends_a_running_job_with_an_error_before_the_grace_period_ends():
    model = FakeModel(steps=10_000, step_seconds=0.01)
    service = GenerationService(lambda: model).start()
    try:
        job = service.submit(params())
        assert job.events.get(timeout=10)["event"] == "start"
        started = time.monotonic()
        service.shutdown(grace_seconds=1.0)
        with pytest.raises(Busy, match="shutting down"):
            service.submit(params())
        received = drain(job)
        assert received[-1] == {"event": "error", "message": "generation cancelled: the server is shutting down"}
        assert 0.4 < time.monotonic() - started < 1.0
        assert [e["event"] for e in received].count("error") == 1
    finally:
        service.stop()


def test_sigterm_lets_a_generation_finish_within_the_graceful_timeout():
    with Server(env={"GUNICORN_GRACEFUL_TIMEOUT": "60"}) as server:
        server.wait()
        with generate(server.url, {"description": "finish me", "duration": 3}) as r:
            stream = events(r)
            assert next(stream)["event"] == "start"
            server.process.send_signal(signal.SIGTERM)
            received = list(stream)
        assert received[-1]["event"] == "completed"
        assert server.process.wait(timeout=30) == 0


def test_sigterm_past_the_graceful_timeout_sends_an_error_event_and_exits():
    with Server(env={"GUNICORN_GRACEFUL_TIMEOUT": "4"}) as server:
        server.wait()
        # 60 s with MBD: well past the 4 s grace even for the debug model on a quiet machine.
        with generate(server.url, {"description": "too long to finish", "duration": 60, "mbd": True}) as r:
            stream = events(r)
            assert next(stream)["event"] == "start"
            server.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            received = list(stream)
            ended = time.monotonic() - sent
        # The app ends it shortly before gunicorn's deadline (4 s), while the client can still read.
        assert received[-1] == {"event": "error", "message": "generation cancelled: the server is shutting down"}
        assert 1 < ended < 4, ended
        assert server.process.wait(timeout=15) == 0


def test_metrics_page_of_a_real_server(idle_server):
    with generate(idle_server.url, {"description": "counted", "duration": 1}) as r:
        assert [e["event"] for e in events(r)][-1] == "completed"
    r = requests.get(f"{idle_server.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    samples = scrape(r.text)
    assert samples[("musicgen_requests_total", (("outcome", "completed"),))] >= 1
    assert samples[("musicgen_audio_seconds_total", ())] >= 1


def test_real_server_with_token_and_idle_unload():
    with Server(env={"MUSICGEN_AUTH_TOKEN": "t0ken", "MUSICGEN_IDLE_UNLOAD_SECONDS": "1"}) as server:
        server.wait()
        r = generate(server.url, {"description": "no token"})
        assert (r.status_code, r.json()["event"]) == (401, "error")
        deadline = time.monotonic() + 30
        while server.health()["model_loaded"]:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert server.health()["status"] == "ready"
        with requests.post(f"{server.url}/api/v1/generate_music", json={"description": "wake up", "duration": 1},
                           headers={"Authorization": "Bearer t0ken"}, stream=True, timeout=300) as r:
            assert r.status_code == 200
            kinds = [e["event"] for e in events(r)]
        assert kinds[0] == "start" and kinds[-1] == "completed"
        assert "loading the model again" in server.output()
