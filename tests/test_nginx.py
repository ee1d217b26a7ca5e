"""Real nginx (Debian's) running the shipped site, deploy/nginx-musicgen.conf, in front of real gunicorn servers.

The site is rendered with the test's loopback ports and nothing else changed, except where a test
says so (the 504 test shortens proxy_read_timeout); nginx runs two worker processes, as the shared
upstream zone matters only then.
"""

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, Server, events, free_port, generate, messages, wav_info

SITE = ROOT / "deploy" / "nginx-musicgen.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test installs it)")


def render_site(backends: tp.Sequence[int], port: int, replace: tp.Mapping[str, str] = ()) -> str:
    """The shipped site with its upstream servers and listen address swapped for the test's.

    Every server line keeps the shipped parameters (max_fails=0 ...); each substitution must match.
    """
    text = SITE.read_text()
    shipped = re.findall(r"^( +)server 127\.0\.0\.1:\d+ (.*);$", text, re.M)
    assert shipped, "no upstream server lines in the shipped site"
    indent, params = shipped[0]
    assert all(p == params for _, p in shipped), "the shipped server lines differ in their parameters"
    ours = "".join(f"{indent}server 127.0.0.1:{b} {params};\n" for b in backends)
    text, n = re.subn(r"(?:^ +server 127\.0\.0\.1:\d+ .*;\n)+", lambda _: ours, text, flags=re.M)
    assert n == 1
    for old, new in {"listen 80;": f"listen 127.0.0.1:{port};", "listen [::]:80;": "", **dict(replace)}.items():
        assert text.count(old) == 1, f"{old!r} is not in the shipped site exactly once"
        text = text.replace(old, new)
    return text


class Nginx:
    """nginx with the rendered site on a free loopback port; its files in a temporary directory."""

    def __init__(self, directory: Path, backends: tp.Sequence[int], replace: tp.Mapping[str, str] = ()):
        self.dir = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "site.conf").write_text(render_site(backends, self.port, replace))
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp dirs below
        temp = "".join(f"  {kind}_temp_path {directory}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf = directory / "nginx.conf"
        self.conf.write_text(
            f"{user}daemon off;\nworker_processes 2;\npid {directory}/nginx.pid;\n"
            f"error_log {directory}/error.log info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n  access_log {directory}/access.log;\n{temp}  include {directory}/site.conf;\n}}\n")
        self.process: tp.Optional[subprocess.Popen] = None

    def command(self, *args: str) -> tp.List[str]:
        return [NGINX, "-c", str(self.conf), "-p", str(self.dir), "-e", str(self.dir / "error.log"), *args]

    def start(self) -> "Nginx":
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.error_log()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"nginx did not listen:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def nginx(tmp_path):
    """A factory: nginx(backend ports, replace={...}) -> a started Nginx, stopped after the test."""
    started: tp.List[Nginx] = []

    def start(backends: tp.Sequence[int], replace: tp.Mapping[str, str] = ()) -> Nginx:
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        started.append(Nginx(directory, backends, replace).start())
        return started[-1]

    yield start
    for n in started:
        n.stop()


@pytest.fixture(scope="module")
def second_server():
    """A second backend; nothing but test_disconnect_in_silent_phase sends it `mbd: true` requests.

    Its keep-alives come every 50 ms, so the first one goes out well before the debug MBD (a fraction
    of a second to load) is ready.
    """
    with Server({"MUSICGEN_KEEPALIVE_SECONDS": "0.05"}) as s:
        s.wait()
        yield s


def established_to(port: int, samples: int = 5) -> int:
    """How many TCP connections on this machine are ESTABLISHED towards 127.0.0.1:`port`.

    /proc/net/tcp is read in pages while other connections come and go, so a single read may skip
    a line: the answer is the largest of several reads.
    """
    return max(_established_to(port) for _ in range(samples))


def _established_to(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                _, _, remote, state = line.split()[:4]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def log_of(server: Server) -> str:
    """The server's whole log (`Server.output()` is its tail, which health polls soon push out)."""
    return Path(server.log_path).read_text(errors="replace")


def wait_ready(server: Server, within: float) -> float:
    """Seconds until the backend reports ready; fails after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if server.health()["status"] == "ready":
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"backend still {server.health()['status']} {within} s later:\n{server.output()}")


def test_nginx_accepts_the_shipped_site(tmp_path):
    check = Nginx(tmp_path, [5555, 5556])
    result = subprocess.run(check.command("-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_long_generation_streams_live_and_its_large_completed_event_arrives_intact(idle_server, nginx):
    proxy = nginx([idle_server.port])
    started = time.monotonic()
    arrivals: tp.List[tp.Tuple[float, tp.Dict[str, tp.Any]]] = []
    with generate(proxy.url, {"description": "long ambient drone", "duration": 60, "seed": 3}) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        arrivals = [(time.monotonic() - started, e) for e in events(r)]
    kinds = [e["event"] for _, e in arrivals]
    assert kinds[0] == "start" and kinds[-1] == "completed", kinds[-3:]
    progress_times = [t for t, e in arrivals if e["event"] == "progress"]
    completed_at = arrivals[-1][0]
    # Unbuffered: progress reaches the client while the generation runs, not in a burst at the end.
    assert progress_times[0] < completed_at / 2, (progress_times[0], completed_at)
    assert progress_times[len(progress_times) // 2] < completed_at * 0.9
    # The terminal event (several MB of base64 in one line) arrives whole and decodes to 60 s of WAV.
    done = arrivals[-1][1]
    rate, width, channels, seconds = wav_info(base64.b64decode(done["audio"], validate=True))
    assert (rate, width, channels, done["seed"]) == (32000, 2, 1, 3)
    assert abs(seconds - 60) < 0.5


def test_streamed_audio_arrives_through_the_shipped_site_as_it_is_made(idle_server, nginx):
    """Each `audio` event (85 kB of base64 per second of mono at 32 kHz, 171 kB stereo) passes nginx unbuffered: the
    client hears the music while the job runs, not all of it at the end."""
    proxy = nginx([idle_server.port])
    started = time.monotonic()
    body = {"description": "streamed through nginx", "duration": 20, "seed": 5, "stream_audio": True}
    with generate(proxy.url, body) as r:
        assert r.status_code == 200
        arrivals = [(time.monotonic() - started, e) for e in events(r)]
    assert arrivals[-1][1]["event"] == "completed"
    audio = [(t, e) for t, e in arrivals if e["event"] == "audio"]
    assert [e["seq"] for _, e in audio] == list(range(20))
    completed_at = arrivals[-1][0]
    assert audio[0][0] < completed_at / 2, (audio[0][0], completed_at)
    assert audio[len(audio) // 2][0] < completed_at * 0.9
    assert sum(len(base64.b64decode(e["pcm"])) for _, e in audio) == 20 * 32000 * 2


def test_client_disconnect_at_nginx_cancels_and_frees_the_slot(idle_server, nginx):
    proxy = nginx([idle_server.port])
    cancelled_before = log_of(idle_server).count("generation cancelled")
    r = generate(proxy.url, {"description": "to be abandoned", "duration": 60, "mbd": True})  # outlasts detection
    assert r.status_code == 200
    stream = events(r)  # held: a dropped generator closes the connection (urllib3 closes it on GeneratorExit)
    for event in stream:
        if event["event"] == "progress":
            break
    assert idle_server.health()["status"] == "busy"
    r.close()  # the client goes away; nginx must close its upstream connection and the app cancel
    freed_after = wait_ready(idle_server, within=2)
    print(f"slot free {freed_after:.2f} s after the client left")
    assert log_of(idle_server).count("generation cancelled") == cancelled_before + 1


def test_client_disconnect_in_silent_phase(second_server, nginx):
    """The first `mbd: true` request waits while the backend loads MBD: its stream carries keep-alives only."""
    proxy = nginx([second_server.port])
    cancelled_before = log_of(second_server).count("generation cancelled")
    r = generate(proxy.url, {"description": "silent then gone", "duration": 5, "mbd": True})
    assert r.status_code == 200
    stream = messages(r)  # held: a dropped generator closes the connection (urllib3 closes it on GeneratorExit)
    assert next(stream) == ": keep-alive"
    assert established_to(second_server.port) == 1  # nginx -> gunicorn, quiet but for keep-alives
    r.close()
    left = time.monotonic()
    # nginx drops the upstream connection at once, though the backend has sent nothing but comments,
    # and the backend frees the slot while MBD is still loading.
    deadline = left + 2
    while established_to(second_server.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert established_to(second_server.port) == 0, "nginx kept the upstream connection open"
    wait_ready(second_server, within=max(0.1, left + 2 - time.monotonic()))
    # Once MBD is loaded, the abandoned job is dropped unrun.
    deadline = time.monotonic() + 120
    while log_of(second_server).count("generation cancelled") == cancelled_before:
        assert time.monotonic() < deadline, second_server.output()
        time.sleep(0.2)
    log = log_of(second_server)
    assert "loading MultiBand Diffusion" in log and "generated 5 s" not in log


def test_nginx_own_errors_are_api_json(idle_server, nginx, tmp_path):
    proxy = nginx([idle_server.port])
    limit = 16 * 1024 * 1024
    # At the limit the body gets through to the app (which rejects the over-long description) ...
    at_limit = json.dumps({"description": "x" * (limit - 20)}).encode()
    at_limit += b" " * (limit - len(at_limit))
    r = generate(proxy.url, at_limit)
    assert r.status_code == 400 and "description" in r.json()["message"]
    # ... one byte more and nginx answers itself, in the API's shape.
    r = generate(proxy.url, at_limit + b" ")
    assert r.status_code == 413
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["event"] == "error" and "too large" in r.json()["message"]

    r = requests.get(f"{proxy.url}/metrics", timeout=10)
    assert (r.status_code, r.json()["event"]) == (403, "error")

    nobody = nginx([free_port()])  # no backend listening
    r = generate(nobody.url, {"description": "anyone there?"})
    assert r.status_code == 502
    assert r.json() == {"event": "error", "message": "no generation backend is reachable; try again later"}

    with socket.socket() as mute:  # accepts connections, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        slow = nginx([mute.getsockname()[1]], replace={"proxy_read_timeout 75s;": "proxy_read_timeout 1s;"})
        r = generate(slow.url, {"description": "hello?"})
    assert r.status_code == 504
    assert r.json()["event"] == "error" and "did not answer" in r.json()["message"]


def start_streaming(url: str, body: tp.Any) -> tp.Tuple[requests.Response, tp.Iterator[tp.Dict[str, tp.Any]]]:
    """A request whose stream has begun (its `start` event read)."""
    response = generate(url, body)
    assert response.status_code == 200, response.text
    stream = events(response)
    assert next(stream)["event"] == "start"
    return response, stream


def stream_twice(stack: contextlib.ExitStack, url: str, body: tp.Dict[str, tp.Any]) -> tp.List[tp.Iterator]:
    """Two generations through nginx at once, each read past its `start`; closed when `stack` ends."""
    streams = []
    for _ in range(2):
        response, stream = start_streaming(url, body)
        stack.callback(response.close)
        streams.append(stream)
    return streams


def test_two_backends_two_generations_at_once_third_gets_503(idle_server, second_server, nginx):
    proxy = nginx([idle_server.port, second_server.port])
    with contextlib.ExitStack() as stack:
        # least_conn sends the second request to the idle backend (and would retry a busy one's 503).
        streams = stream_twice(stack, proxy.url, {"description": "two at once", "duration": 15})
        assert idle_server.health()["status"] == second_server.health()["status"] == "busy"

        third = generate(proxy.url, {"description": "one too many"})  # both 503: nginx passes it on, no 502
        assert third.status_code == 503, third.text
        assert third.json()["event"] == "error" and "Retry-After" in third.headers
        assert [[e["event"] for e in stream][-1] for stream in streams] == ["completed", "completed"]

    # The 503s took neither backend out of rotation (max_fails=0): both serve at once again. The clips are
    # long enough that neither ends before the second starts on a fast machine; closing them cancels both.
    idle_server.wait(timeout=10)
    second_server.wait(timeout=10)
    with contextlib.ExitStack() as stack:
        stream_twice(stack, proxy.url, {"description": "again", "duration": 30})
        assert idle_server.health()["status"] == second_server.health()["status"] == "busy"
    idle_server.wait(timeout=10)
    second_server.wait(timeout=10)


class Tricklers:
    """`count` clients that each announce a large body and send it a few bytes at a time, never finishing."""

    def __init__(self, port: int, count: int, length: int = 10 * 2**20):
        self.sockets: tp.List[socket.socket] = []
        self.stop = threading.Event()
        head = (f"POST /api/v1/generate_music HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(head + b'{"description": "')
            self.sockets.append(s)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(0.5):
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for s in self.sockets:
            s.close()


def test_slow_uploads_wait_in_nginx_not_in_gunicorns_threads(idle_server, nginx):
    """Bodies may be 16 MiB now, so slow uploads matter. Directly on gunicorn, 10 clients trickling a body
    hold all 8 request threads and /health stops answering; through the shipped site (request buffering
    on) 50 of them leave /health and a real generation served."""
    direct = Tricklers(idle_server.port, 10)
    try:
        time.sleep(1)
        with pytest.raises(requests.Timeout):
            requests.get(f"{idle_server.url}/health", timeout=3)
    finally:
        direct.close()
    idle_server.wait(timeout=30)  # the threads are free once those clients are gone

    proxy = nginx([idle_server.port])
    tricklers = Tricklers(proxy.port, 50)
    try:
        time.sleep(1)
        assert established_to(idle_server.port) == 0  # nginx holds the uploads; none reached gunicorn
        for _ in range(5):
            health = requests.get(f"{proxy.url}/health", timeout=3)
            assert health.status_code == 200 and health.json()["status"] == "ready"
        with generate(proxy.url, {"description": "while others upload", "duration": 2, "seed": 5}) as r:
            assert r.status_code == 200
            done = list(events(r))[-1]
        assert done["event"] == "completed" and wav_info(base64.b64decode(done["audio"]))[3] == 2
    finally:
        tricklers.close()
