"""Import speed of the add-on's importer vs Blender's glTF importer, and preview updates.

Run from the repository root (needs bpy 5.0.1, trimesh, pillow)::

    python3 bench/bench_import.py [--triangles 200000] [--texture 2048] [--repeats 3]

1. The same asset - a 200k-triangle mesh with per-corner UVs and a 2048x2048 texture - goes
   into Blender twice in one process: through ``blender_addon.importer.import_result`` (a
   MeshPayload with the texture as PNG bytes, as the backend sends it) and through
   ``bpy.ops.import_scene.gltf`` (the asset written as GLB by trimesh; glTF needs per-vertex
   UVs, so vertices are split where UVs differ - the same split any GLB exporter makes).
   Both keep the PNG packed and let Blender decode it lazily. Prints seconds and the ratio.
   The payload carries the edges and corner edges the backend computes
   (``backend.mesh.topology.with_edges``, done in the worker before a mesh is sent), so the
   importer skips Blender's edge hashing; the same import without them (Blender's
   ``calc_edges``) is printed too.
2. In-place preview update (``PreviewSlot.update``: new mesh data swapped into the one preview
   object, old mesh freed) of a 50k-triangle mesh with vertex colours: median and p90 ms.
3. The add-on's timer pump (``runtime.RUNTIME.tick``, called every 10 ms as bpy.app.timers
   would) while a real backend (``python -m backend serve`` with the repository's fake test
   pipeline) streams 20k-triangle previews: tick p50/p99/max in ms (``--no-pump`` skips it).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sphere(triangles: int):
    """UV sphere with about ``triangles`` triangles: positions (N,3), faces (F,3), per-corner uvs (3F,2)."""
    n_lat = max(4, int(round((triangles / 3.2) ** 0.5)))
    n_lon = max(8, int(round(triangles / (2 * n_lat))))
    lat = np.linspace(0, np.pi, n_lat + 1)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    pos = (np.stack([np.sin(la) * np.cos(lo), np.sin(la) * np.sin(lo), np.cos(la)], -1).reshape(-1, 3) * 0.5)
    idx = np.arange((n_lat + 1) * n_lon).reshape(n_lat + 1, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    u = (np.arange(n_lon + 1) / n_lon)[None, :].repeat(n_lat + 1, 0)
    v = (1 - np.arange(n_lat + 1) / n_lat)[:, None].repeat(n_lon + 1, 1)
    grid = np.stack([u, v], -1)
    ia, ja = np.meshgrid(np.arange(n_lat), np.arange(n_lon), indexing="ij")
    t1 = np.stack([grid[ia, ja], grid[ia + 1, ja], grid[ia, ja + 1]], 2).reshape(-1, 3, 2)
    t2 = np.stack([grid[ia, ja + 1], grid[ia + 1, ja], grid[ia + 1, ja + 1]], 2).reshape(-1, 3, 2)
    uvs = np.concatenate([t1, t2]).reshape(-1, 2)
    return pos.astype(np.float32), faces.astype(np.uint32), uvs.astype(np.float32)


def texture(side: int) -> np.ndarray:
    """(side, side, 4) uint8: smooth colour ramps plus noise (PNG does not shrink it to nothing)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    tex = np.empty((side, side, 4), np.uint8)
    tex[..., 0] = (255 * x).astype(np.uint8)
    tex[..., 1] = (255 * y).astype(np.uint8)
    tex[..., 2] = (127 + 120 * np.sin(20 * x) * np.cos(20 * y)).astype(np.uint8)
    tex[..., :3] = np.clip(tex[..., :3].astype(np.int16) + rng.integers(-8, 9, (side, side, 3)), 0, 255)
    tex[..., 3] = 255
    return tex


def png_bytes(tex: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tex, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_glb(path: Path, pos, faces, uvs, png: bytes) -> int:
    """GLB of the same asset (glTF +Y up); vertices split where a corner's UV differs. Returns vertex count."""
    import trimesh
    from PIL import Image

    corner_v = faces.reshape(-1).astype(np.int64)
    key = np.concatenate([corner_v[:, None].view(np.float64) * 0 + corner_v[:, None], uvs.astype(np.float64)], 1)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    v_idx = uniq[:, 0].astype(np.int64)
    p = pos[v_idx].astype(np.float64)
    yup = np.stack([p[:, 0], p[:, 2], -p[:, 1]], 1)
    tm = trimesh.Trimesh(vertices=yup, faces=inverse.reshape(-1, 3), process=False)
    tm.visual = trimesh.visual.TextureVisuals(uv=uniq[:, 1:3], image=Image.open(io.BytesIO(png)))
    path.write_bytes(tm.export(file_type="glb"))
    return len(yup)


def clear_scene(bpy) -> None:
    for coll in (bpy.data.objects, bpy.data.meshes, bpy.data.materials, bpy.data.images):
        for item in list(coll):
            coll.remove(item)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triangles", type=int, default=200_000)
    ap.add_argument("--texture", type=int, default=2048)
    ap.add_argument("--preview-triangles", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-pump", action="store_true", help="skip the pump-under-previews figure")
    args = ap.parse_args()

    import bpy

    from backend.mesh.topology import with_edges
    from blender_addon import importer
    from protocol.mesh import MeshPayload

    bpy.ops.wm.read_factory_settings(use_empty=True)
    pos, faces, uvs = sphere(args.triangles)
    tex = texture(args.texture)
    png = png_bytes(tex)
    tmp = Path(tempfile.mkdtemp())
    glb = tmp / "asset.glb"
    glb_verts = write_glb(glb, pos, faces, uvs, png)
    print(f"asset: {len(faces)} triangles, {len(pos)} vertices ({glb_verts} after the glTF UV split), "
          f"texture {args.texture}x{args.texture} ({len(png) / 1e6:.1f} MB PNG, GLB {glb.stat().st_size / 1e6:.1f} MB)")
    print(f"bpy {bpy.app.version_string}, {os.cpu_count()} CPUs")

    ours, ours_calc, ours_rgba, gltf = [], [], [], []
    t = time.perf_counter()
    sent = with_edges(MeshPayload(positions=pos, faces=faces, uvs=uvs, texture_png=png))
    topo_s = time.perf_counter() - t
    for _ in range(args.repeats):
        clear_scene(bpy)
        t = time.perf_counter()
        obj = importer.import_result(sent, name="ours")
        ours.append(time.perf_counter() - t)
        assert len(obj.data.polygons) == len(faces) and len(obj.data.edges) == len(sent.edges)
        clear_scene(bpy)
        payload = MeshPayload(positions=pos, faces=faces, uvs=uvs, texture_png=png)
        t = time.perf_counter()
        obj = importer.import_result(payload, name="ours_calc")
        ours_calc.append(time.perf_counter() - t)
        assert len(obj.data.edges) == len(sent.edges)
        clear_scene(bpy)
        payload = MeshPayload(positions=pos, faces=faces, uvs=uvs, texture_rgba=tex, edges=sent.edges,
                              corner_edges=sent.corner_edges)
        t = time.perf_counter()
        importer.import_result(payload, name="ours_rgba", pack=True)
        ours_rgba.append(time.perf_counter() - t)
        clear_scene(bpy)
        t = time.perf_counter()
        bpy.ops.import_scene.gltf(filepath=str(glb))
        gltf.append(time.perf_counter() - t)
        got = sum(len(o.data.polygons) for o in bpy.data.objects if o.type == "MESH")
        assert got == len(faces), got
    a, b, c, d = min(ours), min(ours_rgba), min(gltf), min(ours_calc)
    print(f"import (best of {args.repeats}):")
    print(f"  add-on importer, PNG texture packed:         {a * 1e3:8.1f} ms")
    print(f"  the same without the backend's edges:        {d * 1e3:8.1f} ms  (Blender's calc_edges; "
          f"ratio {c / d:.1f}x)")
    print(f"  (the backend's edge computation, off Blender's thread: {topo_s * 1e3:.1f} ms)")
    print(f"  add-on importer, RGBA8 -> PNG (thread) + pack:  {b * 1e3:8.1f} ms")
    print(f"  bpy.ops.import_scene.gltf (GLB):             {c * 1e3:8.1f} ms")
    print(f"  ratio glTF / add-on (PNG): {c / a:.1f}x   (RGBA8 path: {c / b:.1f}x)")

    # in-place preview updates
    clear_scene(bpy)
    ppos, pfaces, _ = sphere(args.preview_triangles)
    cols = np.empty((len(ppos), 4), np.uint8)
    cols[:] = (200, 120, 60, 255)
    slot = importer.PreviewSlot("bench", "preview")
    times = []
    for i in range(12):
        jitter = (1 + 0.01 * np.sin(i + ppos[:, :1] * 7)).astype(np.float32)
        payload = with_edges(MeshPayload(positions=ppos * jitter, faces=pfaces, colors=cols))
        t = time.perf_counter()
        slot.update(payload)
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])
    leaks = (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials))
    print(f"preview update in place, {len(pfaces)} triangles + vertex colours: median "
          f"{statistics.median(steady) * 1e3:.1f} ms, p90 {steady[int(0.9 * (len(steady) - 1))] * 1e3:.1f} ms, "
          f"first {times[0] * 1e3:.1f} ms; objects/meshes/materials after 12 updates: {leaks}")
    if not args.no_pump:
        clear_scene(bpy)
        pump_under_previews(bpy)


def pump_under_previews(bpy) -> None:
    """Tick the add-on's pump every 10 ms while a real backend streams 20k-triangle previews."""
    import subprocess

    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    data = Path(tempfile.mkdtemp())
    conn = data / "connection.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--pipeline", "tests.fake_pipeline:run_job",
                             "--data-dir", str(data), "--connection-file", str(conn)], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not conn.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = api.connect(str(conn))
        while client.state != "connected" and time.monotonic() < deadline:
            RUNTIME.tick()
            time.sleep(0.01)
        overrides = {"test.steps": 60, "test.step_seconds": 0.05, "test.preview_every": 2, "test.subdivisions": 5}
        job = RUNTIME.submit({"prompt": "pump bench", "seed": 1, "preset": "draft", "overrides": overrides})
        RUNTIME.tick_seconds.clear()
        t0 = time.monotonic()
        while job.imported_object is None and time.monotonic() - t0 < 120:
            RUNTIME.tick()
            time.sleep(0.01)
        ticks = sorted(RUNTIME.tick_seconds)
        n = len(ticks)
        print(f"pump ticks while {job.previews_received} previews of 20480 triangles streamed "
              f"({RUNTIME.stats['previews_applied']} shown) and the result imported: {n} ticks, "
              f"p50 {ticks[n // 2] * 1e3:.2f} ms, p99 {ticks[int(0.99 * (n - 1))] * 1e3:.2f} ms, "
              f"max {ticks[-1] * 1e3:.2f} ms (budget 4 ms)")
        costs = sorted(((v, k) for k, v in RUNTIME._stage_cost.items()), reverse=True)[:4]
        print("  slowest stages (kind, after stage): " + ", ".join(f"{k[0]}/{k[1]} {v * 1e3:.1f} ms" for v, k in costs))
        api.disconnect()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
