"""Protocol benchmark: a 64 MB mesh message over loopback, signed, versus raw pyzmq; small-message RTT.

Run from the repository root:

    python3 bench/bench_protocol.py [--size-mb 64] [--repeats 7] [--pings 2000]

A second process binds a ROUTER socket on tcp://127.0.0.1 (random port); this process talks
to it through a DEALER. For each repeat, the time runs from the start of sending one message
to the arrival of the peer's acknowledgement, so it includes, for the protocol: building the
frames, HMAC-SHA256 signing, the transfer, verification, header/content parsing and a full
``decode_mesh`` validation (indices < N, finite floats); for raw pyzmq: the transfer of the same
bytes (``copy=False`` on both ends). Figures are medians. Latency: ping -> pong round trips
through the protocol (signed, replay-checked) and raw.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import zmq

from protocol import MeshPayload, Session, decode_mesh, encode_mesh, new_job_id, new_key
from protocol.signing import Signer

RAW = b"RAW"


def _peer(key: bytes, conn) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    session = Session(key, "bench-server", routing=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == RAW:
            body = frames[2:]
            if len(body) == 1 and body[0].bytes == b"quit":
                break
            if len(body) == 1 and body[0].bytes == b"ping":
                sock.send_multipart([frames[0], RAW, b"pong"])
            else:
                sock.send_multipart([frames[0], RAW, b"ack"])
            continue
        msg = session.deserialize(frames)
        if msg.msg_type == "ping":
            session.send(sock, "pong", {"token": msg.content.get("token", "")}, routing_id=msg.routing_id)
        else:
            mesh = msg.mesh()  # full validation, zero-copy
            session.send(sock, "accepted", {"queue_position": int(mesh.faces.shape[0] > 0)},
                         job_id=msg.job_id, routing_id=msg.routing_id)
    sock.close()
    ctx.term()


def _mesh(size_mb: float) -> MeshPayload:
    n = int(size_mb * 2**20) // 24  # 12 bytes of positions + 12 bytes of faces per vertex
    rng = np.random.default_rng(0)
    return MeshPayload(
        positions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        faces=rng.integers(0, n, (n, 3), dtype=np.uint32),
    )


def _pcts(samples):
    s = sorted(samples)
    return s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pings", type=int, default=2000)
    args = ap.parse_args()

    key = new_key()
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_peer, args=(key, child), daemon=True)
    proc.start()
    port = parent.recv()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{port}")
    session = Session(key, "bench-client")

    mesh = _mesh(args.size_mb)
    meta, bufs = encode_mesh(mesh)
    nbytes = sum(b.nbytes for b in bufs)
    raw_frames = [memoryview(b).cast("B") for b in bufs]
    job = new_job_id()

    def raw_once():
        t = time.perf_counter()
        sock.send_multipart([RAW, *raw_frames], copy=False)
        sock.recv_multipart()
        return time.perf_counter() - t

    def proto_once():
        t = time.perf_counter()
        session.send(sock, "preview_mesh", {"stage": "bench", "step": 0, "mesh": meta}, bufs, job_id=job)
        _, reply = session.recv(sock)
        assert reply.msg_type == "accepted"
        return time.perf_counter() - t

    raw_once(), proto_once()  # warm-up (connection, page faults)
    raw_t, proto_t = [], []
    for _ in range(args.repeats):  # interleaved so both see the same machine load
        raw_t.append(raw_once())
        proto_t.append(proto_once())
    raw_med, proto_med = statistics.median(raw_t), statistics.median(proto_t)

    # components, same process
    signer = Signer(key)
    t = time.perf_counter()
    signer.sign([b"{}", b"{}", *raw_frames])
    sign_s = time.perf_counter() - t
    t = time.perf_counter()
    decode_mesh(meta, bufs)
    validate_s = time.perf_counter() - t

    # small-message latency
    raw_rtt, proto_rtt = [], []
    for i in range(args.pings):
        t = time.perf_counter()
        sock.send_multipart([RAW, b"ping"])
        sock.recv_multipart()
        raw_rtt.append(time.perf_counter() - t)
        t = time.perf_counter()
        session.send(sock, "ping", {"token": str(i)})
        session.recv(sock)
        proto_rtt.append(time.perf_counter() - t)
    sock.send_multipart([RAW, b"quit"])
    proc.join(5)
    sock.close()
    ctx.term()

    gb = nbytes / 1e9
    rp50, rp99 = _pcts(raw_rtt)
    pp50, pp99 = _pcts(proto_rtt)
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}, numpy {np.__version__}")
    print(f"mesh message: {mesh.positions.shape[0]} vertices + {mesh.faces.shape[0]} faces = {nbytes / 2**20:.1f} MiB, "
          f"{args.repeats} repeats (median)")
    print(f"  raw pyzmq         : {raw_med * 1e3:8.1f} ms  {gb / raw_med:6.2f} GB/s")
    print(f"  protocol (signed) : {proto_med * 1e3:8.1f} ms  {gb / proto_med:6.2f} GB/s  "
          f"(sign+verify+validate, replay-checked)")
    print(f"  ratio protocol/raw throughput: {raw_med / proto_med:.2f}")
    print(f"  components here: sign {gb / sign_s:.2f} GB/s, decode_mesh validation {gb / validate_s:.2f} GB/s")
    bound = gb / (2 * sign_s + raw_med + validate_s)
    print(f"  bound from components (sign + raw transfer + verify + validate, serial): {bound:.2f} GB/s")
    print(f"small messages, {args.pings} round trips:")
    print(f"  raw pyzmq         : p50 {rp50 * 1e6:7.1f} us  p99 {rp99 * 1e6:7.1f} us")
    print(f"  protocol ping/pong: p50 {pp50 * 1e6:7.1f} us  p99 {pp99 * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
