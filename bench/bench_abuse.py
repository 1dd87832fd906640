"""Server under abuse: peak RSS of the server process under each abuse, and cancel-ack latency.

    python3 bench/bench_abuse.py [--tree DIR] [--scale 1.0] [--cancels 40] [--json OUT]

Each abuse gets a fresh ``python -m backend serve`` process (fake pipeline, loopback only) from
``--tree`` (default: this checkout; pass an older checkout to measure "before"), and reports the
server's peak RSS (``VmHWM`` from ``/proc``, the worker process excluded) and its RSS at the end:

  1. pre-auth frames: 8 peers without the key each send one 64 MiB frame (unsigned);
  2. unread fetches: 3 clients each send 500 ``fetch_result`` requests for a ~1.7 MB GLB and
     never read a reply;
  3. session ids: 20,000 signed pings, each from a new session id;
  4. cancel-ack latency while a job spins the CPU in the worker (``--cancels`` samples; p50 / p99).

Loops are bounded; ``--scale`` shrinks or grows the abuse counts (not the cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.server.client import BackendClient  # noqa: E402
from protocol import PROTOCOL_VERSION  # noqa: E402
from protocol.connection import read_connection_file  # noqa: E402
from protocol.messages import PROTOCOL_TAG, dumps  # noqa: E402
from protocol.signing import Signer  # noqa: E402

FAKE = "tests.fake_pipeline:run_job"


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Server:
    """``python -m backend serve`` of ``tree`` on a fresh data directory."""

    def __init__(self, tree: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
        self.conn = self.dir / "conn.json"
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--pipeline", FAKE, "--data-dir",
                                      str(self.dir / "data"), "--connection-file", str(self.conn),
                                      "--queue-limit", "64", "--cancel-timeout", "2"],
                                     cwd=tree, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.conn.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "server.log").read_text())
            time.sleep(0.05)
        time.sleep(0.1)
        self.info = read_connection_file(self.conn)

    def rss_mib(self) -> tuple[float, float]:
        """(peak, current) RSS of the server process in MiB."""
        return status_kib(self.proc.pid, "VmHWM") / 1024, status_kib(self.proc.pid, "VmRSS") / 1024

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def raw_request(key: bytes, sock, msg_type: str, content: dict, job_id=None, session=None) -> None:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": session or uuid.uuid4().hex,
              "server_session": None, "job_id": job_id, "seq": None, "time": time.time(),
              "version": PROTOCOL_VERSION, "buffers": []}
    signed = [dumps(header), dumps(content)]
    sock.send_multipart([PROTOCOL_TAG, Signer(key).sign(signed), *signed])


def params(**overrides) -> dict:
    base = {"test.steps": 3, "test.step_seconds": 0.005, "test.preview_every": 0, "test.no_obj": True}
    return {"prompt": "abuse", "preset": "draft", "seed": 1, "overrides": {**base, **overrides}}


def abuse_preauth(tree: Path, scale: float) -> dict:
    srv = Server(tree)
    try:
        base = srv.rss_mib()
        ctx = zmq.Context.instance()
        socks = []
        frame = b"\0" * (64 << 20)
        for _ in range(max(1, int(8 * scale))):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(srv.info.url)
            s.send_multipart([PROTOCOL_TAG, b"0" * 64, b"{}", b"{}", frame])
            socks.append(s)
        time.sleep(3.0)
        with BackendClient(srv.info) as c:
            answered = bool(c.ping(timeout=10).content)
        peak, now = srv.rss_mib()
        for s in socks:
            s.close(0)
        return {"abuse": f"{len(socks)} peers x 64 MiB unsigned frame", "rss_start": base[1], "peak": peak,
                "end": now, "alive": srv.alive() and answered}
    finally:
        srv.stop()


def abuse_fetch(tree: Path, scale: float) -> dict:
    srv = Server(tree)
    try:
        with BackendClient(srv.info) as c:
            job_id = c.submit(params(**{"test.subdivisions": 6}))
            size = c.wait_result(job_id, 120).content["size"]
        base = srv.rss_mib()
        ctx = zmq.Context.instance()
        socks = []
        for _ in range(3):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 4096)
            s.connect(srv.info.url)
            session = uuid.uuid4().hex
            for _ in range(max(1, int(500 * scale))):
                raw_request(srv.info.key, s, "fetch_result", {"offset": 0, "length": 16 << 20}, job_id=job_id,
                            session=session)
            socks.append(s)
        peak_seen = 0.0
        for _ in range(30):  # 3 s
            time.sleep(0.1)
            peak_seen = max(peak_seen, srv.rss_mib()[1])
        with BackendClient(srv.info) as c:
            answered = bool(c.ping(timeout=10).content)
        peak, now = srv.rss_mib()
        for s in socks:
            s.close(0)
        return {"abuse": f"3 clients x {int(500 * scale)} unread fetches of {size / 1e6:.1f} MB",
                "rss_start": base[1], "peak": peak, "end": now, "alive": srv.alive() and answered}
    finally:
        srv.stop()


def abuse_sessions(tree: Path, scale: float) -> dict:
    srv = Server(tree)
    try:
        base = srv.rss_mib()
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.info.url)
        n = max(1, int(20_000 * scale))
        got = 0
        for i in range(n):
            raw_request(srv.info.key, s, "ping", {}, session=uuid.uuid4().hex)
            while s.poll(0):
                s.recv_multipart()
                got += 1
            if i % 500 == 499:  # stay under the server's receive HWM
                while got < i - 200 and s.poll(2000):
                    s.recv_multipart()
                    got += 1
        deadline = time.monotonic() + 20
        while got < n and time.monotonic() < deadline and s.poll(1000):
            s.recv_multipart()
            got += 1
        s.close(0)
        time.sleep(0.5)
        peak, now = srv.rss_mib()
        return {"abuse": f"{n} new session ids (signed pings)", "rss_start": base[1], "peak": peak, "end": now,
                "alive": srv.alive() and got >= n * 0.99}
    finally:
        srv.stop()


def cancel_acks(tree: Path, n: int) -> dict:
    srv = Server(tree)
    try:
        lat = []
        with BackendClient(srv.info) as c:
            for _ in range(max(2, n)):
                job_id = c.submit(params(**{"test.steps": 100000, "test.step_seconds": 0.01, "test.busy": True}))
                c.next(lambda m, j=job_id: m.job_id == j and m.msg_type == "progress", 60)
                t0 = time.perf_counter()
                c.cancel(job_id)
                lat.append((time.perf_counter() - t0) * 1e3)
        lat.sort()
        return {"n": len(lat), "p50_ms": statistics.median(lat), "p99_ms": lat[int(0.99 * (len(lat) - 1))],
                "max_ms": lat[-1]}
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose server is measured")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the abuse counts")
    ap.add_argument("--cancels", type=int, default=40, help="cancel-ack samples (0: skip)")
    ap.add_argument("--only", default="preauth,fetch,sessions", help="abuses to run (comma-separated)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    print(f"server under abuse: {tree} (fake pipeline, loopback)")
    rows = []
    chosen = {name.strip() for name in args.only.split(",")}
    for fn in (f for f in (abuse_preauth, abuse_fetch, abuse_sessions) if f.__name__[6:] in chosen):
        try:
            r = fn(tree, args.scale)
        except Exception as exc:  # noqa: BLE001 - a crashed server is a figure too
            r = {"abuse": fn.__name__, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(r)
        if "error" in r:
            print(f"  {r['abuse']:<48} ERROR {r['error']}")
        else:
            print(f"  {r['abuse']:<48} RSS start {r['rss_start']:7.1f} MiB  peak {r['peak']:7.1f} MiB  "
                  f"end {r['end']:7.1f} MiB  server answering: {r['alive']}")
    ca = cancel_acks(tree, args.cancels) if args.cancels > 0 else None
    if ca:
        print(f"  cancel ack while a job spins the CPU: p50 {ca['p50_ms']:.1f} ms  p99 {ca['p99_ms']:.1f} ms  "
              f"max {ca['max_ms']:.1f} ms  (n={ca['n']})")
    if args.json:
        args.json.write_text(json.dumps({"tree": str(tree), "abuse": rows, "cancel_ack": ca}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
