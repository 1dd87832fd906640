"""Two real ZeroMQ sockets (ROUTER/DEALER over tcp loopback) exchanging signed messages."""

import numpy as np
import pytest
import zmq

from protocol import (
    MeshPayload,
    ProtocolError,
    Session,
    decode_mesh,
    encode_mesh,
    new_job_id,
    new_key,
)


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close()
    router.close()
    ctx.term()


def _recv(session, sock, timeout_ms=5000):
    assert sock.poll(timeout_ms), "no message arrived"
    return session.recv(sock)


def _mesh(n=500, f=900, seed=0):
    rng = np.random.default_rng(seed)
    return MeshPayload(
        positions=rng.normal(size=(n, 3)).astype(np.float32),
        faces=rng.integers(0, n, size=(f, 3)).astype(np.uint32),
        uvs=rng.random((3 * f, 2), dtype=np.float32),
        normals=rng.normal(size=(n, 3)).astype(np.float32),
        colors=rng.integers(0, 256, size=(n, 4)).astype(np.uint8),
        texture_rgba=rng.integers(0, 256, size=(16, 32, 4)).astype(np.uint8),
    )


def test_router_dealer_exchange_with_mesh(sockets):
    router, dealer = sockets
    key = new_key()
    server = Session(key, "server-1", routing=True)
    client = Session(key, "client-1")
    job = new_job_id()

    client.send(dealer, "hello", {"protocol_version": "1.0", "client_name": "test"})
    rid, hello = _recv(server, router)
    assert rid is not None and hello.msg_type == "hello" and hello.session == "client-1"

    server.send(router, "hello_reply", {"protocol_version": "1.0", "limits": {"max_vertices": 10}},
                routing_id=rid)
    _, reply = _recv(client, dealer)
    assert reply.server_session == "server-1" and reply.session == "client-1"
    assert client.peer_session == "server-1"

    client.send(dealer, "submit", {"params": {"prompt": "a red chair", "seed": 7}}, job_id=job)
    rid2, submit = _recv(server, router)
    assert rid2 == rid and submit.job_id == job and submit.server_session == "server-1"

    mesh = _mesh()
    meta, bufs = encode_mesh(mesh)
    server.send(router, "preview_mesh", {"stage": "coarse", "step": 10, "mesh": meta}, bufs,
                job_id=job, seq=3, routing_id=rid)
    _, preview = _recv(client, dealer)
    assert preview.seq == 3 and preview.job_id == job
    got = decode_mesh(preview.content["mesh"], preview.buffers)
    for name in ("positions", "faces", "uvs", "normals", "colors", "texture_rgba"):
        np.testing.assert_array_equal(getattr(got, name), getattr(mesh, name))
    assert not got.positions.flags.writeable  # a view over the received frame, not a copy


def test_wrong_key_is_rejected_over_the_wire(sockets):
    router, dealer = sockets
    server = Session(new_key(), routing=True)
    intruder = Session(new_key())
    intruder.send(dealer, "ping", {"token": "x"})
    with pytest.raises(ProtocolError) as e:
        _recv(server, router)
    assert e.value.code == "bad_signature"


def test_replayed_frames_are_rejected_over_the_wire(sockets):
    router, dealer = sockets
    key = new_key()
    server = Session(key, routing=True)
    client = Session(key)
    frames = client.serialize(client.msg("ping", {"token": "a"}))
    dealer.send_multipart(frames)
    dealer.send_multipart(frames)
    _, first = _recv(server, router)
    assert first.content == {"token": "a"}
    with pytest.raises(ProtocolError) as e:
        _recv(server, router)
    assert e.value.code == "replayed"


def test_large_mesh_and_result_chunks_over_the_wire(sockets):
    """A mesh above the threaded-hashing threshold, then a file pulled in signed chunks."""
    router, dealer = sockets
    key = new_key()
    server = Session(key, routing=True)
    client = Session(key)
    job = new_job_id()
    client.send(dealer, "fetch_result", {"offset": 0, "length": 1 << 20}, job_id=job)
    rid, _ = _recv(server, router)

    n = 600_000  # positions 7.2 MB + faces 7.2 MB + colors 2.4 MB > 8 MB: hashed in threads
    rng = np.random.default_rng(1)
    mesh = MeshPayload(positions=rng.normal(size=(n, 3)).astype(np.float32),
                       faces=rng.integers(0, n, (n, 3)).astype(np.uint32),
                       colors=rng.integers(0, 256, (n, 4)).astype(np.uint8))
    meta, bufs = encode_mesh(mesh)
    server.send(router, "result_ready", {"name": "result.glb", "size": 10, "sha256": "0" * 64, "files": [],
                                         "mesh": meta}, bufs, job_id=job, seq=9, routing_id=rid)
    _, ready = _recv(client, dealer)
    got = ready.mesh()
    np.testing.assert_array_equal(got.faces, mesh.faces)
    np.testing.assert_array_equal(got.colors, mesh.colors)

    blob = rng.bytes(3000)
    received = bytearray()
    offset = 0
    while True:
        client.send(dealer, "fetch_result", {"name": "result.glb", "offset": offset, "length": 1024}, job_id=job)
        rid, req = _recv(server, router)
        o, n_bytes = req.content["offset"], req.content["length"]
        piece = blob[o:o + n_bytes]
        server.send(router, "result_chunk", {"name": "result.glb", "offset": o, "size": len(blob),
                                             "eof": o + len(piece) >= len(blob)}, [piece], job_id=job, routing_id=rid)
        _, chunk = _recv(client, dealer)
        assert chunk.content["offset"] == offset
        received += chunk.buffers[0]
        offset += len(chunk.buffers[0])
        if chunk.content["eof"]:
            break
    assert bytes(received) == blob
