"""MUSICGEN_CPU_THREADS: torch's CPU threads, set on the one generation thread, and OpenMP's passive waiting."""

import threading

import pytest
import torch

from app import threads
from app.config import ConfigError, Settings
from app.generation import GenerationService
from tests.test_generation import FakeModel, drain, params


class ThreadCountingModel(FakeModel):
    """Records how many torch threads the thread that loads and runs it has."""

    def __init__(self):
        super().__init__(steps=2)
        self.seen = []

    def generate(self, params, seed, on_step):
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        return super().generate(params, seed, on_step)


def test_setting_defaults_to_one_thread_and_0_means_every_core_this_process_may_use():
    assert Settings().cpu_threads == 1
    assert threads.resolve(0) == threads.available_cores() >= 1
    assert threads.resolve(3) == 3
    assert Settings.from_env({"MUSICGEN_CPU_THREADS": "1"}).cpu_threads == 1
    for bad in ("-1", "two"):
        with pytest.raises(ConfigError, match="MUSICGEN_CPU_THREADS"):
            Settings.from_env({"MUSICGEN_CPU_THREADS": bad})


@pytest.mark.parametrize("setting", [1, 0])
def test_threads_are_set_on_the_generation_thread_not_the_callers(setting):
    before = torch.get_num_threads()
    loaded_with = []
    model = ThreadCountingModel()

    def load():
        loaded_with.append(torch.get_num_threads())
        return model

    service = GenerationService(load, cpu_threads=setting).start()
    try:
        job = service.submit(params())
        assert drain(job)[-1]["event"] == "completed"
    finally:
        service.stop()
    expected = threads.resolve(setting)
    assert loaded_with == [expected]
    assert model.seen == [("generation", expected)]
    assert torch.get_num_threads() == before  # the caller's own count is the caller's


def test_server_sets_threads_and_passive_waiting_before_torch_starts(idle_server):
    """scripts/gunicorn.conf.py sets OMP_WAIT_POLICY in the master, so the worker has it when it imports torch;
    the generation thread logs what it applied."""
    idle_server.wait()
    assert (f"torch CPU threads 1 of {threads.available_cores()} cores "
            "(OMP_WAIT_POLICY=PASSIVE)") in idle_server.output()
