"""Fuzzing the decoder: whatever arrives, only ProtocolError comes out, and cheaply."""

import json
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import MeshPayload, ProtocolError, ReplayGuard, Session, decode_mesh, encode_mesh
from protocol.messages import _SCHEMAS, MAX_BUFFERS, MAX_CONTENT_BYTES, MAX_HEADER_BYTES, PROTOCOL_TAG
from protocol.signing import Signer

KEY = b"fuzz-key-0123456789abcdef"
JOB = "12345678-1234-4234-8234-123456789abc"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _header(**kw):
    h = {"msg_id": "m1", "msg_type": "ping", "session": "c", "server_session": None, "job_id": None,
         "seq": None, "time": time.time(), "version": "1.0", "buffers": []}
    h.update(kw)
    return h


def forge(header, content=b"{}", buffers=(), key=KEY, tag=PROTOCOL_TAG):
    """Frames correctly signed with ``key`` around arbitrary header/content/buffer bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    c = content if isinstance(content, bytes) else json.dumps(content).encode()
    signed = [h, c, *buffers]
    return [tag, Signer(key).sign(signed), *signed]


def expect(frames, code=None, session=None):
    session = session or Session(KEY)
    with pytest.raises(ProtocolError) as e:
        session.deserialize(frames)
    if code is not None:
        assert e.value.code == code, e.value
    return e.value


def _valid_frames(session=None, with_mesh=True):
    s = session or Session(KEY)
    if with_mesh:
        mesh = MeshPayload(positions=np.zeros((4, 3), np.float32), faces=np.array([[0, 1, 2], [1, 2, 3]], np.uint32))
        meta, bufs = encode_mesh(mesh)
        msg = s.msg("preview_mesh", {"stage": "coarse", "step": 1, "mesh": meta}, bufs, job_id=JOB, seq=1)
    else:
        msg = s.msg("ping", {"token": "t"})
    return [bytes(f) for f in s.serialize(msg)]


# ---- random input ---------------------------------------------------------------------

frame_lists = st.lists(st.binary(max_size=200), max_size=MAX_BUFFERS + 8)


@FUZZ
@given(frame_lists, st.booleans())
def test_random_frames_raise_only_protocol_error(frames, routing):
    expect(frames, session=Session(KEY, routing=routing))


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=300), st.lists(st.binary(max_size=50), max_size=4))
def test_random_bytes_behind_a_valid_tag(header, content, buffers):
    sig = Signer(KEY).sign([header, content, *buffers])
    for sig_frame in (sig, b"", b"0" * 64, sig[:-1] + (b"0" if sig[-1:] != b"0" else b"1")):
        frames = [PROTOCOL_TAG, sig_frame, header, content, *buffers]
        err = expect(frames)
        if sig_frame is not sig:
            assert err.code == "bad_signature"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
header_keys = st.sampled_from(["msg_id", "msg_type", "session", "server_session", "job_id", "seq", "time",
                               "version", "buffers"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(header_keys, json_values), json_values, st.lists(st.binary(max_size=40), max_size=3))
def test_signed_garbage_json_raises_only_protocol_error(header_patch, content, buffers):
    """Correctly signed (an insider or a bug) but nonsensical header/content."""
    header = _header(**header_patch)
    try:
        session = Session(KEY)
        session.deserialize(forge(header, content, buffers))
    except ProtocolError:
        pass


CONTENT_KEYS = sorted({k for fields, _, _ in _SCHEMAS.values() for k in fields} | {"x"})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_SCHEMAS)), st.dictionaries(st.sampled_from(CONTENT_KEYS), json_values, max_size=6),
       st.none() | st.just(JOB) | json_values, st.lists(st.binary(max_size=40), max_size=2))
def test_signed_content_with_known_field_names_raises_only_protocol_error(msg_type, content, job_id, buffers):
    descs = [{"dtype": "bytes", "shape": [len(b)], "nbytes": len(b)} for b in buffers]
    try:
        Session(KEY).deserialize(forge(_header(msg_type=msg_type, job_id=job_id, buffers=descs), content, buffers))
    except ProtocolError:
        pass


_FIXED_FRAMES = _valid_frames()  # one message (fixed lengths keep hypothesis' draws reproducible)


@FUZZ
@given(st.data())
def test_mutated_valid_messages(data):
    frames = list(_FIXED_FRAMES)
    op = data.draw(st.sampled_from(["flip", "truncate", "drop", "add", "swap", "extend"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    if op == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i] = frames[i][:j] + bytes([frames[i][j] ^ data.draw(st.integers(1, 255))]) + frames[i][j + 1:]
    elif op == "truncate":
        frames[i] = frames[i][: data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    elif op == "drop":
        del frames[i]
    elif op == "add":
        frames.insert(i, data.draw(st.binary(max_size=30)))
    elif op == "swap":
        j = data.draw(st.integers(0, len(frames) - 1))
        if frames[i] == frames[j]:
            return
        frames[i], frames[j] = frames[j], frames[i]
    elif op == "extend":
        frames[i] = frames[i] + data.draw(st.binary(min_size=1, max_size=30))
    else:
        return
    expect(frames)


def test_non_bytes_frames():
    expect([1, 2, 3, 4], "bad_frame_count")
    expect([None] * 5, "bad_frame_count")
    expect(object(), "bad_frame_count")
    expect("CONJURE/1", "bad_frame_count")


# ---- specific attacks -----------------------------------------------------------------

def test_frame_counts():
    frames = _valid_frames(with_mesh=False)
    expect(frames[:3], "bad_frame_count")
    expect([], "bad_frame_count")
    expect(frames + [b""] * (MAX_BUFFERS + 1), "bad_frame_count")
    expect(frames, "bad_frame_count", Session(KEY, routing=True))  # routing id missing: 4 frames
    expect(frames + [b"x"], "bad_signature")  # the frame count is signed
    expect(forge(_header(), b"{}", [b"x"]), "bad_buffer")  # signed, but the header describes no buffer


def test_tag_and_version():
    frames = _valid_frames(with_mesh=False)
    expect([b"ZMTP/9", *frames[1:]], "bad_tag")
    expect([b"CONJURE/2", *frames[1:]], "version_mismatch")
    expect(forge(_header(version="2.0")), "version_mismatch")
    expect(forge(_header(version="one")), "bad_header")


def test_unsigned_forged_and_wrong_key():
    frames = _valid_frames()
    expect([frames[0], b"", *frames[2:]], "bad_signature")
    expect([frames[0], b"f" * 64, *frames[2:]], "bad_signature")
    expect([frames[0], frames[1].upper(), *frames[2:]], "bad_signature")
    expect(forge(_header(), key=b"another key"), "bad_signature")
    # altering one byte of a buffer breaks the signature too
    tampered = list(frames)
    tampered[-1] = bytes([tampered[-1][0] ^ 1]) + tampered[-1][1:]
    expect(tampered, "bad_signature")


def test_frame_boundaries_are_signed():
    """Moving bytes from one frame to the next changes the signature."""
    a = Signer(KEY).sign([b"ab", b"c"])
    b = Signer(KEY).sign([b"a", b"bc"])
    assert a != b


def test_replayed_and_expired():
    s = Session(KEY)
    frames = _valid_frames(with_mesh=False)
    s.deserialize(frames)
    expect(frames, "replayed", s)
    expect(forge(_header(time=time.time() - 3600)), "expired")
    expect(forge(_header(time=time.time() + 3600)), "expired")
    expect(forge(_header(time=float("nan")) | {}), None)  # NaN does not even encode as strict JSON
    expect(forge(_header(time="now")), "bad_header")
    expect(forge(_header(time=10**400)), "bad_header")  # an integer beyond float range
    expect(forge(_header(msg_type="progress", job_id=JOB),
                 {"stage": "s", "step": 0, "total": 1, "fraction": 0.5, "elapsed": 10**400}), "bad_content")


def test_replay_guard_memory_is_bounded_and_evicted_signatures_stay_rejected():
    guard = ReplayGuard(window_s=100, max_entries=10)
    now = 1000.0
    for i in range(25):
        guard.accept(b"sig%d" % i, now + i * 0.01, now=now + 1)
        assert len(guard) <= 10
    with pytest.raises(ProtocolError) as e:  # sig0 was evicted, but its time is below the floor
        guard.accept(b"sig0", now, now=now + 1)
    assert e.value.code == "replayed"
    guard.accept(b"fresh", now + 0.5, now=now + 1)  # newer than everything evicted: fine
    # entries older than the window are dropped without raising the floor
    guard2 = ReplayGuard(window_s=1, max_entries=10)
    guard2.accept(b"a", 0.0, now=0.0)
    guard2.accept(b"b", 5.0, now=5.0)
    assert len(guard2) == 1


def test_bad_json_variants():
    for raw in (b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"a": NaN}', b"1" * 5000, b'{"msg_id": Infinity}'):
        err = expect(forge(raw))
        assert err.code in ("bad_json", "bad_header"), err
    expect(forge(_header(), b"[1, 2]"), "bad_content")
    expect(forge(_header(), b'{"token": 5}'), "bad_content")
    expect(forge(_header(msg_type="teleport")), "unknown_msg_type")
    expect(forge(_header(session=123)), "bad_header")
    expect(forge(_header(job_id="../../etc/passwd")), "bad_header")
    expect(forge(_header(seq=-1)), "bad_header")
    expect(forge(_header(msg_type="status")), "bad_header")  # status needs a job_id


@pytest.mark.parametrize("depth", [17, 1000, 200_000])
def test_deeply_nested_json_is_rejected_cheaply(depth):
    nested = b"[" * depth + b"]" * depth
    t0 = time.perf_counter()
    expect(forge(_header(), b'{"token": ' + nested + b"}"), "bad_json")
    assert expect(forge(b'{"a":' + b"{" * depth + b"}" * depth + b"}")).code in ("bad_json", "too_large")
    assert time.perf_counter() - t0 < 5.0  # generous; the real cost is milliseconds
    # brackets inside strings do not count as nesting
    s = Session(KEY)
    msg = s.deserialize(forge(_header(), {"token": "[" * 100}))
    assert msg.content["token"] == "[" * 100


def test_oversized_frames_are_rejected_before_the_signature_check():
    big_header = b" " * (MAX_HEADER_BYTES + 1)
    expect([PROTOCOL_TAG, b"0" * 64, big_header, b"{}"], "too_large")
    expect([PROTOCOL_TAG, b"0" * 64, b"{}", b" " * (MAX_CONTENT_BYTES + 1)], "too_large")
    small = Session(KEY, max_message_bytes=1000)
    expect(forge(_header(buffers=[{"dtype": "bytes", "shape": [2000], "nbytes": 2000}]), b"{}", [b"x" * 2000]),
           "too_large", small)
    with pytest.raises(ProtocolError) as e:
        small.serialize(small.msg("result_chunk", {"name": "a", "offset": 0, "size": 1, "eof": True}, [b"x" * 2000],
                                  job_id=JOB))
    assert e.value.code == "too_large"


@pytest.mark.parametrize("desc", [
    {"dtype": "object", "shape": [1], "nbytes": 8},
    {"dtype": "<U10", "shape": [1], "nbytes": 40},
    {"dtype": "float128", "shape": [1], "nbytes": 16},
    {"dtype": "complex64", "shape": [1], "nbytes": 8},
    {"dtype": "bool", "shape": [8], "nbytes": 8},
    {"dtype": ">f4", "shape": [2], "nbytes": 8},
    {"dtype": "float32", "shape": [3], "nbytes": 8},
    {"dtype": "float32", "shape": [2], "nbytes": 12},
    {"dtype": "float32", "shape": [-2], "nbytes": -8},
    {"dtype": "float32", "shape": [2.0], "nbytes": 8},
    {"dtype": "float32", "shape": [True, 2], "nbytes": 8},
    {"dtype": "float32", "shape": [], "nbytes": 8},
    {"dtype": "float32", "shape": [1] * 9, "nbytes": 4},
    {"dtype": "bytes", "shape": [4, 2], "nbytes": 8},
    {"dtype": "float32", "shape": "2", "nbytes": 8},
    {"dtype": "float32", "shape": [2], "nbytes": "8"},
    ["float32", [2], 8],
])
def test_bad_buffer_descriptors(desc):
    frames = forge(_header(msg_type="preview_mesh", job_id=JOB, buffers=[desc]),
                   {"stage": "x", "step": 0, "mesh": {}}, [b"\x00" * 8])
    expect(frames, "bad_buffer")


def test_forged_huge_shape_allocates_next_to_nothing():
    """A signed header claiming billions of elements over a tiny frame is refused without allocating."""
    claims = [
        {"dtype": "float32", "shape": [3_000_000_000, 3], "nbytes": 36_000_000_000},
        {"dtype": "float64", "shape": [10**12, 10**12, 10**12], "nbytes": 8 * 10**36},
        {"dtype": "uint8", "shape": [2**62], "nbytes": 2**62},
        {"dtype": "bytes", "shape": [2**40], "nbytes": 2**40},
    ]
    frame_sets = [forge(_header(msg_type="preview_mesh", job_id=JOB, buffers=[c]),
                        {"stage": "x", "step": 0, "mesh": {}}, [b"\x00" * 64]) for c in claims]
    metas = [
        {"positions": {"buffer": 0, "dtype": "float32", "shape": [3_000_000_000, 3]},
         "faces": {"buffer": 1, "dtype": "uint32", "shape": [0, 3]}},
        {"positions": {"buffer": 0, "dtype": "float32", "shape": [1_000_000, 3]},
         "faces": {"buffer": 1, "dtype": "uint32", "shape": [10**15, 3]}},
        {"positions": {"buffer": 0, "dtype": "float32", "shape": [1_000_000, 3]},
         "faces": {"buffer": 1, "dtype": "uint32", "shape": [0, 3]}},
        {"positions": {"buffer": 0, "dtype": "float32", "shape": [4, 3]},
         "faces": {"buffer": 1, "dtype": "uint32", "shape": [0, 3]},
         "texture_rgba": {"buffer": 2, "dtype": "uint8", "shape": [10**6, 10**6, 4]}},
        {"positions": {"buffer": 0, "dtype": "float32", "shape": [4, 3]},
         "faces": {"buffer": 1, "dtype": "uint32", "shape": [0, 3]},
         "texture_png": {"buffer": 2, "dtype": "bytes", "shape": [2**50]}},
    ]
    tiny = [b"\x00" * 48, b"", b"\x00" * 16]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for frames in frame_sets:
            expect(frames, "bad_buffer")
        codes = []
        for meta in metas:
            with pytest.raises(ProtocolError) as e:
                decode_mesh(meta, tiny)
            codes.append(e.value.code)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert codes == ["too_large", "too_large", "bad_buffer", "too_large", "too_large"]
    assert peak - base < 256 * 1024, f"peak {peak - base} bytes"


# ---- mesh validation ------------------------------------------------------------------

def _mesh_meta():
    mesh = MeshPayload(
        positions=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32),
        faces=np.array([[0, 1, 2]], np.uint32),
        uvs=np.zeros((3, 2), np.float32),
        normals=np.tile(np.array([[0, 0, 1]], np.float32), (3, 1)),
        colors=np.full((3, 4), 255, np.uint8),
        edges=np.array([[0, 1], [0, 2], [1, 2]], np.uint32),
        corner_edges=np.array([0, 2, 1], np.uint32),
    )
    return encode_mesh(mesh)


@pytest.mark.parametrize("case,code", [
    ("faces_out_of_range", "bad_mesh"),
    ("nan_position", "bad_mesh"),
    ("inf_uv", "bad_mesh"),
    ("wrong_dtype", "bad_buffer"),
    ("wrong_uv_rows", "bad_buffer"),
    ("normals_count", "bad_buffer"),
    ("missing_faces", "bad_mesh"),
    ("unknown_field", "bad_mesh"),
    ("shared_buffer", "bad_mesh"),
    ("index_out_of_list", "bad_buffer"),
    ("short_buffer", "bad_buffer"),
    ("not_png", "bad_mesh"),
    ("huge_png", "too_large"),
    ("both_textures", "bad_mesh"),
    ("array_mismatch", "bad_buffer"),
    ("edges_out_of_range", "bad_mesh"),
    ("corner_edges_out_of_range", "bad_mesh"),
    ("edges_without_corner_edges", "bad_mesh"),
    ("corner_edges_count", "bad_buffer"),
    ("too_many_edges", "bad_mesh"),
])
def test_mesh_validation(case, code):
    meta, bufs = _mesh_meta()
    bufs = [np.array(b) for b in bufs]
    if case == "faces_out_of_range":
        bufs[1] = np.array([[0, 1, 3]], np.uint32)
    elif case == "nan_position":
        bufs[0][1, 2] = np.nan
    elif case == "inf_uv":
        bufs[2][0, 0] = np.inf
    elif case == "wrong_dtype":
        meta["faces"]["dtype"] = "int32"
    elif case == "wrong_uv_rows":
        meta["uvs"]["shape"] = [2, 2]
    elif case == "normals_count":
        meta["normals"]["shape"] = [4, 3]
    elif case == "missing_faces":
        del meta["faces"]
    elif case == "unknown_field":
        meta["tangents"] = meta["normals"]
    elif case == "shared_buffer":
        meta["normals"]["buffer"] = 0
    elif case == "index_out_of_list":
        meta["colors"]["buffer"] = 99
    elif case == "short_buffer":
        bufs[0] = bufs[0].tobytes()[:-1]
    elif case == "not_png":
        meta["texture_png"] = {"buffer": len(bufs), "dtype": "bytes", "shape": [30]}
        bufs.append(b"GIF89a" + b"\x00" * 24)
    elif case == "huge_png":
        meta["texture_png"] = {"buffer": len(bufs), "dtype": "bytes", "shape": [33]}
        bufs.append(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + (100000).to_bytes(4, "big") * 2 + b"\x00" * 9)
    elif case == "both_textures":
        meta["texture_png"] = {"buffer": 5, "dtype": "bytes", "shape": [1]}
        meta["texture_rgba"] = {"buffer": 6, "dtype": "uint8", "shape": [1, 1, 4]}
    elif case == "array_mismatch":
        bufs[0] = bufs[0].astype(np.float64)
    elif case == "edges_out_of_range":
        bufs[5][2, 1] = 3
    elif case == "corner_edges_out_of_range":
        bufs[6][1] = 3
    elif case == "edges_without_corner_edges":
        del meta["corner_edges"]
    elif case == "corner_edges_count":
        meta["corner_edges"]["shape"] = [4]
        bufs[6] = np.zeros(4, np.uint32)
    elif case == "too_many_edges":
        meta["edges"]["shape"] = [4, 2]
        bufs[5] = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.uint32)
    with pytest.raises(ProtocolError) as e:
        decode_mesh(meta, bufs)
    assert e.value.code == code, e.value
    assert e.value.field and e.value.field.startswith("mesh")


def test_encode_mesh_refuses_bad_input():
    with pytest.raises(ProtocolError):
        encode_mesh(MeshPayload(positions=np.zeros((3, 3)), faces=np.array([[0, 1, -1]])))
    with pytest.raises(ProtocolError):
        encode_mesh(MeshPayload(positions=np.zeros((3, 3)), faces=np.array([[0.0, 1.0, 2.0]])))
    with pytest.raises(ProtocolError):
        encode_mesh(MeshPayload(positions=np.full((3, 3), np.nan), faces=np.array([[0, 1, 2]])))
    with pytest.raises(ProtocolError):
        encode_mesh("not a mesh")
    # int64 faces and float64 positions are converted to the wire dtypes
    meta, bufs = encode_mesh(MeshPayload(positions=np.zeros((3, 3)), faces=np.array([[0, 1, 2]])))
    assert bufs[0].dtype == np.float32 and bufs[1].dtype == np.uint32


mesh_descs = st.fixed_dictionaries({}, optional={
    "buffer": st.integers(-2, 6) | st.text(max_size=3) | st.none(),
    "dtype": st.sampled_from(["float32", "uint32", "uint8", "bytes", "int64", "float64", "x"]),
    "shape": st.lists(st.integers(-1, 10) | st.sampled_from([10**10, 2**63]), max_size=4) | st.none(),
})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["positions", "faces", "uvs", "normals", "colors", "texture_png",
                                        "texture_rgba", "bogus"]), mesh_descs | json_values, max_size=5),
       st.lists(st.binary(max_size=64) | st.none(), max_size=6))
def test_random_mesh_meta_raises_only_protocol_error(meta, buffers):
    try:
        decode_mesh(meta, buffers)
    except ProtocolError:
        pass
