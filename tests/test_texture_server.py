"""Texture jobs through a real backend process over real ZeroMQ (fast test pipeline's run_texture).

The uploaded mesh is validated as strictly as meshes sent the other way; malformed uploads get a
clear error and the server stays up; positions come back bit for bit.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from protocol import new_job_id
from protocol.mesh import MeshPayload, encode_mesh
from tests.server_support import backend_client, fake_server
from tests.texture_meshes import cube_with_uvs, sphere

QUICK = {"test.steps": 3, "test.step_seconds": 0.005, "test.preview_every": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from fake_server(tmp_path_factory, "texture-server", ["--queue-limit", "16"])


client = pytest.fixture(backend_client)


def params(prompt="a blue cube", **overrides):
    return {"prompt": prompt, "preset": "cpu", "seed": 3, "overrides": {**QUICK, **overrides}}


def submit_raw(client, content, buffers, timeout=10.0):
    """Send a hand-made submit; return the error (or accepted) that answers it."""
    job_id = new_job_id()
    sent = client.send("submit", content, job_id=job_id, buffers=buffers)
    return client.next(lambda m: m.job_id == job_id and (
        m.msg_type == "accepted" or m.content.get("in_reply_to") == sent.msg_id), timeout)


def test_texture_job_keeps_positions_bit_for_bit_and_streams_textured_previews(server, client):
    mesh = cube_with_uvs("cells")
    job = client.submit(params(), mesh=mesh, base_color=[0.8, 0.1, 0.1], preview_credits=16)
    events = list(client.events(job, 30.0))
    assert events[-1].msg_type == "result_ready", [(m.msg_type, m.content) for m in events[-2:]]
    previews = [m.mesh() for m in events if m.msg_type == "preview_mesh"]
    assert len(previews) == 3
    for p in previews:
        assert p.texture_rgba is not None and p.uvs is not None
        assert p.positions.tobytes() == mesh.positions.tobytes()
    # the first preview starts from the base colour, the last one reached the prompt's colour
    assert tuple(previews[0].texture_rgba[0, 0, :3]) != tuple(previews[-1].texture_rgba[0, 0, :3])
    result = events[-1].mesh()
    assert result.positions.dtype == np.float32
    assert result.positions.tobytes() == mesh.positions.tobytes()
    assert result.faces.tobytes() == mesh.faces.tobytes()
    names = {f["name"] for f in events[-1].content["files"]}
    assert "textured.glb" in names
    status = client.status(job)
    assert status.content["state"] == "done"
    listed = {j["job_id"]: j for j in client.list_jobs()}
    assert listed[job]["kind"] == "texture"
    glb = client.fetch(job, "textured.glb")
    assert glb[:4] == b"glTF"


def test_resubmit_same_job_id_with_another_mesh_is_a_conflict(server, client):
    job = new_job_id()
    mesh = cube_with_uvs("cells")
    client.submit(params(), job, mesh=mesh)

    def resubmit(m):
        meta, buffers = encode_mesh(m)
        sent = client.send("submit", {"params": params(), "kind": "texture", "mesh": meta}, job_id=job,
                           buffers=buffers)
        return client.next(lambda r: r.job_id == job and (
            (r.msg_type == "accepted" and r.content.get("duplicate")) or r.content.get("in_reply_to") == sent.msg_id))

    assert resubmit(mesh).msg_type == "accepted"  # identical upload: idempotent
    moved = MeshPayload(positions=mesh.positions * 2, faces=mesh.faces, uvs=mesh.uvs)
    reply = resubmit(moved)
    assert reply.msg_type == "error" and reply.content["code"] == "job_id_conflict", reply.content
    list(client.events(job, 30.0))


def _content(mesh: MeshPayload, **extra):
    meta, buffers = encode_mesh(mesh)
    return {"params": params(), "kind": "texture", "mesh": meta, **extra}, list(buffers)


@pytest.mark.parametrize("case, code, words", [
    ("nan", "bad_mesh", "NaN"),
    ("index", "bad_mesh", "out of range"),
    ("shape_claim", "bad_buffer", "descriptor says float32[10000000, 3]"),
    ("no_mesh", "bad_content", "needs a mesh"),
    ("bad_kind", "bad_content", "must be one of generate, texture"),
    ("mesh_on_generate", "bad_content", "takes no mesh"),
    ("buffers_on_generate", "bad_buffer", "carries no buffers"),
    ("no_faces", "bad_mesh", "at least one triangle"),
    ("too_many_faces", "too_large", "MAX_FACES"),
    ("bad_color", "bad_content", "base_color"),
])
def test_malformed_uploads_get_a_clear_error_and_the_server_stays_up(server, client, case, code, words):
    mesh = cube_with_uvs("cells")
    content, buffers = _content(mesh)
    i_pos, i_faces = content["mesh"]["positions"]["buffer"], content["mesh"]["faces"]["buffer"]
    if case == "nan":
        bad = mesh.positions.copy()
        bad[3, 1] = np.nan
        buffers[i_pos] = bad
    elif case == "index":
        bad = mesh.faces.copy()
        bad[5, 2] = len(mesh.positions) + 7
        buffers[i_faces] = bad
    elif case == "shape_claim":
        content["mesh"]["positions"]["shape"] = [10_000_000, 3]  # 120 MB claimed, 96 bytes sent
        content["mesh"]["faces"] = dict(content["mesh"]["faces"])
    elif case == "no_mesh":
        del content["mesh"]
        buffers = []
    elif case == "mesh_on_generate":
        content["kind"] = "generate"
    elif case == "buffers_on_generate":
        content = {"params": params()}
    elif case == "bad_kind":
        content["kind"] = "paint"
    elif case == "no_faces":
        content["mesh"] = {"positions": content["mesh"]["positions"],
                           "faces": {"buffer": len(buffers), "dtype": "uint32", "shape": [0, 3]}}
        buffers.append(np.zeros((0, 3), np.uint32))
    elif case == "too_many_faces":
        content["mesh"]["faces"]["shape"] = [40_000_000, 3]
    elif case == "bad_color":
        content["base_color"] = [0.5, 2.0, 0.1]
    t0 = time.monotonic()
    reply = submit_raw(client, content, buffers)
    assert reply.msg_type == "error", reply.content
    assert reply.content["code"] == code, reply.content
    assert words in reply.content["message"], reply.content["message"]
    assert time.monotonic() - t0 < 5.0
    assert client.ping().content["stats"]["worker_ready"]  # still up, worker untouched


def test_a_200k_triangle_upload_is_within_the_limits(server, client):
    mesh = sphere(200_000, uvs=True)
    assert len(mesh.faces) >= 200_000
    t0 = time.perf_counter()
    job = client.submit(params(**{"test.steps": 1}), mesh=mesh, timeout=30.0)
    upload_s = time.perf_counter() - t0
    print(f"200k-triangle upload accepted in {upload_s:.3f} s")
    events = list(client.events(job, 60.0))
    assert events[-1].msg_type == "result_ready"
    assert events[-1].mesh().positions.tobytes() == mesh.positions.tobytes()


def _pieces(mesh, chunk=4096):
    import protocol.mesh as pm
    from protocol.mesh import texture_submit

    old = pm.INLINE_UPLOAD_BYTES
    pm.INLINE_UPLOAD_BYTES = 0  # force pieces even for a small mesh
    try:
        return texture_submit(params(), mesh, None, chunk_bytes=chunk)
    finally:
        pm.INLINE_UPLOAD_BYTES = old


def _send_upload(client, job_id, pieces):
    acks = []
    for content, chunk in pieces:
        sent = client.send("upload", content, job_id=job_id, buffers=chunk)
        acks.append(client.next(lambda m, sent=sent: m.job_id == job_id and (
            m.msg_type == "upload_ack" or m.content.get("in_reply_to") == sent.msg_id), 10.0))
    return acks


@pytest.mark.parametrize("case, code, words", [
    ("ok", None, None),
    ("out_of_order", "bad_upload", "no upload was sent"),  # the piece itself: "expected offset"
    ("bad_sha", "bad_upload", "SHA-256"),
    ("missing", "bad_upload", "no upload was sent"),
    ("short", "bad_upload", "the upload has"),
])
def test_uploads_in_pieces_are_checked(server, client, case, code, words):
    mesh = sphere(3000, uvs=True)
    pieces, content, _ = _pieces(mesh, chunk=32 * 1024)
    assert len(pieces) > 3
    job_id = new_job_id()
    if case == "out_of_order":
        pieces[1], pieces[2] = pieces[2], pieces[1]
    if case == "bad_sha":
        content["upload"]["sha256"] = "0" * 64
    if case == "missing":
        pieces = []
    if case == "short":
        pieces = pieces[:-1]
    acks = _send_upload(client, job_id, pieces)
    if case == "out_of_order":
        assert acks[1].msg_type == "error" and acks[1].content["code"] == "bad_upload", acks[1].content
        assert "expected" in acks[1].content["message"]
    elif pieces:
        assert all(a.msg_type == "upload_ack" for a in acks)
        assert acks[-1].content["received"] == (content["upload"]["total"] if case != "short" else
                                                acks[-1].content["received"])
    reply = submit_raw_with_id(client, job_id, content, [])
    if code is None:
        assert reply.msg_type == "accepted", reply.content
        events = list(client.events(job_id, 30.0))
        assert events[-1].msg_type == "result_ready"
        assert events[-1].mesh().positions.tobytes() == mesh.positions.tobytes()
    else:
        assert reply.msg_type == "error" and reply.content["code"] == code, reply.content
        assert words in reply.content["message"], reply.content["message"]
    assert client.ping().content["stats"]["worker_ready"]


def submit_raw_with_id(client, job_id, content, buffers, timeout=10.0):
    sent = client.send("submit", content, job_id=job_id, buffers=buffers)
    return client.next(lambda m: m.job_id == job_id and (
        m.msg_type == "accepted" or m.content.get("in_reply_to") == sent.msg_id), timeout)


def test_upload_store_checks_sizes_before_writing(tmp_path):
    from backend.server.uploads import UploadStore
    from protocol import ProtocolError
    from protocol.messages import MAX_UPLOAD_BYTES

    store = UploadStore(tmp_path / "uploads", max_open=1)
    with pytest.raises(ProtocolError) as err:
        store.add("s", "j", 0, MAX_UPLOAD_BYTES + 1, b"x")
    assert err.value.code == "too_large" and not (tmp_path / "uploads").exists()
    assert store.add("s", "j", 0, 3, b"ab") == 2
    with pytest.raises(ProtocolError) as err:
        store.add("s", "j", 2, 3, b"cd")  # more than announced
    assert err.value.code == "bad_upload" and "more than" in err.value.message
    assert not list((tmp_path / "uploads").glob("*.part"))  # a broken upload leaves nothing
    store.add("s", "j", 0, 3, b"abc")
    with pytest.raises(ProtocolError) as err:
        store.add("s", "k", 0, 3, b"abc")
    assert err.value.code == "too_many_uploads"
    import hashlib

    assert store.take("s", "j", 3, hashlib.sha256(b"abc").hexdigest()) == b"abc"
    store.add("s", "k", 0, 3, b"abc")
    store.expire(now=1e12)  # untouched for longer than the ttl
    assert not list((tmp_path / "uploads").glob("*.part"))
