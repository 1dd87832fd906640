"""Backend server benchmark: control-path latency while a job keeps the CPU busy, and event fan-out.

    python3 bench/bench_server.py [--pings 400] [--clients 20] [--events 4000]

Starts a real ``python -m backend serve`` with the fast test pipeline (tests/fake_pipeline.py)
and prints:
  1. ping round trip p50/p99, server idle vs. while a job spins the CPU in the worker (ratio);
  2. cancel acknowledgement p50/p99 while a job spins the CPU;
  3. events/s delivered to N clients attached to one fast job (fan-out), vs. to 1 client;
  4. server RSS before/after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.server.client import BackendClient
from backend.server.launcher import ServerProcess

FAKE = "tests.fake_pipeline:run_job"
BUSY = {"test.steps": 1_000_000, "test.step_seconds": 0.05, "test.busy": True, "test.preview_every": 0}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ping_latencies(client, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        client.ping()
        out.append(time.perf_counter() - t)
    return out


def fmt(xs):
    return f"p50 {statistics.median(xs) * 1e3:6.2f} ms  p99 {pct(xs, 0.99) * 1e3:6.2f} ms"


def fanout(info, n_clients, steps):
    """Events/s delivered to n_clients attached to one job emitting ``steps`` progress events."""
    owner = BackendClient(info)
    job = owner.submit({"prompt": "fan-out", "preset": "draft",
                        "overrides": {"test.steps": steps, "test.step_seconds": 0.0, "test.preview_every": 0,
                                      "test.no_obj": True}})
    counts = [0] * n_clients
    ready = threading.Barrier(n_clients + 1)
    done_at = [0.0] * n_clients

    def follow(i):
        c = BackendClient(info)
        try:
            c.attach(job, from_seq=1)
            ready.wait()
            for _m in c.events(job, timeout=120):
                counts[i] += 1
            done_at[i] = time.perf_counter()
        finally:
            c.close()

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    total = sum(counts)
    owner_events = sum(1 for _ in owner.events(job, timeout=120))
    owner.close()
    elapsed = max(done_at) - t0
    return total, elapsed, owner_events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pings", type=int, default=400)
    ap.add_argument("--cancels", type=int, default=30)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--events", type=int, default=4000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        srv = ServerProcess(Path(d) / "data", Path(d) / "conn.json", pipeline=FAKE,
                            args=["--cancel-timeout", "5"]).start()
        try:
            c = BackendClient(srv.info)
            ping_latencies(c, 50)  # warm up
            rss0 = rss(srv.pid)
            idle = ping_latencies(c, args.pings)
            job = c.submit({"prompt": "busy", "preset": "draft", "overrides": BUSY})
            c.next(lambda m: m.job_id == job and m.msg_type == "progress", 30)
            busy = ping_latencies(c, args.pings)
            c.cancel(job)
            cancels = []
            for _ in range(args.cancels):
                job = c.submit({"prompt": "busy", "preset": "draft", "overrides": BUSY})
                c.next(lambda m, j=job: m.job_id == j and m.msg_type == "progress", 30)
                time.sleep(0.1)
                t = time.perf_counter()
                c.cancel(job)
                cancels.append(time.perf_counter() - t)
            c.inbox.clear()
            one_total, one_s, _ = fanout(srv.info, 1, args.events)
            many_total, many_s, owner_events = fanout(srv.info, args.clients, args.events)
            rss1 = rss(srv.pid)
            c.close()
        finally:
            srv.stop()
    print("backend server benchmark (fake pipeline, real process and sockets)")
    print(f"  ping, server idle            : {fmt(idle)}   (n={len(idle)})")
    print(f"  ping, worker spinning the CPU: {fmt(busy)}   (n={len(busy)})")
    print(f"  busy/idle ratio              : p50 x{statistics.median(busy) / statistics.median(idle):.2f}, "
          f"p99 x{pct(busy, 0.99) / pct(idle, 0.99):.2f}")
    print(f"  cancel ack while busy        : {fmt(cancels)}   (n={len(cancels)})")
    print(f"  events to 1 client           : {one_total} in {one_s:.2f} s = {one_total / one_s:,.0f} events/s")
    print(f"  events to {args.clients} clients (one job) : {many_total} in {many_s:.2f} s = "
          f"{many_total / many_s:,.0f} events/s (x{(many_total / many_s) / (one_total / one_s):.2f} of 1 client); "
          f"per client {many_total // args.clients} of {owner_events} events")
    print(f"  server RSS                   : {rss0:.1f} MiB before, {rss1:.1f} MiB after")


if __name__ == "__main__":
    main()
