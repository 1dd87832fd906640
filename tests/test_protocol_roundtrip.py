"""Property tests: every message type and every mesh shape survives serialize -> deserialize."""

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.mesh.topology import edge_topology
from protocol import (
    JOB_STATES,
    MSG_TYPES,
    MeshPayload,
    Session,
    decode_mesh,
    encode_mesh,
    validate_params,
)
from protocol.mesh import MESH_FIELDS
from protocol.messages import _SCHEMAS

KEY = b"k" * 32
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ident = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20)
nonneg = st.integers(0, 2**40)
frac = st.floats(0.0, 1.0, allow_nan=False)
pos_float = st.floats(0.0, 1e9, allow_nan=False, allow_infinity=False)
state = st.sampled_from(JOB_STATES)
job_ids = st.uuids(version=4).map(str)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
version = st.sampled_from(["1.0", "1.3", "1.12"])


def opt(**kw):
    """A fixed_dictionaries with every key optional."""
    return st.fixed_dictionaries({}, optional=kw)


prompt_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=60
).filter(lambda s: s.strip())
params = st.fixed_dictionaries(
    {"prompt": prompt_text.map(str.strip)},
    optional={
        "negative_prompt": st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30).map(str.strip),
        "seed": st.none() | st.integers(0, 2**32 - 1),
        "preset": st.sampled_from(["draft", "standard", "high", "cpu", "my-preset_2"]),
        "overrides": st.dictionaries(
            st.sampled_from(["coarse.steps", "fine.lr", "guidance.cfg_scale", "mesh.decimate", "seed"]),
            st.integers(-1000, 1000) | st.floats(-1e6, 1e6, allow_nan=False) | st.booleans() | ident,
            max_size=5,
        ),
    },
)


def mesh_strategy():
    @st.composite
    def build(draw):
        n = draw(st.integers(1, 40))
        f = draw(st.integers(0, 60))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        positions = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        faces = rng.integers(0, n, (f, 3)).astype(np.uint32)
        kw = {}
        if draw(st.booleans()):
            kw["uvs"] = rng.random((3 * f, 2), dtype=np.float32)
        if draw(st.booleans()):
            kw["normals"] = rng.normal(size=(n, 3)).astype(np.float32)
        if draw(st.booleans()):
            kw["colors"] = rng.integers(0, 256, (n, 4)).astype(np.uint8)
        if draw(st.booleans()):
            kw["edges"], kw["corner_edges"] = edge_topology(faces, n)
        tex = draw(st.sampled_from(["none", "png", "rgba"]))
        if tex == "png":
            w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
            ihdr = b"\x00\x00\x00\x0dIHDR" + w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x06\x00\x00\x00"
            kw["texture_png"] = b"\x89PNG\r\n\x1a\n" + ihdr + draw(st.binary(max_size=64))
        elif tex == "rgba":
            kw["texture_rgba"] = rng.integers(0, 256, (draw(st.integers(1, 8)), draw(st.integers(1, 8)), 4)).astype(
                np.uint8
            )
        return MeshPayload(positions=positions, faces=faces, **kw)

    return build()


meshes = mesh_strategy()

#: msg_type -> strategy of (content, job_id?, seq?, buffers)
CONTENT = {
    "hello": st.fixed_dictionaries({"protocol_version": version}, optional={
        "client_name": text, "client_version": text, "capabilities": st.lists(ident, max_size=4)}),
    "hello_reply": st.fixed_dictionaries(
        {"protocol_version": version, "limits": st.dictionaries(ident, nonneg, max_size=5)},
        optional={"server_version": text, "presets": st.lists(ident, max_size=5), "device": text,
                  "capabilities": st.lists(ident, max_size=4)}),
    "submit": st.fixed_dictionaries({"params": params}),
    "accepted": st.fixed_dictionaries({"queue_position": nonneg}, optional={"state": state, "duplicate": st.booleans()}),
    "progress": st.fixed_dictionaries(
        {"stage": ident, "step": nonneg, "total": nonneg, "fraction": frac, "elapsed": pos_float},
        optional={"eta": st.none() | pos_float, "message": text}),
    "preview_mesh": st.fixed_dictionaries({"stage": ident, "step": nonneg}),
    "result_ready": st.fixed_dictionaries(
        {"name": ident, "size": nonneg, "sha256": hex64,
         "files": st.lists(st.fixed_dictionaries({"name": ident, "size": nonneg}, optional={"sha256": hex64}),
                           max_size=4)},
        optional={"warnings": st.lists(text, max_size=3), "resolved_preset": ident, "model": text, "device": text,
                  "seed": nonneg, "duration_s": pos_float}),
    "fetch_result": st.fixed_dictionaries({"offset": nonneg, "length": st.integers(1, 16 * 2**20)},
                                          optional={"name": ident}),
    "result_chunk": st.fixed_dictionaries({"name": ident, "offset": nonneg, "size": nonneg, "eof": st.booleans()}),
    "upload": st.fixed_dictionaries({"offset": st.integers(0, 2**29), "total": st.integers(1, 2**29)}),
    "upload_ack": st.fixed_dictionaries({"received": st.integers(0, 2**29), "total": st.integers(0, 2**29)}),
    "cancel": opt(reason=text),
    "cancelled": opt(message=text),
    "error": st.fixed_dictionaries(
        {"code": st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z"), "message": text, "retriable": st.booleans()},
        optional={"field": st.none() | ident, "in_reply_to": st.none() | ident}),
    "status": st.just({}),
    "status_reply": st.fixed_dictionaries({"state": state}, optional={
        "queue_position": st.none() | nonneg, "stage": st.none() | ident, "fraction": st.none() | frac,
        "last_seq": st.none() | nonneg, "params": st.none() | params, "result": st.none() | st.just({"a": 1}),
        "error": st.none() | st.just({"code": "x"}), "created": pos_float, "updated": pos_float}),
    "list_jobs": opt(limit=st.integers(1, 1000), states=st.lists(state, max_size=3)),
    "jobs": st.fixed_dictionaries({"jobs": st.lists(
        st.fixed_dictionaries({"job_id": job_ids, "state": state}, optional={"prompt": text}), max_size=5)}),
    "attach": st.fixed_dictionaries({"from_seq": nonneg}),
    "delete_job": st.just({}),
    "job_deleted": st.just({}),
    "list_models": st.just({}),
    "pull_model": st.fixed_dictionaries({"model_id": ident}),
    "models": st.fixed_dictionaries({}, optional={
        "device": text, "model": ident,
        "models": st.lists(st.fixed_dictionaries({"id": ident, "name": text, "present": st.booleans()}), max_size=3),
        "vocabulary": st.lists(ident, max_size=4),
        "pulls": st.lists(st.fixed_dictionaries(
            {"id": ident, "state": st.sampled_from(["running", "done", "failed"]), "done": nonneg, "total": nonneg},
            optional={"unit": st.sampled_from(["B", "it"]), "message": text}), max_size=2)}),
    "ping": opt(token=ident),
    "pong": opt(token=ident, server_time=pos_float),
}


def test_every_message_type_has_a_strategy():
    assert set(CONTENT) == set(MSG_TYPES)


@st.composite
def messages(draw, msg_type):
    content = dict(draw(CONTENT[msg_type]))
    _, needs_job, rule = _SCHEMAS[msg_type]
    job_id = draw(job_ids) if needs_job else draw(st.none() | job_ids)
    seq = draw(st.none() | nonneg)
    buffers = []
    mesh = None
    if msg_type == "preview_mesh" or (msg_type == "result_ready" and draw(st.booleans())):
        mesh = draw(meshes)
        extra = draw(st.lists(st.binary(max_size=30), max_size=2))
        meta, bufs = encode_mesh(mesh, base_index=len(extra))
        content["mesh"] = meta
        buffers = [*extra, *bufs]
    elif msg_type in ("result_chunk", "upload"):
        buffers = [draw(st.binary(max_size=200))]
    return msg_type, content, job_id, seq, buffers, mesh


def _equal_buffers(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert bytes(b) == bytes(a)


@pytest.mark.parametrize("msg_type", sorted(MSG_TYPES))
def test_message_roundtrip(msg_type):
    _roundtrip_property(msg_type)


def _roundtrip_property(msg_type):
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages(msg_type), st.booleans(), ident, ident)
    def check(m, server_to_client, client_sid, server_sid):
        _roundtrip_one(m, server_to_client, client_sid, server_sid)

    check()


def _roundtrip_one(m, server_to_client, client_sid, server_sid):
    msg_type, content, job_id, seq, buffers, mesh = m
    client = Session(KEY, client_sid)
    server = Session(KEY, server_sid, routing=True)
    if server_to_client:
        sender, receiver, rid = server, client, b"\x00peer"
        msg = sender.msg(msg_type, content, buffers, job_id=job_id, seq=seq, routing_id=rid, session=client_sid)
    else:
        sender, receiver, rid = client, server, None
        msg = sender.msg(msg_type, content, buffers, job_id=job_id, seq=seq, server_session=server_sid)
    frames = sender.serialize(msg)
    if server_to_client:
        assert frames[0] == rid
        frames = frames[1:]  # a ROUTER socket consumes the routing id
    else:
        frames = [b"\x00peer", *frames]  # what a ROUTER socket prepends
    got = receiver.deserialize(frames)
    assert got.msg_type == msg_type
    assert got.content == content
    assert got.job_id == job_id and got.seq == seq
    assert got.msg_id == msg.msg_id and got.time == msg.time and got.version == "1.0"
    assert got.session == client_sid and got.server_session == server_sid
    assert got.routing_id == (None if server_to_client else b"\x00peer")
    assert len(got.buffers) == len(buffers)
    for a, b in zip(buffers, got.buffers):
        _equal_buffers(a, b)
    if mesh is not None:
        back = got.mesh()
        for name in (f for f in MESH_FIELDS if f != "texture_png"):
            want = getattr(mesh, name)
            if want is None:
                assert getattr(back, name) is None
            else:
                np.testing.assert_array_equal(getattr(back, name), want)
        assert back.texture_png == mesh.texture_png


@SETTINGS
@given(meshes)
def test_mesh_roundtrip_from_raw_bytes(mesh):
    """decode_mesh also accepts plain bytes buffers (e.g. read from disk) and checks them."""
    meta, bufs = encode_mesh(mesh)
    raw = [b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bufs]
    back = decode_mesh(meta, raw)
    np.testing.assert_array_equal(back.positions, mesh.positions)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    assert back.positions.dtype == np.float32 and back.faces.dtype == np.uint32


@SETTINGS
@given(st.lists(st.sampled_from(BUF_DTYPES := ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                                               "int64", "float16", "float32", "float64"]), max_size=5),
       st.integers(0, 2**31))
def test_typed_buffers_roundtrip(dtypes, seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for dt in dtypes:
        shape = tuple(rng.integers(0, 5, size=rng.integers(1, 4)))
        arrays.append((rng.random(shape) * 100).astype(dt))
    big_endian = [a.astype(a.dtype.newbyteorder(">")) for a in arrays]  # converted to little-endian on send
    s = Session(KEY)
    got = s.deserialize(s.serialize(s.msg("preview_mesh", {"stage": "x", "step": 0, "mesh": {}}, big_endian,
                                          job_id="12345678-1234-4234-8234-123456789abc")))
    for a, b in zip(arrays, got.buffers):
        assert b.dtype.name == a.dtype.name and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
        assert not b.flags.writeable


@SETTINGS
@given(params)
def test_params_roundtrip(p):
    got = validate_params(p)
    assert validate_params(got.to_dict()) == got
    assert got.prompt == p["prompt"]
