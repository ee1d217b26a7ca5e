import importlib.util

import pytest

from tests.helpers import ROOT, Server


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
