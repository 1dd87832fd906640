"""Start ``python -m backend serve`` as a child process and wait for its connection file.

Used by the tests and ``bench/bench_server.py``; scripts may use it to run a private backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from protocol import ConnectionInfo
from protocol.connection import read_connection_file

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """A running ``serve`` process. ``info`` is its ``ConnectionInfo`` once started."""

    def __init__(self, data_dir: Path, connection_file: Path, *, pipeline: str | None = None,
                 args: list[str] | None = None, env: dict | None = None, log_file: Path | None = None):
        self.data_dir = Path(data_dir)
        self.connection_file = Path(connection_file)
        self.pipeline = pipeline
        self.args = list(args or [])
        self.env = env
        self.log_file = Path(log_file) if log_file else self.connection_file.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        self.info: ConnectionInfo | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "backend", "serve", "--data-dir", str(self.data_dir),
               "--connection-file", str(self.connection_file)]
        if self.pipeline:
            cmd += ["--pipeline", self.pipeline]
        return cmd + self.args

    def start(self, timeout: float = 60.0) -> ServerProcess:
        """Launch and wait until the connection file appears (raises ``RuntimeError`` with the log)."""
        try:
            self.connection_file.unlink()
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env or {})
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.connection_file.exists():
                try:
                    self.info = read_connection_file(self.connection_file)
                    return self
                except Exception:  # half-written file: retry
                    pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not start within {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the server (its worker follows through PR_SET_PDEATHSIG)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode

    kill = kill9

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RayHead:
    """A private Ray head node (``ray start --head --block``) for tests and benchmarks.

    ``address`` is ``127.0.0.1:PORT`` once started; :meth:`stop` sends SIGTERM, on which
    ``ray start --block`` stops every Ray process it started (nothing else on the machine).
    ``nice`` > 0 runs the whole cluster at a lower priority.
    """

    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, nice: int = 10):
        self.num_cpus, self.num_gpus, self.nice = num_cpus, num_gpus, nice
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.temp_dir: Path | None = None
        self.startup_s = float("nan")

    def start(self, timeout: float = 120.0) -> RayHead:
        import shutil
        import socket
        import tempfile

        ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths are short
        log_path = self.temp_dir / "head.log"
        self._log = open(log_path, "wb")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = ["nice", "-n", str(self.nice), ray_bin, "start", "--head", "--port", str(port),
               "--num-cpus", str(self.num_cpus), "--num-gpus", str(self.num_gpus), "--include-dashboard=false",
               "--disable-usage-stats", "--temp-dir", str(self.temp_dir), "--block"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.address = f"127.0.0.1:{port}"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}:\n{self.log()}")
            if b"--block" in log_path.read_bytes():
                self.startup_s = time.monotonic() - t0
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the Ray head did not start within {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return (self.temp_dir / "head.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
