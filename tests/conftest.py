import pytest

from tests.helpers import Server


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
