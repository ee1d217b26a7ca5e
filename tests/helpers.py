"""Shared test tools: a real gunicorn server started by `scripts/serve`, and an SSE reader."""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing as tp
import wave
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def skip_without_kernels(fallback: str) -> None:
    """Skip, saying what runs instead (`fallback`), where this service's C++ kernels cannot be built: a CPU without
    AVX512-VNNI, or no C++ compiler. Anywhere else a test that needs them must find them built."""
    import pytest

    from app import kernel_build

    if not kernel_build.supported():
        pytest.skip(f"this CPU has no AVX512-VNNI: {fallback}")
    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip(f"no C++ compiler: {fallback}")


def built_kernels(fallback: str, load: tp.Callable[[], tp.Any]) -> tp.Any:
    """This service's C++ kernels as `load` gives them; skipped, saying what runs instead (`fallback`), where they
    cannot be built (`skip_without_kernels`). Anywhere else they must load."""
    skip_without_kernels(fallback)
    module = load()
    assert module is not None, "the kernels did not build or load on a CPU and machine that can have them (see the log)"
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`scripts/serve` (gunicorn, one gthread worker) on a free loopback port, with the debug model by default."""

    def __init__(self, env: tp.Optional[tp.Mapping[str, str]] = None, port: tp.Optional[int] = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_fd, self.log_path = tempfile.mkstemp(prefix="musicgen-server-", suffix=".log")
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "MUSICGEN_MODEL": "debug",
                    "MUSICGEN_DEVICE": "cpu", "GUNICORN_ACCESS_LOG": "-", **(env or {})}
        self.process = subprocess.Popen([str(ROOT / "scripts" / "serve")], cwd=ROOT, env=full_env,
                                        stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(log_fd)

    def health(self) -> tp.Dict[str, tp.Any]:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def wait(self, status: tp.Collection[str] = ("ready",), timeout: float = 180) -> tp.Dict[str, tp.Any]:
        """Wait until /health reports one of `status`."""
        deadline = time.monotonic() + timeout
        last: tp.Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(requests.RequestException):
                last = self.health()
                if last["status"] in status:
                    return last
            time.sleep(0.1)
        raise TimeoutError(f"server not {status} after {timeout} s (last: {last}):\n{self.output()}")

    def output(self) -> str:
        """Everything the server has logged so far."""
        return Path(self.log_path).read_text(errors="replace")

    def worker_pid(self) -> int:
        """The gunicorn worker's pid (the master is `self.process`)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return int(out.split()[0])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def generate(url: str, body: tp.Any, timeout: float = 600, **kwargs: tp.Any) -> requests.Response:
    """POST to the generation endpoint; `body` is JSON-encoded unless it is bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{url}/api/v1/generate_music", data=data, stream=True, timeout=timeout,
                         headers={"Content-Type": "application/json"}, **kwargs)


def messages(response: requests.Response) -> tp.Iterator[str]:
    """Raw SSE messages (without the blank line that ends each), comments included."""
    lines: tp.List[str] = []
    for line in response.iter_lines(decode_unicode=True, chunk_size=None):
        if line:
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []


def events(response: requests.Response) -> tp.Iterator[tp.Dict[str, tp.Any]]:
    """The `data:` events of a stream, parsed, each asserted to be a single line."""
    for message in messages(response):
        if message.startswith(":"):
            assert all(line.startswith(":") for line in message.split("\n")), message
            continue
        assert message.startswith("data: ") and "\n" not in message, message[:200]
        yield json.loads(message[len("data: "):])


def wav_info(data: bytes) -> tp.Tuple[int, int, int, float]:
    """(sample rate, sample width in bytes, channels, duration in seconds) of a WAV file."""
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes() / w.getframerate()
