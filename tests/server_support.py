"""Fixture bodies shared by the server test modules: a real ``python -m backend serve`` running the
fake pipeline, and a blocking client to it. A module binds them to its own scope and arguments::

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        yield from fake_server(tmp_path_factory, "server", ["--queue-limit", "64"])

    client = pytest.fixture(backend_client)
"""

from __future__ import annotations

import time

from backend.server.client import BackendClient
from backend.server.launcher import ServerProcess

FAKE = "tests.fake_pipeline:run_job"


def fake_server(tmp_path_factory, name: str, args: list[str]):
    """Start a server on the fake pipeline in a fresh temp folder; after the tests it must stop cleanly."""
    d = tmp_path_factory.mktemp(name)
    srv = ServerProcess(d / "data", d / "conn.json", pipeline=FAKE, args=list(args)).start()
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()


def backend_client(server):
    """A ``BackendClient`` connected to ``server``, closed afterwards."""
    c = BackendClient(server.info)
    yield c
    c.close()


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` every 50 ms until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
