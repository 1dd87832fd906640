"""Shared helpers for the add-on tests (a helper module, not a test module: pytest collects nothing here).

bpy can be imported once per process and keeps global state (registered classes, handlers,
timers), so every bpy test body runs in a fresh ``python`` subprocess: the test calls
``run_body(__file__, "name", args)``, the subprocess runs ``_body_name(args)`` from the same
file and prints one ``RESULT <json>`` line that the test then checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def have_bpy() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("bpy") is not None
    except Exception:
        return False


def run_body(test_file: str, name: str, args: dict | None = None, timeout: float = 120.0) -> dict:
    """Run ``_body_<name>(args)`` of ``test_file`` in a fresh interpreter; return its result dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, test_file, name, json.dumps(args or {})], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"bpy body {name} failed (rc {proc.returncode}):\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def body_main(namespace: dict) -> None:
    """``if __name__ == "__main__": body_main(globals())`` at the end of a test file."""
    sys.path.insert(0, str(REPO))
    name, args = sys.argv[1], json.loads(sys.argv[2])
    result = namespace["_body_" + name](args)
    print("RESULT " + json.dumps(result if result is not None else {}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip bpy's slow and noisy teardown


def sphere_payload(n_lat=24, n_lon=48, *, uvs=True, texture=None, colors=False, radius=0.5):
    """A UV sphere as a MeshPayload: per-corner UVs, optional texture (H, W, 4) and vertex colours."""
    from protocol.mesh import MeshPayload

    lat = np.linspace(0, np.pi, n_lat + 1)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    pos = np.stack([np.sin(la) * np.cos(lo), np.sin(la) * np.sin(lo), np.cos(la)], -1).reshape(-1, 3) * radius
    idx = np.arange((n_lat + 1) * n_lon).reshape(n_lat + 1, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    faces = faces.astype(np.uint32)
    payload = MeshPayload(positions=pos.astype(np.float32), faces=faces)
    if uvs:
        u = (np.arange(n_lon + 1) / n_lon)[None, :].repeat(n_lat + 1, 0)
        v = (1 - np.arange(n_lat + 1) / n_lat)[:, None].repeat(n_lon + 1, 1)
        uvgrid = np.stack([u, v], -1)
        ia, ja = np.meshgrid(np.arange(n_lat), np.arange(n_lon), indexing="ij")
        ua, ub = uvgrid[ia, ja], uvgrid[ia, ja + 1]
        uc, ud = uvgrid[ia + 1, ja], uvgrid[ia + 1, ja + 1]
        t1 = np.stack([ua, uc, ub], 2).reshape(-1, 3, 2)
        t2 = np.stack([ub, uc, ud], 2).reshape(-1, 3, 2)
        payload.uvs = np.concatenate([t1, t2]).reshape(-1, 2).astype(np.float32)
    if texture is not None:
        payload.texture_rgba = texture
    if colors:
        col = np.zeros((len(pos), 4), np.uint8)
        col[:, 0] = np.arange(len(pos)) % 256
        col[:, 1] = 128
        col[:, 2] = 255 - col[:, 0]
        col[:, 3] = 255
        payload.colors = col
    return payload


def checker_texture(h=64, w=32):
    """(h, w, 4) uint8 with a distinct top-left pixel (red) so row order is checkable."""
    tex = np.zeros((h, w, 4), np.uint8)
    tex[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    tex[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    tex[..., 2] = 60
    tex[..., 3] = 255
    tex[0, 0] = [255, 0, 0, 255]
    return tex


def enable_addon():
    """Inside a bpy body: factory settings, then the repository's add-on enabled; returns ``bpy``."""
    import importlib

    import bpy

    addon_utils = importlib.import_module("addon_utils")  # on the path once bpy is imported
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    return bpy


def backend_process(tmp_path):
    """Fixture body (``backend = pytest.fixture(backend_process)``): a started fake-pipeline backend
    in ``tmp_path/data``, stopped afterwards."""
    b = BackendProcess(tmp_path / "data")
    b.data_dir.mkdir()
    b.start()
    yield b
    b.stop()


class BackendProcess:
    """A real ``python -m backend serve`` with the fake pipeline, in a temp data dir."""

    def __init__(self, data_dir: Path, pipeline: str = "tests.fake_pipeline:run_job", port: int = 0):
        self.data_dir = Path(data_dir)
        self.conn = self.data_dir / "connection.json"
        self.pipeline = pipeline
        self.port = port
        self.proc = None

    def start(self, timeout: float = 60.0) -> Path:
        old = self.conn.stat().st_mtime_ns if self.conn.exists() else None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "backend", "serve", "--pipeline", self.pipeline, "--data-dir",
               str(self.data_dir), "--connection-file", str(self.conn)]
        if self.port:
            cmd += ["--port", str(self.port)]
        self.log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.exists() and self.conn.stat().st_mtime_ns != old:
                return self.conn
            if self.proc.poll() is not None:
                raise RuntimeError("backend exited: " + (self.data_dir / "server.log").read_text()[-3000:])
            time.sleep(0.05)
        raise RuntimeError("backend did not write its connection file in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
