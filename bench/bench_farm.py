"""Farm benchmark: jobs per hour with 1 and 2 workers, scheduling overhead on Ray vs. the local
worker, and Ray's start-up time.

    python3 bench/bench_farm.py [--jobs 8] [--job-seconds 1.0] [--tiny 20] [--no-ray]

Starts real ``python -m backend serve`` processes with the fast test pipeline
(tests/fake_pipeline.py) and, for the Ray rows, a private Ray head (``ray start --head``, 2 CPUs,
stopped afterwards). It prints:

  1. start-up: ``ray start --head`` until ready; server start (to its connection file) with
     ``--workers 2`` locally vs. ``--ray ADDR --workers 2`` (joining the cluster + 2 actors ready);
  2. throughput: ``--jobs`` jobs submitted at once, each ``--job-seconds`` of *sleeping* steps
     (20 steps), so a job stands for GPU-bound work that leaves the CPU idle; jobs/hour with 1 and
     2 workers, local and Ray, and the 2-worker / 1-worker ratio (ideal 2.0);
  3. scheduling overhead: ``--tiny`` jobs of one step, one after another on one worker; the time
     from ``submit`` to ``result_ready`` minus the pipeline's own run time (``info.seconds``),
     median and p90, local vs. Ray (the Ray figure includes copying the result files to the server).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.server.client import BackendClient
from backend.server.launcher import RayHead, ServerProcess

FAKE = "tests.fake_pipeline:run_job"
TINY = {"test.steps": 1, "test.step_seconds": 0.0, "test.preview_every": 0, "test.no_obj": True}


def params(overrides, prompt="farm bench"):
    return {"prompt": prompt, "preset": "draft", "seed": 1, "overrides": overrides}


def start_server(tmp: Path, name: str, args: list[str]) -> tuple[ServerProcess, float]:
    d = tmp / name.replace(" ", "-")
    d.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(d / "data", d / "conn.json", pipeline=FAKE, args=["--queue-limit", "256", *args],
                        env={"RAY_USAGE_STATS_ENABLED": "0"})
    t0 = time.perf_counter()
    srv.start(timeout=300)
    return srv, time.perf_counter() - t0


def wait_ready(client, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.ping().content["stats"].get("workers") or []
        if workers and all(w["ready"] for w in workers):
            return
        time.sleep(0.05)
    raise RuntimeError("workers not ready")


def throughput(srv: ServerProcess, jobs: int, job_seconds: float) -> float:
    """Jobs per hour for ``jobs`` jobs submitted at once."""
    steps = 20
    c = BackendClient(srv.info)
    try:
        wait_ready(c)
        over = {"test.steps": steps, "test.step_seconds": job_seconds / steps, "test.preview_every": 0,
                "test.no_obj": True}
        t0 = time.perf_counter()
        ids = [c.submit(params(over, f"job {i}")) for i in range(jobs)]
        for job_id in ids:
            c.wait_result(job_id, 600)
        wall = time.perf_counter() - t0
    finally:
        c.close()
    return jobs / wall * 3600


def overhead(srv: ServerProcess, n: int) -> list[float]:
    """Per tiny job: submit -> result_ready, minus the pipeline's own seconds (s)."""
    c = BackendClient(srv.info)
    out = []
    try:
        wait_ready(c)
        c.wait_result(c.submit(params(TINY, "warm-up")), 120)
        for i in range(n):
            t0 = time.perf_counter()
            result = c.wait_result(c.submit(params(TINY, f"tiny {i}")), 120)
            out.append(time.perf_counter() - t0 - float(result.content["info"].get("seconds", 0.0)))
    finally:
        c.close()
    return out


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * (len(xs) - 1) + 0.5))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--job-seconds", type=float, default=1.0)
    ap.add_argument("--tiny", type=int, default=20)
    ap.add_argument("--no-ray", action="store_true", help="local workers only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-farm-"))
    rows: dict[str, dict] = {}

    def run(name, extra, measure_overhead):
        srv, start_s = start_server(tmp, name, extra)
        try:
            row = {"start_s": start_s, "jobs_per_hour": throughput(srv, args.jobs, args.job_seconds)}
            if measure_overhead:
                row["overhead"] = overhead(srv, args.tiny)
        finally:
            code = srv.stop()
            if code != 0:
                print(srv.log(), file=sys.stderr)
        rows[name] = row
        print(f"  {name:10s} server start {start_s:6.2f} s   {row['jobs_per_hour']:8.0f} jobs/h", flush=True)

    print(f"throughput: {args.jobs} jobs of {args.job_seconds:g} s (sleeping steps) submitted at once")
    run("local x1", ["--workers", "1"], True)
    run("local x2", ["--workers", "2"], False)
    head = None
    if not args.no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print('Ray is not installed (pip install "conjure[farm]"): Ray rows skipped')
            args.no_ray = True
    if not args.no_ray:
        head = RayHead(num_cpus=2).start()
        try:
            run("ray x1", ["--ray", head.address, "--workers", "1"], True)
            run("ray x2", ["--ray", head.address, "--workers", "2"], False)
        finally:
            head.stop()

    print()
    print("start-up")
    if head is not None:
        print(f"  ray start --head (2 CPUs) until ready         {head.startup_s:6.2f} s")
    for name in rows:
        print(f"  server start, {name:10s} (to connection file) {rows[name]['start_s']:6.2f} s")
    print("throughput (jobs/hour)")
    for kind in ("local", "ray"):
        one, two = rows.get(f"{kind} x1"), rows.get(f"{kind} x2")
        if one and two:
            print(f"  {kind:5s}: 1 worker {one['jobs_per_hour']:7.0f}   2 workers {two['jobs_per_hour']:7.0f}   "
                  f"ratio {two['jobs_per_hour'] / one['jobs_per_hour']:.2f}x")
    print(f"scheduling overhead per job ({args.tiny} one-step jobs, submit -> result_ready minus run time)")
    for name in ("local x1", "ray x1"):
        ov = rows.get(name, {}).get("overhead")
        if ov:
            print(f"  {name:9s}: median {statistics.median(ov) * 1e3:7.1f} ms   p90 {p90(ov) * 1e3:7.1f} ms")
    if "ray x1" in rows and "local x1" in rows:
        ratio = statistics.median(rows["ray x1"]["overhead"]) / statistics.median(rows["local x1"]["overhead"])
        print(f"  Ray / local: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
