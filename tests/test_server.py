"""End to end against a real gunicorn (`scripts/serve`) with the debug model."""

import base64
import time

import pytest
import requests

from tests.helpers import Server, events, generate, messages, wav_info


def test_happy_path_streams_start_progress_completed(idle_server):
    with generate(idle_server.url, {"description": "calm piano", "duration": 3, "seed": 7}) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        received = list(events(r))
    kinds = [e["event"] for e in received]
    assert kinds[0] == "start" and kinds[-1] == "completed"
    assert set(kinds[1:-1]) == {"progress"}
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100.0
    done = received[-1]
    assert (done["sample_rate"], done["channels"], done["duration"], done["seed"]) == (32000, 1, 3, 7)
    rate, width, channels, seconds = wav_info(base64.b64decode(done["audio"]))
    assert (rate, width, channels) == (32000, 2, 1)
    assert abs(seconds - 3) / 3 < 0.02


def completed(url, body):
    with generate(url, body) as r:
        assert r.status_code == 200, r.text
        received = list(events(r))
    assert received[-1]["event"] == "completed", received[-1]
    return received


def test_defaults_give_a_30_second_clip(idle_server):
    done = completed(idle_server.url, {"description": "defaults"})[-1]
    assert done["duration"] == 30
    assert abs(wav_info(base64.b64decode(done["audio"]))[3] - 30) < 0.6


def test_a_60_second_clip_reports_monotone_progress_across_windows(idle_server):
    received = completed(idle_server.url, {"description": "long", "duration": 60})
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(set(progress)) and progress[0] > 0 and progress[-1] == 100.0
    assert len(progress) >= 10  # past 30 s audiocraft's own count steps back; ours never does
    assert abs(wav_info(base64.b64decode(received[-1]["audio"]))[3] - 60) < 1.2


def test_mbd_decodes_and_reports_progress_through_diffusion(idle_server):
    received = completed(idle_server.url, {"description": "mbd", "duration": 4, "mbd": True})
    assert received[0]["mbd"] is True
    progress = [e["progress"] for e in received if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert any(71 < p < 100 for p in progress)  # the diffusion stage moves the bar too
    assert wav_info(base64.b64decode(received[-1]["audio"]))[:3] == (32000, 2, 1)


def test_a_second_request_while_streaming_gets_503_json_at_once(idle_server):
    with generate(idle_server.url, {"description": "long", "duration": 60, "mbd": True}) as first:
        stream = events(first)
        assert next(stream)["event"] == "start"
        started = time.monotonic()
        busy = requests.post(f"{idle_server.url}/api/v1/generate_music", json={"description": "x"}, timeout=10)
        elapsed = time.monotonic() - started
        assert busy.status_code == 503 and busy.headers["Content-Type"] == "application/json"
        assert busy.json()["event"] == "error" and int(busy.headers["Retry-After"]) > 0
        assert elapsed < 1  # refused, not queued behind a generation that takes far longer
    wait_until_free(idle_server.url)


def wait_until_free(url, within=2.0):
    """POST until accepted; return how long that took. Fails past `within` seconds."""
    started = time.monotonic()
    while True:
        r = requests.post(f"{url}/api/v1/generate_music", json={"description": "next", "duration": 1},
                          stream=True, timeout=10)
        if r.status_code == 200:
            accepted_after = time.monotonic() - started
            assert [e["event"] for e in events(r)][-1] == "completed"
            return accepted_after
        assert r.status_code == 503, r.text
        r.close()
        assert time.monotonic() - started < within, "slot still taken"
        time.sleep(0.05)


@pytest.mark.parametrize("stage, duration", [("progress", 60), ("diffusion", 20)])
def test_disconnecting_mid_stream_cancels_and_frees_the_slot(idle_server, stage, duration):
    # Noticed within 2 s, stopped within one step: debug MBD steps over 20 s of audio are short.
    session = requests.Session()
    r = session.post(f"{idle_server.url}/api/v1/generate_music", stream=True, timeout=60,
                     json={"description": "abandoned", "duration": duration, "mbd": True})
    for event in events(r):
        if event["event"] == "progress" and (stage == "progress" or event["progress"] > 71):
            break
    session.close()  # the client goes away
    assert wait_until_free(idle_server.url) < 2
    assert "generation cancelled" in idle_server.output()


def test_asking_again_the_instant_completed_arrives_is_never_refused(idle_server):
    for i in range(20):
        with generate(idle_server.url, {"description": f"again {i}", "duration": 1}) as r:
            assert r.status_code == 200, f"request {i}: {r.status_code} {r.text}"
            assert [e["event"] for e in events(r)][-1] == "completed"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(idle_server):
    url = f"{idle_server.url}/api/v1/generate_music"
    bad = [b"{", b"null", b'{"description": 5}', b'{"description": "x", "duration": 1e9}', b"\xff" * 10,
           b'{"description": "x", "seed": 1e400}', b"[" * 50_000, b'{"description": "x", "extra": {}}']
    for body in bad:
        r = requests.post(url, data=body, timeout=10)
        assert r.status_code == 400 and r.json()["event"] == "error", (body[:30], r.status_code, r.text)
    assert requests.post(url, data=b"x" * (16 * 2**20 + 1), timeout=30).status_code == 413
    assert requests.get(url, timeout=10).status_code == 405
    completed(idle_server.url, {"description": "still serving", "duration": 1})


@pytest.mark.parametrize("mbd", [False, True])
def test_a_stereo_model_gives_a_two_channel_wav(stereo_server, mbd):
    done = completed(stereo_server.url, {"description": "wide", "duration": 2, "mbd": mbd})[-1]
    assert done["channels"] == 2
    assert wav_info(base64.b64decode(done["audio"]))[:3] == (32000, 2, 2)


def test_a_model_that_cannot_load_is_reported_not_crash_looped(tmp_path):
    with Server({"MUSICGEN_MODEL": str(tmp_path / "no-such-model"), "HF_HUB_OFFLINE": "1"}) as s:
        health = s.wait(status=("failed",))
        assert "MUSICGEN_MODEL" in health["error"]
        r = requests.post(f"{s.url}/api/v1/generate_music", json={"description": "x"}, timeout=10)
        assert r.status_code == 503 and "failed to load" in r.json()["message"]
        assert s.process.poll() is None


def test_a_client_that_leaves_while_the_model_loads_frees_the_slot():
    # Sent as soon as the server answers. The debug model may load faster than that, so the clip is
    # long enough to be cancelled either way: before it began, or at its first steps.
    with Server() as s:
        s.wait(status=("loading", "ready"))
        session = requests.Session()
        r = session.post(f"{s.url}/api/v1/generate_music", json={"description": "early", "duration": 60},
                         stream=True, timeout=60)
        next(messages(r))
        session.close()
        noticed = time.monotonic() + 2
        while s.health()["status"] == "busy":  # freed within 2 s, even if the model is still loading
            assert time.monotonic() < noticed, "slot still taken"
            time.sleep(0.05)
        s.wait()
        assert wait_until_free(s.url) < 2
        assert "generation cancelled" in s.output()  # before it began, or at its first step
