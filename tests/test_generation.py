"""The slot, the worker thread, cancellation and progress, with a hand-written fake model.

The fake isolates the lock/queue/cancel logic; tests/test_model.py and tests/test_server.py run the
same paths on real audiocraft.
"""

import threading
import time

import pytest
import torch

from app.generation import Busy, GenerationService, ModelUnavailable, Progress
from app.params import AudioClip, GenerationParams, UnsupportedRequest


class FakeModel:
    name, device, sample_rate, channels, melody, streams = "fake", "cpu", 32000, 1, False, False

    def __init__(self, steps: int = 50, step_seconds: float = 0.0, fail_at: int = -1):
        self.steps, self.step_seconds, self.fail_at = steps, step_seconds, fail_at
        self.completed_steps = 0
        self.release = threading.Event()  # set to let a generation finish when steps are gated
        self.release.set()

    def ensure_mbd(self):
        return None

    def check(self, params):
        if params.melody is not None and not self.melody:
            raise UnsupportedRequest("melody: the loaded model (fake) does not take a melody")
        if params.stream_audio and not self.streams:
            raise UnsupportedRequest("stream_audio: the loaded model (fake) cannot stream its audio")

    def lm_steps(self, duration, prompt=None):
        return self.steps

    def diffusion_steps(self):
        return 10

    def generate(self, params, seed, on_step):
        self.completed_steps = 0
        for i in range(self.steps):
            if i == self.fail_at:
                raise RuntimeError("boom")
            time.sleep(self.step_seconds)
            self.release.wait()
            on_step("lm")
            self.completed_steps += 1
        on_step("decode")
        if params.mbd:
            for _ in range(10):
                on_step("diffusion")
        return torch.zeros(1, params.duration * self.sample_rate)


def params(**overrides):
    return GenerationParams(**{"description": "test", "duration": 1, **overrides})


def drain(job, timeout=10.0):
    """All events of a job up to and including its terminal one."""
    received = []
    while True:
        event = job.events.get(timeout=timeout)
        received.append(event)
        if event["event"] in ("completed", "error"):
            return received


@pytest.fixture
def make_service():
    services = []

    def make(model=None, load=None):
        service = GenerationService(load or (lambda: model or FakeModel()))
        services.append(service.start())
        return service

    yield make
    for service in services:
        service.stop()


def test_a_job_streams_start_progress_and_one_terminal_event(make_service):
    service = make_service()
    received = drain(service.submit(params(seed=3)))
    assert received[0] == {"event": "start", "model": "fake", "sample_rate": 32000, "channels": 1,
                           "duration": 1, "seed": 3, "mbd": False}
    assert {e["event"] for e in received[1:-1]} == {"progress"}
    assert received[-1]["event"] == "completed" and received[-1]["audio"]
    assert [e["event"] for e in received].count("completed") == 1


def test_second_submit_while_busy_is_refused_at_once(make_service):
    model = FakeModel()
    model.release.clear()
    service = make_service(model)
    job = service.submit(params())
    started = time.monotonic()
    with pytest.raises(Busy) as refused:
        service.submit(params())
    assert time.monotonic() - started < 0.05
    assert "another generation is running" in str(refused.value)  # tests/test_api.py: 503 with Retry-After
    model.release.set()
    drain(job)


def test_next_request_right_after_terminal_event_is_accepted(make_service):
    service = make_service()
    job = service.submit(params())
    for _ in range(20):
        drain(job)
        job = service.submit(params())  # raises Busy if the slot were freed after the terminal event
    drain(job)


def test_a_failure_becomes_an_error_event_and_the_slot_is_freed(make_service):
    service = make_service(FakeModel(fail_at=5))
    received = drain(service.submit(params()))
    assert received[-1] == {"event": "error", "message": "generation failed: RuntimeError"}
    assert service.state == "ready"
    service.model.fail_at = -1
    assert drain(service.submit(params()))[-1]["event"] == "completed"


def test_cancel_stops_within_one_step_and_frees_the_slot(make_service):
    model = FakeModel(steps=1000, step_seconds=0.005)
    service = make_service(model)
    job = service.submit(params())
    while job.events.get(timeout=5)["event"] != "progress":
        pass
    job.cancel()
    received = drain(job)
    assert received[-1]["event"] == "error" and "cancelled" in received[-1]["message"]
    steps_at_cancel = model.completed_steps
    time.sleep(0.05)
    assert model.completed_steps == steps_at_cancel < 1000
    drain(service.submit(params()))


def test_a_client_that_leaves_while_its_job_waits_for_a_load_frees_the_slot_at_once(make_service):
    loaded = threading.Event()
    model = FakeModel()

    def slow_load():
        loaded.wait(5)
        return model

    service = make_service(load=slow_load)
    job = service.submit(params())  # queued behind the model load
    job.cancel()
    assert service.state == "loading"  # not busy: the slot is free while the load goes on
    after = service.submit(params())
    loaded.set()
    assert drain(after)[-1]["event"] == "completed"
    assert job.events.empty()  # the abandoned job never ran and never told anyone
    assert model.completed_steps == model.steps  # (from `after` only)


def test_jobs_wait_for_the_model_then_run(make_service):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(5)
        return FakeModel()

    service = make_service(load=slow_load)
    assert service.state == "loading"
    job = service.submit(params())
    assert job.events.empty()
    loaded.set()
    assert drain(job)[-1]["event"] == "completed"


def test_what_the_loaded_model_cannot_do_is_refused_before_the_slot_is_taken(make_service):
    service = make_service()
    service.submit(params())  # waits for the load; once loaded, the model is known
    melody = AudioClip(torch.zeros(1, 32000), 32000)
    deadline = time.monotonic() + 5
    while service.model is None and time.monotonic() < deadline:
        time.sleep(0.01)
    while service.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(UnsupportedRequest, match="^melody: "):
        service.submit(params(melody=melody))
    assert service.state == "ready"  # the slot was never taken
    assert drain(service.submit(params()))[-1]["event"] == "completed"


def test_while_the_model_loads_the_same_check_ends_the_stream_instead(make_service):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(5)
        return FakeModel()

    service = make_service(load=slow_load)
    job = service.submit(params(melody=AudioClip(torch.zeros(1, 32000), 32000)))  # nothing to ask yet
    loaded.set()
    assert drain(job) == [{"event": "error", "message": "melody: the loaded model (fake) does not take a melody"}]
    assert drain(service.submit(params()))[-1]["event"] == "completed"  # and the slot is free


def test_a_model_that_fails_to_load_answers_every_request_with_its_reason(make_service):
    def broken():
        raise RuntimeError("no weights for 'x': set MUSICGEN_MODEL")

    service = make_service(load=broken)
    deadline = time.monotonic() + 5
    while service.state != "failed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.state == "failed"
    with pytest.raises(ModelUnavailable, match="set MUSICGEN_MODEL"):
        service.submit(params())


def test_every_job_runs_on_the_same_long_lived_thread(make_service):
    threads = set()

    class Recording(FakeModel):
        def generate(self, params, seed, on_step):
            threads.add(threading.get_ident())
            return super().generate(params, seed, on_step)

    service = make_service(Recording())
    for _ in range(3):
        drain(service.submit(params()))
    assert len(threads) == 1 and threading.get_ident() not in threads


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_is_monotone_per_whole_percent_and_ends_at_100():
    clock = Clock()
    progress = Progress({"lm": 1000, "decode": 1}, {"lm": 0.97, "decode": 0.03}, clock)
    sent = []
    for _ in range(1000):
        clock.now += 0.1  # slow steps: every whole percent goes out
        if (p := progress.step("lm")) is not None:
            sent.append(p)
    sent.append(progress.step("decode"))
    assert sent == sorted(sent) and sent[-1] == 100.0
    assert {int(p) for p in sent} >= set(range(1, 98))


def test_progress_is_thinned_to_about_20_a_second():
    clock = Clock()
    progress = Progress({"lm": 1000, "decode": 1}, {"lm": 0.97, "decode": 0.03}, clock)
    sent = []
    for _ in range(1000):
        clock.now += 0.001  # one second in all
        if (p := progress.step("lm")) is not None:
            sent.append(p)
    assert 10 <= len(sent) <= 21


def test_progress_spans_stages_and_never_passes_100():
    clock = Clock()
    progress = Progress({"lm": 10, "decode": 1, "diffusion": 4}, {"lm": 0.7, "decode": 0.02, "diffusion": 0.28},
                        clock)
    values = []
    for stage, count in (("lm", 12), ("decode", 1), ("diffusion", 5)):  # extra steps must not overflow
        for _ in range(count):
            clock.now += 1
            if (p := progress.step(stage)) is not None:
                values.append(p)
    assert values == sorted(values) and values[-1] == 100.0 and max(values) <= 100
    assert 70 <= values[9] <= 72
