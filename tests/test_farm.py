"""Several workers behind one server: ``serve --workers 2`` (local processes) and ``serve --ray``
(Ray actors on a real local Ray cluster), over real ZeroMQ, with the fast test pipeline.

The Ray tests start one Ray head (``ray start --head --block``, 2 CPUs, under ``nice``) for the
module and point servers at it with ``--ray 127.0.0.1:PORT``: the same path as a studio farm
(``ray start --head`` + ``serve --ray auto``). Ray's start-up takes 10-20 s on a loaded 2-core
machine, so they are marked slow. They are skipped, with the reason, only where Ray is not
installed (the dev extra installs it, so CI runs them).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from pathlib import Path

import pytest

from backend.server.client import BackendClient, BackendError
from backend.server.launcher import RayHead, ServerProcess
from tests.server_support import FAKE, wait_for

QUICK = {"test.steps": 4, "test.step_seconds": 0.01, "test.preview_every": 1, "test.no_obj": False}
LONG = {"test.steps": 100000, "test.step_seconds": 0.01}


def p(overrides, prompt="farm test"):
    return {"prompt": prompt, "preset": "draft", "seed": 3, "overrides": overrides}


def workers(client) -> list[dict]:
    return client.ping().content["stats"]["workers"]


def both_running(client, a: str, b: str) -> bool:
    return all(client.status(j).content["state"] == "running" for j in (a, b))


def check_result(client, data_dir: Path, job_id: str, result) -> None:
    on_disk = (data_dir / job_id / "result" / result.content["name"]).read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == result.content["sha256"]
    assert client.fetch(job_id) == on_disk


# ---------------------------------------------------------------------------------- local workers
@pytest.mark.slow
def test_two_local_workers_run_two_jobs_at_once(tmp_path):
    srv = ServerProcess(tmp_path / "data", tmp_path / "conn.json", pipeline=FAKE,
                        args=["--workers", "2", "--cancel-timeout", "1.0"]).start()
    try:
        c = BackendClient(srv.info)
        pool = workers(c)
        assert len(pool) == 2 and len({w["pid"] for w in pool}) == 2 and all(w["ready"] for w in pool)
        a = c.submit(p({"test.steps": 150, "test.step_seconds": 0.01}, "a"))
        b = c.submit(p({"test.steps": 150, "test.step_seconds": 0.01}, "b"))
        queued = c.submit(p(QUICK, "third"))
        wait_for(lambda: both_running(c, a, b), 20, "both jobs running")
        st = c.status(queued).content
        # two running jobs, two workers: it starts when one of them ends
        assert st["state"] == "queued" and st["queue_position"] == 1
        fourth = c.submit(p(QUICK, "fourth"))
        assert c.status(fourth).content["queue_position"] == 2
        runners = {c.status(j).content["worker"]["pid"] for j in (a, b)}
        assert runners == {w["pid"] for w in pool}  # one job on each worker
        for j in (a, b, queued, fourth):
            check_result(c, srv.data_dir, j, c.wait_result(j, 60))
        # cancel a running job on one worker while the other worker runs a job
        long_job = c.submit(p(LONG, "long"))
        other = c.submit(p({"test.steps": 60, "test.step_seconds": 0.01}, "other"))
        wait_for(lambda: both_running(c, long_job, other), 20, "both jobs running")
        c.cancel(long_job)
        assert c.wait_result(other, 60).msg_type == "result_ready"
        wait_for(lambda: c.status(long_job).content["state"] == "cancelled", 10, "cancelled")
        c.close()
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------------------------- Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head node with 2 CPUs under nice (its own temp folder), stopped with all its processes."""
    pytest.importorskip("ray", reason='Ray is not installed (pip install "conjure[farm]")')
    head = RayHead(num_cpus=2).start()
    try:
        yield head.address
    finally:
        head.stop()


def ray_server(tmp_path: Path, address: str, data_dir: Path | None = None) -> ServerProcess:
    return ServerProcess(data_dir or tmp_path / "data", tmp_path / "conn.json", pipeline=FAKE,
                         args=["--ray", address, "--workers", "2", "--cancel-timeout", "1.0"],
                         env={"RAY_USAGE_STATS_ENABLED": "0"}).start(timeout=120)


@pytest.mark.slow
def test_ray_farm_two_at_once_cancel_actor_kill_and_server_restart(ray_head, tmp_path):
    """One server on a 2-actor Ray pool through the issue's scenarios, in order (Ray start-up is slow)."""
    srv = ray_server(tmp_path, ray_head)
    try:
        c = BackendClient(srv.info)
        pool = wait_for(lambda: (w := workers(c)) and all(x["ready"] for x in w) and w, 60, "two ready actors")
        assert len(pool) == 2 and all(w["kind"] == "ray" for w in pool)
        assert len({w["pid"] for w in pool}) == 2 and srv.pid not in {w["pid"] for w in pool}

        # two jobs at the same time, each on its own actor; results land in the server's job store
        a = c.submit(p({**QUICK, "test.steps": 80}, "a"))
        b = c.submit(p({**QUICK, "test.steps": 80}, "b"))
        wait_for(lambda: both_running(c, a, b), 30, "both jobs running on Ray")
        placed = [c.status(j).content["worker"] for j in (a, b)]
        assert {w["pid"] for w in placed} == {w["pid"] for w in pool}
        assert all(w["host"] for w in placed)
        for j in (a, b):
            result = c.wait_result(j, 60)
            check_result(c, srv.data_dir, j, result)
            assert {f["kind"] for f in result.content["files"]} >= {"glb", "obj", "mtl", "png"}
            assert (srv.data_dir / j / "result_mesh.npz").exists()  # attach after a restart replays it
            assert (srv.data_dir / j / "preview.npz").exists()  # written by the server from the stream
            assert c.status(j).content["worker"]["kind"] == "ray"

        # cooperative cancel
        job = c.submit(p(LONG, "cancel me"))
        c.next(lambda m: m.job_id == job and m.msg_type == "progress", 30)
        c.cancel(job)
        nxt = c.submit(p(QUICK, "after cancel"))
        assert c.wait_result(nxt, 60).msg_type == "result_ready"
        assert c.status(job).content["state"] == "cancelled"
        restarts = c.ping().content["stats"]["worker_restarts"]
        # a job that ignores cancel: its actor is killed after --cancel-timeout and replaced
        hung = c.submit(p({**LONG, "test.hang": True}, "hangs"))
        c.next(lambda m: m.job_id == hung and m.msg_type == "progress", 30)
        c.cancel(hung)
        wait_for(lambda: c.ping().content["stats"]["worker_restarts"] == restarts + 1, 20, "actor replaced")
        assert c.status(hung).content["state"] == "cancelled"

        # kill -9 of one actor's process mid-job: that job fails retriable, the other finishes
        pool = wait_for(lambda: (w := workers(c)) and all(x["ready"] for x in w) and w, 60, "two ready actors")
        victim = c.submit(p(LONG, "victim"))
        survivor = c.submit(p({**QUICK, "test.steps": 150}, "survivor"))
        wait_for(lambda: both_running(c, victim, survivor), 30, "both jobs running")
        pid = c.status(victim).content["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BackendError) as err:
            c.wait_result(victim, 30)
        assert err.value.code == "worker_crashed" and err.value.retriable
        check_result(c, srv.data_dir, survivor, c.wait_result(survivor, 60))
        pool2 = wait_for(lambda: (w := workers(c)) and len(w) == 2 and all(x["ready"] for x in w) and w,
                         60, "the pool back to two actors")
        assert pid not in {w["pid"] for w in pool2}
        again = c.submit(p(QUICK, "retry"))
        assert c.wait_result(again, 60).msg_type == "result_ready"

        # kill -9 of the server while a job runs on Ray, then a restart on the same data directory
        running = c.submit(p(LONG, "running on Ray"))
        c.next(lambda m: m.job_id == running and m.msg_type == "progress", 30)
        actor_pid = c.status(running).content["worker"]["pid"]
        c.close()
    finally:
        srv.kill9()
    # the actors belonged to the dead server: Ray ends them (fate-sharing with their owner)
    wait_for(lambda: not _alive(actor_pid), 30, "the old actor to exit")
    srv2 = ray_server(tmp_path, ray_head, srv.data_dir)
    try:
        c2 = BackendClient(srv2.info)
        st = c2.status(running).content
        assert st["job_state"] == "interrupted" and st["error"]["code"] == "interrupted"
        assert c2.status(survivor).content["state"] == "done"  # finished work survives the restart
        new = c2.submit(p(QUICK, "after restart"))
        check_result(c2, srv.data_dir, new, c2.wait_result(new, 60))
        assert c2.status(new).content["worker"]["kind"] == "ray"
        c2.close()
    finally:
        assert srv2.stop() == 0, srv2.log()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_ray_missing_or_unreachable_is_a_clear_start_error(tmp_path):
    """--ray with no cluster at the address: the server refuses to start and says why."""
    pytest.importorskip("ray", reason='Ray is not installed (pip install "conjure[farm]")')
    port = _free_port()
    srv = ServerProcess(tmp_path / "data", tmp_path / "conn.json", pipeline=FAKE,
                        args=["--ray", f"127.0.0.1:{port}"], env={"RAY_USAGE_STATS_ENABLED": "0"})
    with pytest.raises(RuntimeError) as err:
        srv.start(timeout=120)
    assert "Ray cluster" in str(err.value)
