"""Fast checks of the worker-pool pieces: GPU pinning of local workers, the result-file writer of
the Ray transport, and the serve options. (The end-to-end farm tests are in test_farm.py.)"""

from __future__ import annotations

import hashlib
import os

import pytest

from backend.cli import main as cli_main
from backend.server.pool import PinnedWorkerHandle, PoolSpec, local_gpus, make_workers
from backend.server.ray_worker import _FileWriter

FAKE = "tests.fake_pipeline:run_job"


def test_local_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 3")
    assert local_gpus() == ["0", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert local_gpus() == []


def test_workers_are_pinned_round_robin(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    handles = make_workers(PoolSpec(FAKE, workers=3))
    assert [h.gpu for h in handles] == ["2", "5", "2"]
    assert [h.name for h in handles] == ["local-0", "local-1", "local-2"]
    # one worker on a multi-GPU machine sees every GPU, as before --workers existed
    assert [h.gpu for h in make_workers(PoolSpec(FAKE))] == [""]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [h.gpu for h in make_workers(PoolSpec(FAKE, workers=2))] == ["", ""]  # CPU: share the cores
    with pytest.raises(ValueError, match="at least 1"):
        make_workers(PoolSpec(FAKE, workers=0))


def test_pinned_worker_process_sees_only_its_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7")
    handle = PinnedWorkerHandle(FAKE, gpu="7")
    handle.start()
    try:
        handle.wait_ready(60)
        env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{handle.pid}/environ", "rb").read().split(b"\0") if
                   b"=" in kv)
        assert env[b"CUDA_VISIBLE_DEVICES"] == b"7"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,7"  # the server's own environment is unchanged
    finally:
        handle.stop(2.0)


def chunks(data: bytes, size: int):
    digest = hashlib.sha256(data).hexdigest()
    for off in range(0, max(1, len(data)), size):
        part = data[off:off + size]
        yield {"name": "model.glb", "size": len(data), "sha256": digest, "offset": off,
               "eof": off + len(part) >= len(data)}, part


def test_file_writer_checks_sha256(tmp_path):
    data = os.urandom(10_000)
    w = _FileWriter(tmp_path / "good")
    for header, part in chunks(data, 4096):
        w.write(header, part)
    assert w.check() == ""
    assert (tmp_path / "good" / "model.glb").read_bytes() == data
    assert not list((tmp_path / "good").glob("*.tmp"))

    bad = _FileWriter(tmp_path / "bad")
    for i, (header, part) in enumerate(chunks(data, 4096)):
        bad.write(header, part if i != 1 else b"\0" * len(part))  # one damaged chunk
    problem = bad.check()
    assert "model.glb" in problem and "SHA-256" in problem
    assert not (tmp_path / "bad" / "model.glb").exists() and not list((tmp_path / "bad").glob("*"))

    short = _FileWriter(tmp_path / "short")
    header, part = next(chunks(data, 4096))
    short.write(header, part)  # the stream ended before eof
    assert "ended early" in short.check()
    assert not list((tmp_path / "short").glob("*"))

    evil = _FileWriter(tmp_path / "evil")
    evil.write({"name": "../escape.glb", "size": 1, "sha256": "0" * 64, "offset": 0, "eof": True}, b"x")
    assert "refused" in evil.check() and not (tmp_path / "escape.glb").exists()


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be between 1 and 256"),
    (["--cancel-timeout", "0"], "--cancel-timeout must be more than 0"),
])
def test_serve_rejects_bad_pool_options(tmp_path, capsys, args, message):
    code = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--connection-file", str(tmp_path / "c.json"),
                     *args])
    assert code == 2
    assert message in capsys.readouterr().err
