"""The web page at `/` in a real browser: Debian's Chromium, driven by tests/browser/scenario.js.

Skipped (with the reason) where node, the npm packages or /usr/bin/chromium are missing: `scripts/test`
installs them where it can.
"""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from app.web import CONTENT_SECURITY_POLICY
from tests.audio_samples import decode, encode, melody, tone
from tests.helpers import ARTIFACTS, ROOT, Server, events, generate

BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _missing() -> tp.Optional[str]:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (scripts/test runs `npm ci` in tests/browser)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (Debian package chromium)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def run_scenario(name: str, url: str, timeout: float = 300) -> tp.Dict[str, tp.Any]:
    done = subprocess.run(["node", str(BROWSER_DIR / "scenario.js"), name, url, str(ARTIFACTS)],
                          capture_output=True, text=True, timeout=timeout, cwd=BROWSER_DIR)
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_page_and_static_files_are_served(idle_server):
    page = requests.get(idle_server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for path in ("/static/app.js", "/static/style.css"):
        assert requests.get(idle_server.url + path, timeout=10).status_code == 200, path
    # Nothing from elsewhere: the page must work offline.
    assert "http://" not in page.text and "https://" not in page.text


def test_generate_shows_progress_and_a_playable_wav(idle_server):
    result = run_scenario("generate", idle_server.url)
    # All of it under the page's strict policy (app/web.py), which refused nothing the page does.
    assert result["policy"] == CONTENT_SECURITY_POLICY and "default-src 'none'" in result["policy"]
    assert result["cspViolations"] == [] and result["consoleErrors"] == []
    # The form is built from the validator's schema: defaults, ranges, and the advanced ones folded away.
    form = {field["name"]: field for field in result["form"]}
    assert list(form) == ["duration", "mbd", "stream_audio", "top_k", "top_p", "temperature", "cfg_coef", "seed"]
    assert (form["duration"]["min"], form["duration"]["max"], form["duration"]["value"]) == ("1", "60", "30")
    assert form["mbd"]["value"] is False and not form["mbd"]["advanced"]
    assert (form["top_k"]["value"], form["top_k"]["max"]) == ("250", "2048") and form["top_k"]["advanced"]
    assert form["seed"]["value"] == "" and form["seed"]["max"] == str(2**32 - 1)

    assert result["outcome"]["state"] == "done", result["outcome"]
    progress = result["progress"]
    assert len(set(progress) - {0, 100}) >= 3, progress  # the bar moved through several values
    assert progress == sorted(progress) and progress[-1] == 100
    audio = result["audio"]
    assert (audio["riff"], audio["wave"]) == ("RIFF", "WAVE")
    assert abs(audio["audioDuration"] - 20) < 0.1  # Chromium decoded it: playable
    assert audio["bytes"] == 44 + 20 * 32000 * 2
    assert audio["downloadName"] == "musicgen-1234.wav" and "seed 1234" in audio["resultInfo"]
    assert result["phoneOverflowPx"] <= 0  # nothing sticks out sideways at phone width
    assert (ARTIFACTS / "web-desktop.png").stat().st_size > 0 and (ARTIFACTS / "web-phone.png").exists()


def test_bad_request_message(idle_server):
    outcome = run_scenario("invalid", idle_server.url)["outcome"]
    assert outcome["state"] == "error"
    assert outcome["message"] == "The server rejected the request: description: must not be empty"
    assert not outcome["retryVisible"]


def test_cancel_frees_the_server(idle_server):
    result = run_scenario("cancel", idle_server.url)
    assert result["busyBefore"] == "busy" and result["progressAtCancel"] < 50
    assert result["outcome"]["state"] == "cancelled", result["outcome"]
    assert result["finalHealth"] == "ready" and result["readyAfterMs"] < 2000, result


def busy_answers(server: Server) -> float:
    """How many requests the server has refused as busy (/metrics)."""
    found = re.search(r'^musicgen_requests_total\{outcome="busy"\} (\S+)$', requests.get(server.url + "/metrics",
                      timeout=10).text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_busy_message_then_retry(idle_server):
    # Another client holds the slot until the page has been refused, then goes away (which cancels its job and
    # frees the slot): however fast the model or slow the browser's start, the page meets a busy server first.
    refused_before = busy_answers(idle_server)
    with generate(idle_server.url, {"description": "first", "duration": 60, "mbd": True}) as first:
        stream = events(first)  # held: a dropped generator would close the connection, which cancels the job
        assert first.status_code == 200 and next(stream)["event"] == "start"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            scenario = pool.submit(run_scenario, "busy", idle_server.url)
            deadline = time.monotonic() + 120
            while busy_answers(idle_server) == refused_before and not scenario.done():
                assert time.monotonic() < deadline, "the page never asked"
                time.sleep(0.1)
            first.close()
            result = scenario.result()
    busy = result["busy"]
    assert busy["state"] == "busy" and busy["retryVisible"]
    assert busy["message"].startswith("The server is busy with another generation. Try again in ")
    assert result["retried"]["state"] == "done" and result["audio"]["riff"] == "RIFF"


def test_token_is_asked_for_sent_and_kept_for_the_tab():
    with Server(env={"MUSICGEN_AUTH_TOKEN": "let-me-in"}) as server:
        server.wait()
        result = run_scenario("token", server.url)
    assert not result["tokenShownAtFirst"]  # nobody is asked for a token before the server wants one
    missing = result["missing"]
    assert missing["state"] == "unauthorized" and missing["tokenShown"] and missing["tokenFocused"], missing
    assert missing["message"] == "This server needs an access token: enter it above and try again."
    assert result["wrong"]["state"] == "unauthorized"
    assert result["wrong"]["message"] == "The server did not accept this access token. Check it and try again."
    assert result["right"]["state"] == "done" and result["audio"]["riff"] == "RIFF", result["right"]
    assert result["kept"] == "let-me-in" and result["afterReload"]["state"] == "done"


def test_upload_a_file_continue_it_play_and_download_the_result(idle_server):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "prompt.flac").write_bytes(encode(tone(2.0, 44100, 2), 44100, "FLAC", "PCM_16"))
    result = run_scenario("continue", idle_server.url)
    assert result["consoleErrors"] == [] and result["outcome"]["state"] == "done", result
    assert not result["melodyShown"]  # the debug model takes no melody: no picker for one
    assert result["chosen"].startswith("prompt.flac (") and result["formats"] == ["", "wav", "flac", "mp3", "ogg"]
    assert any("continuing 2 s of audio" in message for message in result["messages"]), result["messages"]
    played = result["played"]
    assert played["error"] is None and abs(played["duration"] - 4) < 0.1 and played["playedTo"] > 0.1, played
    downloaded = result["downloaded"]
    assert (downloaded["name"], downloaded["linkText"], downloaded["linkType"]) == (
        "musicgen-77.mp3", "Download MP3", "audio/mpeg")
    samples, rate = decode(Path(downloaded["saved"]).read_bytes())
    assert rate == 32000 and samples.shape[1] == 1 and abs(len(samples) - 4 * 32000) <= 1152


def test_a_melody_model_offers_a_melody_picker_that_takes_a_dropped_file(melody_server):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "tune.wav").write_bytes(encode(melody(3.0), 32000))
    result = run_scenario("melody", melody_server.url)
    assert result["consoleErrors"] == [] and result["chosen"].startswith("tune.wav (")
    assert result["outcome"]["state"] == "done", result["outcome"]
    assert abs(result["played"]["duration"] - 2) < 0.1


def test_the_page_plays_the_music_while_it_is_made(idle_server):
    """Web Audio plays the `audio` events as they come: its clock has passed the first chunk's start before
    `completed` arrives, every chunk starts where the one before ends, and the final file is offered after."""
    result = run_scenario("stream", idle_server.url)
    assert result["cspViolations"] == [] and result["consoleErrors"] == [], result
    assert result["checkedByDefault"] is True
    playing = result["whilePlaying"]
    assert playing["state"] == "running" and playing["contextState"] == "running", playing
    assert playing["message"] == "Playing the music while it is being generated…"
    assert result["outcome"]["state"] == "done" and "the final file is below" in result["outcome"]["message"]
    scheduled, completed_at = result["live"]["scheduled"], result["live"]["completedAt"]
    assert [chunk["seq"] for chunk in scheduled] == list(range(20))
    assert completed_at > scheduled[0]["at"], (completed_at, scheduled[0])  # heard before it was done
    for before, after in zip(scheduled[:-1], scheduled[1:], strict=True):
        assert abs(after["at"] - (before["at"] + before["duration"])) < 1e-6, (before, after)  # back to back
    assert abs(sum(chunk["duration"] for chunk in scheduled) - 20) < 1e-3
    assert abs(result["audio"]["audioDuration"] - 20) < 0.1 and result["audio"]["riff"] == "RIFF"
