import importlib.util

import pytest
import torch

from app import half_attention, int8_kernel
from tests.helpers import ROOT, Server


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need an NVIDIA GPU: elsewhere they skip, saying so (scripts/gpu_check runs them)."""
    if torch.cuda.is_available():
        return
    reason = (f"needs an NVIDIA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) sees none; "
              "scripts/gpu_check runs these on a GPU box")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Build the service's C++ kernels (one extension: app/kernel_build.py; where this CPU and machine can) before
    any test starts a server: a first build takes ~40 s, which a server's start-up would otherwise pay; they all
    load it from torch's cache. On a GPU box (scripts/gpu_check) the servers decode on CUDA and never
    load them: nothing is built there unless a CPU test asks for it."""
    if not torch.cuda.is_available():
        int8_kernel.load()
        half_attention.load()


def _started(env=None):
    with Server(env) as s:
        s.wait()
        yield s


def _idle(server):
    """The shared server, checked to be idle before and after the test."""
    server.wait(timeout=10)
    yield server
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def server():
    """One real server with the debug model, shared by the tests that leave it idle when they end."""
    yield from _started()


@pytest.fixture
def idle_server(server):
    """The shared server, checked to be idle before and after the test."""
    yield from _idle(server)


@pytest.fixture(scope="session")
def _stereo_server():
    yield from _started({"MUSICGEN_MODEL": "debug-stereo"})


@pytest.fixture
def stereo_server(_stereo_server):
    """One shared server with the stereo debug model, idle before and after the test."""
    yield from _idle(_stereo_server)


@pytest.fixture(scope="session")
def _melody_server():
    yield from _started({"MUSICGEN_MODEL": "debug-melody"})


@pytest.fixture
def melody_server(_melody_server):
    """One shared server with the melody debug model, idle before and after the test."""
    yield from _idle(_melody_server)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """The miniature Hugging Face cache (tests/hub_cache.py), built once per session: the environment serving
    from it (HF_HOME, TORCH_HOME, offline)."""
    from tests import hub_cache

    return hub_cache.build(tmp_path_factory.mktemp("hub-cache"))


@pytest.fixture(scope="session")
def fetch_weights():
    """scripts/fetch_weights.py as a module."""
    spec = importlib.util.spec_from_file_location("fetch_weights", ROOT / "scripts" / "fetch_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
