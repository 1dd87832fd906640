"""Texture-job benchmark: uploading a big mesh, and one texture job on the cpu preset.

    python3 bench/bench_texture.py [--faces 200000] [--repeats 5] [--job-steps 40] [--skip-job]

Prints:
  1. upload of a ~200k-triangle mesh with per-corner UVs to a real ``python -m backend serve``
     (fast test pipeline): client encode + 1 MiB ``upload`` pieces + submit, server checks/
     digest/save + ``accepted`` reply, median of N, against a plain ``generate`` submit in the same
     run (ratio), and the server-side share (SHA-256 + split + ``decode_mesh`` +
     ``validate_upload_mesh`` + ``.npz`` write, in this process);
  2. (``--blender-upload``, bpy 5.0.1 in a child process) the add-on's side of Texture Selected
     on a 100k-quad grid with a Subdivision-free stack: ``texture_ops.build_upload`` (loop
     triangles, world transform, corner UVs) and ``encode_mesh``, median of N;
  3. one texture job on the ``cpu`` preset with the bundled prior (``run_texture_job`` in this
     process) on a 12-triangle cube and on a ~5k-triangle sphere: total, UV check/unwrap, refine.
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
from backend.server.launcher import ServerProcess
from protocol.mesh import MeshPayload, pack_upload, unpack_upload, validate_upload_mesh
from tests.texture_meshes import cube, sphere

FAKE = "tests.fake_pipeline:run_job"
QUICK = {"test.steps": 1, "test.step_seconds": 0.0, "test.preview_every": 0}


def uv_sphere(min_faces: int) -> MeshPayload:
    return sphere(min_faces, uvs=True)


def bench_upload(faces: int, repeats: int) -> None:
    import hashlib

    from backend.server.uploads import TextureUpload, save_upload, upload_key

    mesh = uv_sphere(faces)
    nbytes = mesh.positions.nbytes + mesh.faces.nbytes + mesh.uvs.nbytes
    print(f"upload: {len(mesh.faces)} triangles, {len(mesh.positions)} vertices, UVs; {nbytes / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory() as d:
        srv = ServerProcess(Path(d) / "data", Path(d) / "conn.json", pipeline=FAKE).start()
        try:
            with BackendClient(srv.info) as c:
                params = {"prompt": "a ball", "preset": "cpu", "seed": 1, "overrides": QUICK}
                plain, up = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    job = c.submit(params, timeout=60)
                    plain.append(time.perf_counter() - t0)
                    list(c.events(job, 60))
                    t0 = time.perf_counter()
                    job = c.submit(params, mesh=mesh, timeout=60)
                    up.append(time.perf_counter() - t0)
                    list(c.events(job, 120))
        finally:
            srv.stop()
    m_up, m_plain = statistics.median(up), statistics.median(plain)
    print(f"  submit with upload → accepted: median {m_up * 1e3:.0f} ms (min {min(up) * 1e3:.0f}, "
          f"max {max(up) * 1e3:.0f}) over {repeats}")
    print(f"  plain generate submit → accepted: median {m_plain * 1e3:.1f} ms; ratio {m_up / m_plain:.1f}x")
    # the server's share, in this process
    meta, blob = pack_upload(mesh)
    t = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            t0 = time.perf_counter()
            digest = hashlib.sha256(blob).hexdigest()
            m = validate_upload_mesh(unpack_upload(meta, blob))
            save_upload(Path(d), TextureUpload(m, upload_key(meta, digest, None)))
            t.append(time.perf_counter() - t0)
    print(f"  server side (sha256 + split + decode + validate + npz write): median "
          f"{statistics.median(t) * 1e3:.0f} ms")


def bench_job(steps: int) -> None:
    from backend.pipeline.events import JobContext
    from backend.pipeline.texture_job import run_texture_job
    from protocol.params import GenerationParams

    pos, faces = cube()
    cases = [("cube, 12 triangles, no UVs", MeshPayload(positions=pos, faces=faces)),
             ("sphere, ~5k triangles, lat-long UVs (overlap-free)", uv_sphere(5000))]
    for name, mesh in cases:
        params = GenerationParams(prompt="a blue cube", preset="cpu", seed=1, overrides={"fine.steps": steps})
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            r = run_texture_job(params, mesh, JobContext(out_dir=Path(d)))
            total = time.perf_counter() - t0
        i = r.info
        print(f"texture job, cpu preset, {steps} steps, {name}: {total:.1f} s total (UVs '{i['uv_source']}' "
              f"{i['seconds_uv']:.1f} s, refine {i['seconds_refine']:.1f} s = "
              f"{i['seconds_refine'] / max(steps, 1):.2f} s/step), texture {i['texture_resolution']} px")


def bench_blender_upload(repeats: int) -> None:
    """Runs inside a child interpreter that imports bpy (never together with torch)."""
    import importlib

    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    importlib.import_module("addon_utils").enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon import texture_ops
    from blender_addon.protocol.mesh import encode_mesh as addon_encode_mesh  # the add-on's vendored copy

    bpy.ops.mesh.primitive_grid_add(x_subdivisions=317, y_subdivisions=317, size=4.0)  # 100k quads
    obj = bpy.context.active_object
    n_tri = sum(p.loop_total - 2 for p in obj.data.polygons)
    times, enc = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload, target, _color = texture_ops.build_upload(obj, bpy.context.evaluated_depsgraph_get())
        t1 = time.perf_counter()
        addon_encode_mesh(payload)
        enc.append(time.perf_counter() - t1)
        times.append(t1 - t0)
    print(f"Blender side (bpy {bpy.app.version_string}): {len(obj.data.polygons)} quads → {n_tri} triangles "
          f"with UVs: build_upload median {statistics.median(times) * 1e3:.0f} ms, encode_mesh "
          f"{statistics.median(enc) * 1e3:.0f} ms (over {repeats})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--job-steps", type=int, default=40)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--blender-upload", action="store_true", help="only the add-on side (needs bpy)")
    args = ap.parse_args()
    if args.blender_upload:
        bench_blender_upload(args.repeats)
        return 0
    bench_upload(args.faces, args.repeats)
    if not args.skip_job:
        bench_job(args.job_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
