"""The command-line client (scripts/generate_music.py) against a real server, run as users run it."""

import importlib.util
import signal
import subprocess
import sys
import threading
import time
import typing as tp

import pytest

from app.validation import MAX_DESCRIPTION_CHARS, GenerateParams
from tests.audio_samples import decode, encode, tone
from tests.helpers import ROOT, Server, events, free_port, generate, wav_info

CLI = ROOT / "scripts" / "generate_music.py"


def cli(url: str, *args: str, timeout: float = 120, cwd: tp.Any = None) -> subprocess.CompletedProcess:
    # -I: isolated from the project and the venv's site-packages; it needs the standard library only.
    return subprocess.run([sys.executable, "-I", str(CLI), "--url", url, *args], capture_output=True,
                          timeout=timeout, cwd=cwd)


def load_cli() -> tp.Any:
    spec = importlib.util.spec_from_file_location("generate_music", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_mirror_the_validator():
    module = load_cli()
    assert module.MAX_DESCRIPTION_CHARS == MAX_DESCRIPTION_CHARS
    fields = dict(GenerateParams.model_fields)
    assert fields.pop("description").is_required()
    flags = [p[0] for p in module.PARAMETERS + module.CHOICES + module.AUDIO_FILES]
    assert sorted(flags) == sorted(fields)
    for name, values, _ in module.CHOICES:  # Optional[Literal[...]]: absent means the server decides
        assert fields[name].default is None
        assert values == tp.get_args(tp.get_args(fields[name].annotation)[0]), name
    for name, _, _ in module.AUDIO_FILES:
        assert fields[name].default is None and str in tp.get_args(fields[name].annotation), name
    for name, kind, default, low, high, _ in module.PARAMETERS:
        field = fields[name]
        assert field.default == default, name
        bounds = {k: getattr(rule, k) for rule in field.metadata for k in ("ge", "le") if hasattr(rule, k)}
        assert (bounds.get("ge"), bounds.get("le")) == (low, high), name
        assert kind in tp.get_args(field.annotation) + (field.annotation,), name


def test_generates_a_wav_with_progress(idle_server, tmp_path):
    out = tmp_path / "clip.wav"
    # Long enough for the server to report progress often (it sends at most ~20 events a second).
    done = cli(idle_server.url, "calm piano", "--duration", "20", "--seed", "42", "--top-k", "50", "-o", str(out))
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert wav_info(out.read_bytes())[:3] == (32000, 2, 1)
    assert abs(wav_info(out.read_bytes())[3] - 20) < 0.05
    progress = [line for line in stderr.splitlines() if line.startswith("progress ")]
    assert len(progress) >= 3 and progress[-1] == "progress 100.0%", stderr  # at most a line per 10% off a terminal
    assert "seed 42" in stderr and f"saved {out}" in stderr
    assert not list(tmp_path.glob("*.part"))


def test_continues_a_file_and_names_the_output_after_the_format(idle_server, tmp_path):
    riff = tmp_path / "riff.flac"
    riff.write_bytes(encode(tone(2.0, 44100, 2), 44100, "FLAC", "PCM_16"))
    done = cli(idle_server.url, "add drums", "--continue", str(riff), "--duration", "4", "--seed", "3",
               "--format", "mp3", "--normalization", "peak", cwd=tmp_path)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "generating 4 s, seed 3 (continuing 2.0 s of audio)" in stderr
    assert "saved musicgen-3.mp3 (MP3, 4 s, 32000 Hz, mono, seed 3)" in stderr
    samples, rate = decode((tmp_path / "musicgen-3.mp3").read_bytes())
    assert rate == 32000 and abs(len(samples) - 4 * 32000) <= 1152
    assert abs(abs(samples).max() - 10 ** (-1 / 20)) < 0.1  # peak normalization: -1 dBFS (MP3 overshoots a bit)


def test_the_output_extension_picks_the_format(idle_server, tmp_path):
    out = tmp_path / "pads.ogg"
    done = cli(idle_server.url, "ambient pads", "--duration", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes()[:4] == b"OggS" and decode(out.read_bytes())[0].shape == (2 * 32000, 1)
    mismatch = cli(idle_server.url, "pads", "--format", "flac", "-o", str(tmp_path / "pads.wav"))
    assert mismatch.returncode == 2 and b"--format flac but the output file ends in .wav" in mismatch.stderr
    missing = cli(idle_server.url, "pads", "--melody", str(tmp_path / "nowhere.wav"))
    assert missing.returncode == 2 and b"--melody: no such file" in missing.stderr
    melody = tmp_path / "tune.wav"
    melody.write_bytes(encode(tone(2.0), 32000))
    refused = cli(idle_server.url, "pads", "--melody", str(melody), "-o", str(tmp_path / "x.wav"))
    assert refused.returncode == 2
    assert b"bad request (400): melody: the loaded model (debug) does not take a melody" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pads.ogg", "tune.wav"]


def test_bad_request_exits_2(idle_server, tmp_path, tmp_path_factory):
    too_long = cli(idle_server.url, "x" * (MAX_DESCRIPTION_CHARS + 1), "-o", str(tmp_path / "a.wav"))
    assert too_long.returncode == 2
    assert b"bad request (400): description: at most 2000 characters" in too_long.stderr
    huge = tmp_path_factory.mktemp("inputs") / "huge.wav"
    huge.write_bytes(bytes(13 * 2**20))  # 17.3 MiB as base64: over the 16 MiB body limit
    too_large = cli(idle_server.url, "piano", "--continue", str(huge), "-o", str(tmp_path / "b.wav"))
    assert too_large.returncode == 2 and b"bad request (413)" in too_large.stderr
    out_of_range = cli(idle_server.url, "piano", "--duration", "61")  # refused before sending anything
    assert out_of_range.returncode == 2 and b"must be between 1 and 60" in out_of_range.stderr
    assert not list(tmp_path.iterdir())


def test_network_error_exits_4():
    done = cli(f"http://127.0.0.1:{free_port()}", "piano")
    assert done.returncode == 4 and b"network error" in done.stderr


def test_busy_exits_3_and_retry_waits_its_turn(idle_server, tmp_path):
    with generate(idle_server.url, {"description": "first", "duration": 60}) as first:
        assert first.status_code == 200
        kinds: tp.List[str] = []
        reader = threading.Thread(target=lambda: kinds.extend(e["event"] for e in events(first)))
        reader.start()
        busy = cli(idle_server.url, "second", "--duration", "1")
        assert busy.returncode == 3 and b"busy" in busy.stderr
        # Retry-After is 5 s; the first clip takes a few seconds at most, so a retry or two gets the slot.
        retried = cli(idle_server.url, "second", "--duration", "1", "--retry", "4", "-o", "-")
        reader.join(timeout=60)
    assert retried.returncode == 0, retried.stderr.decode()
    assert b"retrying in 5 s (1/4)" in retried.stderr
    assert kinds[-1] == "completed"
    assert wav_info(retried.stdout)[3] == 1  # `-o -`: the WAV on stdout


def test_ctrl_c_cancels_and_frees_the_server(idle_server, tmp_path):
    # Without mbd: the first `mbd` request loads MBD, a phase the server cannot interrupt.
    process = subprocess.Popen([sys.executable, "-I", str(CLI), "--url", idle_server.url, "long one",
                                "--duration", "60", "-o", str(tmp_path / "c.wav")],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr.readline().startswith("generating 60 s")  # the start event arrived
        assert idle_server.health()["status"] == "busy"
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        assert process.wait(timeout=10) == 130
        idle_server.wait(timeout=2)  # /health says ready within 2 s
        assert time.monotonic() - interrupted < 2
    finally:
        process.kill()
    assert "interrupted: the generation was cancelled" in process.stderr.read()
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def server_without_mbd(tmp_path_factory):
    """A server whose MBD weights are missing: an `mbd` request fails after the stream started."""
    with Server(env={"MUSICGEN_MBD_MODEL": str(tmp_path_factory.mktemp("no-mbd"))}) as server:
        server.wait()
        yield server


def test_error_event_exits_1(server_without_mbd, tmp_path):
    done = cli(server_without_mbd.url, "piano", "--duration", "1", "--mbd", "-o", str(tmp_path / "d.wav"))
    assert done.returncode == 1
    assert b"generation failed: could not load MultiBand Diffusion" in done.stderr
    assert not list(tmp_path.iterdir())


def test_token_from_the_environment_or_the_flag(tmp_path):
    with Server(env={"MUSICGEN_AUTH_TOKEN": "let-me-in"}) as server:
        server.wait()
        missing = cli(server.url, "piano", "--duration", "1", "-o", str(tmp_path / "a.wav"))
        assert missing.returncode == 2, missing.stderr
        assert b"unauthorized (401): this server needs a token: set MUSICGEN_AUTH_TOKEN or --token" in missing.stderr
        wrong = cli(server.url, "piano", "--duration", "1", "--token", "nope", "-o", str(tmp_path / "a.wav"))
        assert wrong.returncode == 2 and b"unauthorized (401): wrong --token" in wrong.stderr
        assert not list(tmp_path.iterdir())
        out = tmp_path / "b.wav"
        done = subprocess.run([sys.executable, "-I", str(CLI), "--url", server.url, "piano", "--duration", "1",
                               "-o", str(out)], capture_output=True, timeout=120,
                              env={"MUSICGEN_AUTH_TOKEN": "let-me-in", "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert wav_info(out.read_bytes())[:3] == (32000, 2, 1)


def test_stream_grows_a_playable_wav_and_says_when_audio_began(idle_server, tmp_path):
    """--stream: while the job runs the output is a whole WAV of what has arrived (its header says so), growing;
    at the end it is the completed clip."""
    out = tmp_path / "live.wav"
    process = subprocess.Popen([sys.executable, "-I", str(CLI), "--url", idle_server.url, "steady pulse", "--duration",
                                "20", "--seed", "9", "--stream", "-o", str(out)], stderr=subprocess.PIPE)
    seen: tp.List[float] = []
    while process.poll() is None:
        if out.exists() and out.stat().st_size > 44:
            data = out.read_bytes()
            rate, width, channels, seconds = wav_info(data)
            assert (rate, width, channels) == (32000, 2, 1)
            assert len(data) >= 44 + seconds * rate * width  # the header never claims more than is there
            if not seen or seconds > seen[-1]:
                seen.append(seconds)
        time.sleep(0.05)
    stderr = process.stderr.read().decode()
    assert process.returncode == 0, stderr
    assert "first audio after" in stderr, stderr
    assert len(seen) >= 3 and seen[0] < 20, seen  # it grew, several times, before the end
    assert wav_info(out.read_bytes()) == (32000, 2, 1, 20.0)


def test_stream_to_another_format_keeps_its_growing_wav_aside(idle_server, tmp_path):
    done = cli(idle_server.url, "steady pulse", "--duration", "3", "--stream", "-o", str(tmp_path / "clip.ogg"))
    assert done.returncode == 0, done.stderr.decode()
    assert "clip.ogg.live.wav grows" in done.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.ogg"]  # the growing WAV is gone
    samples, rate = decode((tmp_path / "clip.ogg").read_bytes())
    assert rate == 32000 and abs(len(samples) - 3 * 32000) < 100
    refused = cli(idle_server.url, "x", "--stream", "-o", "-")
    assert refused.returncode == 2 and b"--stream" in refused.stderr
