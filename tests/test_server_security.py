"""Start-up refusals and CurveZMQ: who may bind where, who may connect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import zmq

from backend.server.client import BackendClient, BackendTimeout
from backend.server.launcher import REPO_ROOT, ServerProcess
from backend.server.security import make_keys
from tests.server_support import FAKE, wait_for


def serve(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "backend", "serve", "--pipeline", FAKE, *map(str, args)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_non_loopback_bind_without_curve_is_refused(tmp_path):
    r = serve("--bind", "0.0.0.0", "--data-dir", tmp_path / "d", "--connection-file", tmp_path / "c.json")
    assert r.returncode == 2
    assert "refusing to bind to 0.0.0.0" in r.stderr and "--curve-keys" in r.stderr
    assert not (tmp_path / "c.json").exists()


def test_curve_with_empty_allow_list_is_refused(tmp_path):
    make_keys(tmp_path / "keys", [])
    r = serve("--bind", "0.0.0.0", "--curve-keys", tmp_path / "keys", "--data-dir", tmp_path / "d",
              "--connection-file", tmp_path / "c.json")
    assert r.returncode == 2 and "allow-list" in r.stderr and "is empty" in r.stderr


def test_clear_start_up_errors(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        r = serve("--port", port, "--data-dir", tmp_path / "d", "--connection-file", tmp_path / "c.json")
    finally:
        blocker.close()
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr

    (tmp_path / "file").write_text("not a folder")
    r = serve("--data-dir", tmp_path / "file" / "jobs", "--connection-file", tmp_path / "c.json")
    assert r.returncode == 2 and "cannot create data directory" in r.stderr

    r = serve("--preset", "nonexistent", "--data-dir", tmp_path / "d", "--connection-file", tmp_path / "c.json")
    assert r.returncode == 2 and "unknown preset 'nonexistent'" in r.stderr

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run([sys.executable, "-m", "backend", "serve", "--pipeline", "no_such_module:run",
                        "--data-dir", str(tmp_path / "d"), "--connection-file", str(tmp_path / "c.json")],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no_such_module" in r.stderr


def test_real_pipeline_preset_demanding_gpu_is_refused_clearly(tmp_path):
    """The product's default pipeline: a preset that forces gsplat fails at start-up, not mid-job."""
    pytest.importorskip("backend.pipeline.presets")
    from backend.pipeline.presets import get_preset
    from backend.server.preflight import PreflightError, check_gpu

    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    preset = get_preset("high", {"coarse.renderer": "gsplat"})
    if has_cuda:
        check_gpu(preset)  # no error where the GPU pieces exist
        return
    with pytest.raises(PreflightError) as e:
        check_gpu(preset)
    assert "coarse.renderer='gsplat'" in str(e.value)
    check_gpu(get_preset("cpu"))  # 'auto' renderers run anywhere


@pytest.mark.slow
def test_curve_allow_list(tmp_path):
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    keys = tmp_path / "keys"
    make_keys(keys, ["alice", "mallory"])
    (keys / "clients" / "mallory.key").unlink()  # mallory has a key pair but is not allowed
    # a non-loopback bind (all interfaces) is accepted once CURVE is configured
    srv = ServerProcess(tmp_path / "data", tmp_path / "conn.json", pipeline=FAKE,
                        args=["--bind", "0.0.0.0", "--advertise-ip", "127.0.0.1",
                              "--curve-keys", str(keys)]).start()
    try:
        assert srv.info.server_public_key and srv.info.ip == "127.0.0.1"
        # printed after the connection file is written, so start() can return before it
        wait_for(lambda: "CURVE on, 1 allowed client key(s)" in srv.log(), 15, "the CURVE start-up line")
        with BackendClient(srv.info, client_cert=keys / "alice.key_secret") as alice:
            assert alice.ping(timeout=10).server_session
        with BackendClient(srv.info, client_cert=keys / "mallory.key_secret") as mallory:
            with pytest.raises(BackendTimeout):
                mallory.ping(timeout=1.5)
        with BackendClient(srv.info) as stranger:  # a fresh key pair
            with pytest.raises(BackendTimeout):
                stranger.ping(timeout=1.0)
        info = srv.info
        info.server_public_key = None
        with BackendClient(info) as plain:  # no CURVE at all (knows the HMAC key, still refused)
            with pytest.raises(BackendTimeout):
                plain.ping(timeout=1.0)
    finally:
        assert srv.stop() == 0, srv.log()
