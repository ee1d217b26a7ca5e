"""End to end against a real gunicorn (`scripts/serve`) with the debug model."""

import base64

from tests.helpers import events, generate, wav_info


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
