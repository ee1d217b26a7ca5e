"""Robustness against a real gunicorn with the debug model: concurrency, repetition, hostile bodies."""

import json
import threading
import typing as tp

import hypothesis.strategies as st
import requests
from hypothesis import HealthCheck, example, given, settings

from tests.helpers import events, generate


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def test_eight_concurrent_requests_one_generates_seven_get_503(idle_server):
    barrier = threading.Barrier(8)
    results: tp.List[tp.Tuple[int, str]] = []

    def one() -> None:
        barrier.wait()
        with generate(idle_server.url, {"description": "crowded", "duration": 30}, timeout=300) as r:
            last = [e["event"] for e in events(r)][-1] if r.status_code == 200 else r.json()["message"]
            results.append((r.status_code, last))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [503] * 7, results
    assert (200, "completed") in results
    assert all("another generation is running" in last for status, last in results if status == 503)


def test_fifty_sequential_generations(idle_server):
    pid = idle_server.worker_pid()
    start = rss_mib(pid)
    for i in range(50):
        with generate(idle_server.url, {"description": f"number {i}", "duration": 1, "seed": i}) as r:
            assert r.status_code == 200
            assert [e["event"] for e in events(r)][-1] == "completed"
    end = rss_mib(pid)
    assert idle_server.worker_pid() == pid  # the same worker served them all
    print(f"\nworker RSS: {start:.0f} MiB before 50 generations, {end:.0f} MiB after ({end - start:+.0f} MiB)")


FIELDS = ("description", "duration", "mbd", "top_k", "top_p", "temperature", "cfg_coef", "seed")
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=50) | st.sampled_from(["", " ", "\x00", "piano", "1", "30", "1e400", "NaN"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
plausible = (st.integers(-1, 70) | st.floats(-1, 40) | st.booleans() | st.text(max_size=30) | json_values)
requests_like = st.fixed_dictionaries({}, optional={f: plausible for f in FIELDS})
bodies = (st.binary(max_size=3000)
          | json_values.map(lambda v: json.dumps(v).encode())
          | requests_like.map(lambda v: json.dumps(v).encode())
          | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), plausible, max_size=10)
          .map(lambda v: json.dumps(v).encode()))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
@example(body=b"{" * (16 * 2**20 + 1))  # over the body limit
@example(body=b'{"description": "x", "duration": 1e999}')
@example(body='{"description": "\ud800"}'.encode("utf-8", "surrogatepass"))
def test_fuzzed_bodies_never_get_a_5xx(idle_server, body):
    r = generate(idle_server.url, body, timeout=60)
    try:
        assert r.status_code in (200, 400, 413), (r.status_code, r.text[:300], body[:200])
        if r.status_code != 200:
            answer = r.json()
            assert answer["event"] == "error" and answer["message"]
    finally:
        r.close()  # a valid body started a generation: leaving cancels it
    if r.status_code == 200:
        idle_server.wait(timeout=30)


def test_server_still_serves_after_the_fuzz(idle_server):
    assert idle_server.health()["status"] == "ready"
    with generate(idle_server.url, {"description": "still here", "duration": 1}) as r:
        assert [e["event"] for e in events(r)][-1] == "completed"
    assert requests.get(f"{idle_server.url}/health", timeout=5).status_code == 200
