"""Service benchmarks through a real gunicorn (tests.helpers.Server), beside bare in-process audiocraft."""

import contextlib
import statistics
import threading
import time
import typing as tp

import requests
import torch

from app import threads
from app.config import Settings
from app.model import MusicModel
from app.params import GenerationParams
from tests.helpers import Server, events, generate

SEED = 1234


def _percentile(values: tp.Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _load(name: str) -> MusicModel:
    """The model exactly as the server loads it with default settings."""
    return MusicModel.from_settings(Settings(model=name, device="cpu", mbd_model="debug"))


def _bare(model: MusicModel, duration: int, mbd: bool = False,
          policy: tp.Optional[threads.CpuThreads] = None) -> float:
    """Seconds for one generation in this process; with `policy`, its threads as the service's worker sets them."""
    params = GenerationParams(description="90s rock song", duration=duration, mbd=mbd, seed=SEED)
    t = time.perf_counter()
    if policy is not None:
        policy.begin()
    model.generate(params, SEED, policy.on_step if policy is not None else lambda stage: None)
    return time.perf_counter() - t


def _served(url: str, duration: int) -> float:
    t = time.perf_counter()
    with generate(url, {"description": "90s rock song", "duration": duration, "seed": SEED}) as response:
        last = list(events(response))[-1]
    assert last["event"] == "completed", last
    return time.perf_counter() - t


def debug_durations(durations: tp.List[int]) -> tp.Dict[str, tp.Any]:
    """Bare seconds of compute per second of audio for the debug model, with and without MBD, 1 -> 60 s."""
    stock = MusicModel.load("debug", "cpu", "debug")
    stock.ensure_mbd()
    out: tp.Dict[str, tp.Dict[int, float]] = {"EnCodec": {}, "MBD": {}}
    for duration in durations:
        out["EnCodec"][duration] = round(_bare(stock, duration) / duration, 4)
        out["MBD"][duration] = round(_bare(stock, duration, mbd=True) / duration, 4)
    return out


def end_to_end(durations: tp.Dict[str, tp.List[int]], repeats: int) -> tp.Dict[str, tp.Any]:
    """End-to-end time (POST to `completed`, through gunicorn + SSE) / bare MusicModel.generate with the same
    model, settings and parameters (torch threads included), alternated request by request; median of the paired
    ratios."""
    out: tp.Dict[str, tp.Any] = {}
    before = torch.get_num_threads()
    policy = threads.CpuThreads(Settings().cpu_threads)
    policy.apply()
    for name, lengths in durations.items():
        bare_model = _load(name)
        with Server(env={"MUSICGEN_MODEL": name, "MUSICGEN_MBD_MODEL": "debug"}) as server:
            server.wait(timeout=600)
            for duration in lengths:
                _served(server.url, 1), _bare(bare_model, 1, policy=policy)  # warm both
                served, bare = [], []
                for _ in range(repeats):
                    served.append(_served(server.url, duration))
                    bare.append(_bare(bare_model, duration, policy=policy))
                ratios = [s / b for s, b in zip(served, bare, strict=True)]
                out[f"{name} {duration} s"] = {"bare_s": round(statistics.median(bare), 3),
                                               "served_s": round(statistics.median(served), 3),
                                               "overhead_s": round(statistics.median(
                                                   [s - b for s, b in zip(served, bare, strict=True)]), 3),
                                               "ratio": round(statistics.median(ratios), 3),
                                               "ratio_max": round(max(ratios), 3)}
        del bare_model
    torch.set_num_threads(before)
    return out


def _hold(url: str) -> requests.Response:
    """Start a long generation (60 s with MBD) that holds the slot; its events are drained in the background."""
    holder = generate(url, {"description": "x", "duration": 60, "mbd": True})
    stream = events(holder)
    first = next(stream)
    assert first["event"] == "start", first
    threading.Thread(target=_drain, args=(stream,), daemon=True).start()
    return holder


def _drain(stream: tp.Iterator[tp.Dict[str, tp.Any]]) -> None:
    """Read a held stream to its end; closing it from the main thread ends the read with an error, by design."""
    with contextlib.suppress(Exception):
        for _ in stream:
            pass


def _busy(server: Server, tries: int) -> tp.Dict[str, float]:
    times: tp.List[float] = []
    holder, restarts = _hold(server.url), 0
    while len(times) < tries:
        t = time.perf_counter()
        response = requests.post(f"{server.url}/api/v1/generate_music", json={"description": "x", "duration": 1},
                                 stream=True, timeout=10)
        elapsed = time.perf_counter() - t
        response.close()
        if response.status_code == 200:  # the holder ended (or failed): hold the slot again, don't count this try
            holder.close()
            _wait_idle(server)
            holder, restarts = _hold(server.url), restarts + 1
            continue
        assert response.status_code == 503, response.status_code
        times.append(elapsed)
    holder.close()
    _wait_idle(server)
    return {"n": tries, "p50_ms": round(1000 * statistics.median(times), 2), "holder_restarts": restarts,
            "p99_ms": round(1000 * _percentile(times, 0.99), 2), "max_ms": round(1000 * max(times), 2)}


def _wait_idle(server: Server) -> float:
    t = time.perf_counter()
    while server.health()["status"] != "ready":
        time.sleep(0.005)
    return time.perf_counter() - t


def service_latencies(busy_tries: int, start_tries: int, disconnects: int, rss_requests: int) -> tp.Dict[str, tp.Any]:
    """503 latency while busy, time to the `start` event, disconnect -> slot free, RSS over sequential requests."""
    out: tp.Dict[str, tp.Any] = {}
    with Server() as server:
        server.wait()
        url = server.url
        out["busy_503"] = _busy(server, busy_tries)

        starts = []
        for _ in range(start_tries):
            t = time.perf_counter()
            with generate(url, {"description": "x", "duration": 1}) as response:
                stream = events(response)
                assert next(stream)["event"] == "start"
                starts.append(time.perf_counter() - t)
                list(stream)
            _wait_idle(server)
        out["time_to_start"] = {"n": start_tries, "p50_ms": round(1000 * statistics.median(starts), 2),
                                "p99_ms": round(1000 * _percentile(starts, 0.99), 2)}

        freed = []
        for _ in range(disconnects):
            response = generate(url, {"description": "x", "duration": 60})
            stream = events(response)
            while next(stream)["event"] != "progress":
                pass
            t = time.perf_counter()
            response.close()
            _wait_idle(server)
            freed.append(time.perf_counter() - t)
        keepalive = Settings().keepalive_seconds
        out["disconnect_to_free"] = {"n": disconnects, "median_s": round(statistics.median(freed), 3),
                                     "max_s": round(max(freed), 3), "keepalive_s": keepalive}

        pid = server.worker_pid()
        rss = []
        for _ in range(rss_requests):
            _served(url, 2)
            rss.append(_rss_mib(pid))
        base = rss[min(4, len(rss) - 1)]  # after warm-up (allocator pools, first-use imports)
        out["rss_mib"] = {"n": rss_requests, "first": rss[0], "after_5": base, "last": rss[-1], "max": max(rss),
                          "drift_after_warmup": round((rss[-1] - base) / base, 4), "series": rss,
                          "cuda": torch.cuda.is_available()}
    return out


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")
