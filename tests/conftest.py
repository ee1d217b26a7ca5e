import pytest
import torch

from tests.helpers import Server


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need an NVIDIA GPU: elsewhere they skip, saying so (scripts/gpu_check runs them)."""
    if torch.cuda.is_available():
        return
    reason = (f"needs an NVIDIA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) sees none; "
              "scripts/gpu_check runs these on a GPU box")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def server():
    """One real server with the debug model, shared by the tests that leave it idle when they end."""
    with Server() as s:
        s.wait()
        yield s


@pytest.fixture
def idle_server(server):
    """The shared server, checked to be idle before and after the test."""
    server.wait(timeout=10)
    yield server
    server.wait(timeout=10)
