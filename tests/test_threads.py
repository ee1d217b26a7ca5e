"""MUSICGEN_CPU_THREADS: torch's CPU threads, set on the one generation thread; by default every core while no other
process uses them and one thread while one does, from the real /proc readings and through the service."""

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from app import threads
from app.config import ConfigError, Settings
from app.generation import GenerationService
from app.model import MusicModel
from tests.test_generation import FakeModel, drain, params


class ThreadCountingModel(FakeModel):
    """Records how many torch threads the thread that runs it has, at the start and after each LM step."""

    def __init__(self, steps: int = 2):
        super().__init__(steps=steps)
        self.seen = []

    def generate(self, params, seed, on_step):
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))

        def counting(stage):
            on_step(stage)
            self.seen.append((stage, torch.get_num_threads()))

        return super().generate(params, seed, counting)


class Readings:
    """Stand-ins for the clock and the two /proc readings: `neighbours` is how many cores other processes use."""

    def __init__(self):
        self.now, self.busy, self.waited, self.neighbours = 100.0, 0.0, 0.0, 0.0

    def sleep(self, seconds):
        self.now += seconds
        self.busy += self.neighbours * seconds

    def policy(self, setting: int) -> threads.CpuThreads:
        return threads.CpuThreads(setting, clock=lambda: self.now, sleep=self.sleep, others_busy=lambda: self.busy,
                                  waited=lambda: self.waited)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)


@pytest.fixture(autouse=True)
def keep_this_threads_count():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def hogs():
    """A spinning process on every core this one may use (children inherit the affinity)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(threads.available_cores())]
    try:
        time.sleep(0.2)  # started
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_setting_defaults_to_sharing_every_core_and_a_count_is_fixed():
    assert Settings().cpu_threads == 0
    assert threads.resolve(0) == threads.available_cores() >= 1
    assert threads.resolve(3) == 3
    assert Settings.from_env({"MUSICGEN_CPU_THREADS": "1"}).cpu_threads == 1
    for bad in ("-1", "two"):
        with pytest.raises(ConfigError, match="MUSICGEN_CPU_THREADS"):
            Settings.from_env({"MUSICGEN_CPU_THREADS": bad})


@pytest.mark.parametrize("setting", [1, 3])
def test_a_count_is_set_on_the_generation_thread_not_the_callers(setting):
    before = torch.get_num_threads()
    loaded_with = []
    model = ThreadCountingModel()

    def load():
        loaded_with.append(torch.get_num_threads())
        return model

    service = GenerationService(load, cpu_threads=threads.CpuThreads(setting)).start()
    try:
        job = service.submit(params())
        assert drain(job)[-1]["event"] == "completed"
    finally:
        service.stop()
    assert loaded_with == [setting]
    assert model.seen == [("generation", setting), ("lm", setting), ("lm", setting), ("decode", setting)]
    assert torch.get_num_threads() == before  # the caller's own count is the caller's


def test_every_core_until_a_step_waits_for_one_then_one_thread_while_other_processes_use_them(two_cores):
    r = Readings()
    policy = r.policy(0)
    assert policy.shares and policy.apply() == 2 and torch.get_num_threads() == 2  # to load the model
    r.neighbours = 2.0  # not looked at: nothing made this process's threads wait yet
    assert policy.begin() == 2 and r.now == 100
    reads = []
    policy._waited = lambda: reads.append(r.now) or r.waited
    for _ in range(5):
        r.now, r.waited = r.now + 0.030, r.waited + 0.002  # 30 ms steps, 2 ms waiting: quiet
        policy.step()
    assert reads == []  # 0.15 s: inside the window the waits are not read
    assert torch.get_num_threads() == 2
    r.now, r.waited = r.now + 0.030, r.waited + 0.010  # one preemption: a third of a step, not of 0.25 s
    policy.step()
    assert torch.get_num_threads() == 2
    r.now, r.waited = r.now + 0.120, r.waited + 0.110  # spinning threads that a neighbour preempts
    policy.step()
    assert len(reads) == 1  # once the window is over
    assert policy.threads == torch.get_num_threads() == 1
    for _ in range(20):  # 0.6 s on one thread while the neighbour holds the cores (2 of them, less this thread's)
        r.now, r.busy, r.waited = r.now + 0.030, r.busy + 1.0 * 0.030, r.waited + 0.001
        policy.step()
    assert len(reads) == 1 and torch.get_num_threads() == 1  # on one thread the waits are not read
    # Later generations look first, for LOOK_SECONDS, while the cores were found shared.
    start = r.now
    assert policy.begin() == 1 and r.now == start + threads.LOOK_SECONDS
    r.neighbours = 0.6  # 30 % of the cores
    assert policy.begin() == 1
    r.neighbours = 0.1  # a twentieth of 2 cores: noise, not a neighbour
    assert policy.begin() == 2 and torch.get_num_threads() == 2
    start = r.now
    assert policy.begin() == 2 and r.now == start  # quiet: no look


def test_a_generation_dropped_to_one_thread_takes_every_core_back_once_the_others_leave(two_cores):
    """A moment's burst (a kernel thread, this host's agent) must not cost the rest of a 30 s generation."""
    r = Readings()
    policy = r.policy(0)
    policy.apply()
    assert policy.begin() == 2
    r.now, r.busy, r.waited = r.now + 0.3, r.busy + 0.3, r.waited + 0.2  # a burst: waits, and another's CPU time
    policy.step()
    assert torch.get_num_threads() == 1
    r.now, r.busy = r.now + 0.1, r.busy + 0.1  # the burst goes on, inside the window: not read yet
    policy.step()
    r.now, r.busy = r.now + 0.2, r.busy + 0.2  # over the window: the others used half a core, a quarter of two
    policy.step()
    assert torch.get_num_threads() == 1
    r.now, r.busy = r.now + 0.25, r.busy + 0.05  # a tenth of a core: free again
    policy.step()
    assert policy.threads == torch.get_num_threads() == 2
    r.now, r.waited = r.now + 0.1, r.waited + 0.0  # and the waits are judged afresh from there
    policy.step()
    assert torch.get_num_threads() == 2
    r.now, r.waited = r.now + 0.2, r.waited + 0.2
    policy.step()
    assert torch.get_num_threads() == 1
    r.neighbours = 1.0
    assert policy.begin() == 1  # the next generation looks first, as before: a neighbour on a core ...
    r.neighbours = 0.0
    assert policy.begin() == 2  # ... gone


def test_a_generation_on_a_gpu_runs_one_cpu_thread_without_looking(two_cores):
    r = Readings()
    r.neighbours = None  # any reading would fail
    policy = r.policy(0)
    assert policy.apply() == 2
    assert policy.begin(on_cpu=False) == 1 and r.now == 100
    policy.step()  # nothing to look at on one thread
    assert torch.get_num_threads() == 1


def test_a_count_and_a_single_core_never_look(two_cores):
    def unread():
        raise AssertionError("read /proc")

    for policy in (threads.CpuThreads(2, sleep=unread, others_busy=unread, waited=unread),
                   threads.CpuThreads(1, sleep=unread, others_busy=unread, waited=unread)):
        assert not policy.shares
        policy.apply()
        assert policy.begin() == policy.setting
        policy.step()
        assert torch.get_num_threads() == policy.setting


def test_without_readings_one_thread(two_cores):
    r = Readings()
    policy = threads.CpuThreads(0, clock=lambda: r.now, sleep=r.sleep, others_busy=lambda: None, waited=lambda: None)
    assert policy.apply() == 2  # loading
    assert policy.begin() == 2
    r.now += threads.WAIT_WINDOW_SECONDS
    policy.step()  # no reading of the waits: as if shared
    assert policy.threads == 1 and policy.begin() == 1


def test_the_service_follows_the_policy_step_by_step(two_cores):
    r = Readings()
    model = ThreadCountingModel(steps=4)

    def neighbour_arrives(stage):
        r.now += 0.13
        if len(model.seen) % 6 == 2:  # during each job's second step (6 entries a job)
            r.waited += 0.13
        if len(model.seen) % 6 >= 2:  # from then on to the job's end it holds both cores
            r.busy += 2 * 0.13

    service = GenerationService(lambda: model, cpu_threads=r.policy(0)).start()
    try:
        original = model.generate

        def generate(params, seed, on_step):
            return original(params, seed, lambda stage: (neighbour_arrives(stage), on_step(stage)))

        model.generate = generate
        for _ in range(2):
            assert drain(service.submit(params()))[-1]["event"] == "completed"
    finally:
        service.stop()
    # The first generation starts on both cores; its second step waited all its time for a core (half of the two
    # steps' 0.26 s), so the rest of it (steps 3-4 and the decoding) runs on one thread while the neighbour holds the
    # cores. The second looks first, finds them free (the neighbour left with the job) and starts on both again.
    one_job = [("generation", 2), ("lm", 2), ("lm", 1), ("lm", 1), ("lm", 1), ("decode", 1)]
    assert model.seen == one_job * 2


def test_a_real_model_looks_before_each_layer_so_a_collapsing_step_drops_to_one_thread_inside_it(two_cores):
    # Spinning threads that a neighbour preempts can make one step take a second (1.4 s for a debug-small step
    # measured among two hogs): the policy also looks between the LM's layers, which the model reports on a CPU.
    model = MusicModel.load("debug", "cpu", "debug")
    layers = model.musicgen.lm.transformer.layers
    r = Readings()
    policy = r.policy(0)
    policy.apply()
    assert policy.begin() == 2
    seen = []

    def on_step(stage):
        if stage == "layer":  # a neighbour arrived on both cores: each layer takes 0.2 s, all of it waiting for one
            r.now, r.waited, r.busy = r.now + 0.2, r.waited + 0.2, r.busy + 2 * 0.2
        policy.on_step(stage)
        seen.append((stage, torch.get_num_threads()))

    model.generate(params(), 0, on_step)
    first_step = seen[:seen.index(("lm", 1)) + 1]
    # 0.4 s into the first step (its second layer) the waits are read, before the step ends.
    assert first_step == [("layer", 2), ("layer", 1), ("lm", 1)] and len(layers) == 2
    assert seen.count(("layer", 1)) == len(layers) * seen.count(("lm", 1)) - 1  # every step, one thread
    assert not any(layer._forward_pre_hooks for layer in layers)  # only while it generates


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux /proc")
def test_real_readings_see_other_processes_and_waiting_for_a_core():
    cores = threads.available_cores()
    busy, t = threads.others_busy_seconds(), time.monotonic()
    with hogs():
        time.sleep(0.5)
        waited = threads.waited_seconds()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # this thread wants a core too
            pass
        waited = threads.waited_seconds() - waited
        others = threads.others_busy_seconds() - busy
    elapsed = time.monotonic() - t
    assert others > 0.5 * cores * (elapsed - 0.6)  # the hogs ran for about `elapsed` on every core
    assert waited > 0.02  # one more runnable thread than cores: each waits about a third of the time (2 cores)
    quiet_busy, t = threads.others_busy_seconds(), time.monotonic()
    time.sleep(0.5)
    assert threads.others_busy_seconds() - quiet_busy < 0.5 * cores * (time.monotonic() - t)


@pytest.mark.skipif(threads.available_cores() < 2 or not os.path.exists("/proc/self/task"), reason="2 cores, Linux")
def test_real_policy_drops_to_one_thread_among_hogs_and_takes_every_core_back():
    policy = threads.CpuThreads(0)
    policy.apply()
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def steps():
        for _ in range(20):
            deadline = time.monotonic() + 0.03
            while time.monotonic() < deadline:
                a @ b
            policy.step()

    assert policy.begin() == threads.available_cores()
    steps()
    assert policy.threads == threads.available_cores()  # nothing else runs
    with hogs():
        assert policy.begin() == threads.available_cores()  # not looked at: nothing waited yet
        steps()
        assert policy.threads == 1
        assert policy.begin() == 1  # the next generation looks: the neighbours are still there
    assert policy.begin() == threads.available_cores()


def test_server_logs_its_threads_before_torch_starts(idle_server):
    """The generation thread logs what it applied; OpenMP's wait policy is the environment's (spinning unless set),
    read once when the worker imports torch."""
    idle_server.wait()
    cores = threads.available_cores()
    count = f"{cores} while no other process uses them, else 1" if cores > 1 else "1"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    assert f"torch CPU threads {count} of {cores} cores (OMP_WAIT_POLICY={policy})" in idle_server.output()
