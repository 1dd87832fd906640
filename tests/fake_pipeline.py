"""A small, fast pipeline for server and CLI tests: same signature as the real ``run_job``.

It does real work at toy scale: an icosphere that grows and changes colour step by step,
real ``ProgressEvent`` / ``PreviewEvent`` meshes (``MeshPayload``, Blender frame, +Z up), and a
real GLB (trimesh, converted to glTF +Y up) plus OBJ/MTL/PNG written into ``ctx.out_dir``.

Knobs (``params.overrides``):
    test.steps          int, optimisation steps (default 10)
    test.step_seconds   float, sleep per step (default 0.02)
    test.busy           bool, spin the CPU during each step instead of sleeping
    test.preview_every  int, a preview every N steps (default 2; 0 = none)
    test.subdivisions   int, icosphere subdivisions of the previews/result (default 2)
    test.crash          int step at which a RuntimeError is raised (-1 = never)
    test.oom            int step at which a CUDA-style out-of-memory error is raised (-1 = never)
    test.kill           int step at which the process SIGKILLs itself (-1 = never)
    test.hang           bool, ignore cancellation (never calls ``ctx.check_cancel``)
    test.no_obj         bool, write only the GLB
    test.warning        str, a warning the result carries ("" = none)
    object_size         float, largest dimension in metres (the real presets' key); base on z = 0
    guidance.model      str, reported as the result's model (the real presets' key)
    test.nan_info       bool, put NaN and inf into the result's ``info`` (a pipeline bug the server survives)
    test.report_cwd     bool, put the working directory into ``info["cwd"]``
"""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np

from backend.pipeline.events import PreviewEvent, ProgressEvent, ResultEvent

KNOBS: dict[str, type] = {
    "test.steps": int,
    "test.step_seconds": float,
    "test.busy": bool,
    "test.preview_every": int,
    "test.subdivisions": int,
    "test.crash": int,
    "test.oom": int,
    "test.kill": int,
    "test.hang": bool,
    "test.no_obj": bool,
    "test.warning": str,
    "object_size": float,
    "guidance.model": str,
    "test.nan_info": bool,
    "test.report_cwd": bool,
}
DEFAULTS = {
    "test.steps": 10,
    "test.step_seconds": 0.02,
    "test.busy": False,
    "test.preview_every": 2,
    "test.subdivisions": 2,
    "test.crash": -1,
    "test.oom": -1,
    "test.kill": -1,
    "test.hang": False,
    "test.no_obj": False,
    "test.warning": "",
    "object_size": 1.6,
    "guidance.model": "fake-icosphere",
    "test.nan_info": False,
    "test.report_cwd": False,
}
PRESETS = ("auto", "draft", "standard", "high", "cpu")


class FakeOutOfMemoryError(RuntimeError):
    """Stands in for ``torch.cuda.OutOfMemoryError`` (same class name suffix, same message shape)."""


def check_params(preset: str, overrides: dict) -> dict:
    """Validate like ``presets.get_preset``: ValueError with a clear message on a bad name/key/value."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    knobs = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in KNOBS:
            raise ValueError(f"unknown override {key!r}; the test pipeline knows {', '.join(sorted(KNOBS))}")
        want = KNOBS[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is int and isinstance(value, bool):
            raise ValueError(f"override {key!r} must be an integer")
        if not isinstance(value, want):
            raise ValueError(f"override {key!r} must be {want.__name__}, got {type(value).__name__}")
        knobs[key] = value
    return knobs


def warm_up() -> None:
    """Called once by the server's worker before it reports ready (like loading real models)."""
    import trimesh  # noqa: F401


def _icosphere(subdivisions: int, radius: float):
    import trimesh


    sphere = trimesh.creation.icosphere(subdivisions=max(0, min(subdivisions, 6)), radius=radius)
    return np.asarray(sphere.vertices, np.float32), np.asarray(sphere.faces, np.uint32)


def _mesh(step: int, total: int, subdivisions: int, seed: int, size: float = 1.6):
    """A sphere growing to ``size`` metres across at the last step, base on z = 0."""
    from protocol.mesh import MeshPayload

    frac = (step + 1) / max(total, 1)
    pos, faces = _icosphere(subdivisions, (0.2 + 0.6 * frac) * size / 1.6)
    rng = np.random.default_rng(seed + step)
    pos = pos * (1.0 + 0.02 * rng.standard_normal((len(pos), 1)).astype(np.float32))
    normals = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    pos[:, 2] -= pos[:, 2].min()
    colors = np.empty((len(pos), 4), np.uint8)
    colors[:, 0] = np.uint8(255 * frac)
    colors[:, 1] = ((normals[:, 2] * 0.5 + 0.5) * 255).astype(np.uint8)
    colors[:, 2] = np.uint8(255 * (1 - frac))
    colors[:, 3] = 255
    return MeshPayload(positions=pos.astype(np.float32), faces=faces, normals=normals.astype(np.float32),
                       colors=colors)


def _step(seconds: float, busy: bool) -> None:
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if busy:
        x = 0
        while time.perf_counter() < end:
            for i in range(2000):
                x += i * i
    else:
        time.sleep(seconds)


def _export(mesh, out_dir, write_obj: bool) -> dict:
    """GLB (+ OBJ/MTL/PNG) of ``mesh`` into ``out_dir``; Blender Z-up -> glTF Y-up."""
    import trimesh
    from PIL import Image

    v = mesh.positions.astype(np.float64)
    yup = np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)
    n = np.asarray(mesh.normals, np.float64)  # unit sphere directions (positions sit on z >= 0)
    uv = np.stack([0.5 + np.arctan2(n[:, 1], n[:, 0]) / (2 * np.pi), 0.5 + np.arcsin(n[:, 2]) / np.pi], axis=1)
    tex = np.zeros((64, 64, 4), np.uint8)
    tex[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    tex[..., 1] = np.linspace(0, 255, 64, dtype=np.uint8)[:, None]
    tex[..., 2] = 128
    tex[..., 3] = 255
    image = Image.fromarray(tex, "RGBA")
    tm = trimesh.Trimesh(vertices=yup, faces=mesh.faces.astype(np.int64), process=False)
    tm.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    files = {}
    glb = out_dir / "model.glb"
    glb.write_bytes(tm.export(file_type="glb"))
    files["glb"] = glb
    if write_obj:
        from trimesh.exchange.obj import export_obj

        text, extra = export_obj(tm, include_texture=True, return_texture=True, mtl_name="model.mtl")
        (out_dir / "model.obj").write_text(text)
        files["obj"] = out_dir / "model.obj"
        for name, data in extra.items():
            (out_dir / name).write_bytes(data)
            kind = "mtl" if name.endswith(".mtl") else "png" if name.endswith(".png") else name
            files[kind] = out_dir / name
        if "png" not in files:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            (out_dir / "model.png").write_bytes(buf.getvalue())
            files["png"] = out_dir / "model.png"
    return files


def run_job(params, ctx) -> ResultEvent:
    """Run the toy pipeline. ``params`` is a ``GenerationParams`` (or anything with its fields)."""
    knobs = check_params(params.preset, params.overrides)
    steps = knobs["test.steps"]
    seed = params.seed if params.seed is not None else 0
    hang = knobs["test.hang"]
    t0 = time.perf_counter()
    ctx.emit(ProgressEvent("load", 1, 1, "fake model ready"))
    mesh = None
    for step in range(steps):
        if not hang:
            ctx.check_cancel()
        _step(knobs["test.step_seconds"], knobs["test.busy"])
        if step == knobs["test.crash"]:
            raise RuntimeError(f"fake pipeline crashed on purpose at step {step}")
        if step == knobs["test.oom"]:
            raise FakeOutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (fake, at step {step})")
        if step == knobs["test.kill"]:
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.emit(ProgressEvent("coarse", step + 1, steps, f"step {step + 1}"))
        every = knobs["test.preview_every"]
        if every > 0 and (step + 1) % every == 0:
            mesh = _mesh(step, steps, knobs["test.subdivisions"], seed, knobs["object_size"])
            ctx.emit(PreviewEvent("coarse", step + 1, mesh))
    if not hang:
        ctx.check_cancel()
    mesh = _mesh(steps - 1, steps, knobs["test.subdivisions"], seed, knobs["object_size"])
    ctx.emit(ProgressEvent("export", 0, 1, "writing GLB"))
    files = _export(mesh, ctx.out_dir, write_obj=not knobs["test.no_obj"])
    ctx.emit(ProgressEvent("export", 1, 1, "done"))
    info = {"model": knobs["guidance.model"], "renderer": "none", "steps": steps,
            "seconds": round(time.perf_counter() - t0, 4), "prompt": params.prompt, "seed": seed,
            "resolved_preset": "cpu" if params.preset == "auto" else params.preset, "device": "CPU",
            "warnings": [knobs["test.warning"]] if knobs["test.warning"] else []}
    if knobs["test.report_cwd"]:
        info["cwd"] = os.getcwd()
    if knobs["test.nan_info"]:
        info.update(loss=float("nan"), best=float("inf"), history=[1.0, float("-inf")])
    return ResultEvent(files=files, mesh=mesh, info=info)


def run_texture(params, mesh, ctx, base_color=None) -> ResultEvent:
    """Toy texture job (same signature as ``backend.pipeline.run.run_texture``).

    Keeps the uploaded positions and faces (the same arrays), gives every corner a UV from a
    simple planar projection, and paints a flat texture that moves from ``base_color`` (or grey)
    towards the colour word of the prompt, with a textured preview per step. Writes a real GLB.
    """
    from backend.mesh.export import export_mesh
    from protocol.mesh import MeshPayload

    knobs = check_params(params.preset, params.overrides)
    steps = knobs["test.steps"]
    words = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
    target = next((np.array(c, np.float32) for w, c in words.items() if w in params.prompt.lower()),
                  np.array((128, 128, 128), np.float32))
    start = np.array(base_color[:3], np.float32) * 255 if base_color is not None else np.full(3, 128, np.float32)
    pos = np.asarray(mesh.positions, np.float64)
    lo, hi = pos.min(0), pos.max(0)
    planar = ((pos[:, :2] - lo[:2]) / np.maximum(hi[:2] - lo[:2], 1e-9)).astype(np.float32)
    uvs = np.clip(planar[np.asarray(mesh.faces, np.int64).reshape(-1)], 0, 1)

    def textured(frac):
        rgb = (start + (target - start) * frac + 0.5).astype(np.uint8)
        tex = np.empty((16, 16, 4), np.uint8)
        tex[..., :3] = rgb
        tex[..., 3] = 255
        return MeshPayload(positions=mesh.positions, faces=mesh.faces, uvs=uvs, texture_rgba=tex)

    ctx.emit(ProgressEvent("load", 1, 1, "fake texture model ready"))
    for step in range(steps):
        ctx.check_cancel()
        _step(knobs["test.step_seconds"], knobs["test.busy"])
        if step == knobs["test.crash"]:
            raise RuntimeError(f"fake texture job crashed on purpose at step {step}")
        ctx.emit(ProgressEvent("texture", step + 1, steps, f"step {step + 1}"))
        every = knobs["test.preview_every"]
        if every > 0 and (step + 1) % every == 0:
            ctx.emit(PreviewEvent("texture", step + 1, textured((step + 1) / steps)))
    result = textured(1.0)
    files = export_mesh(result, ctx.out_dir, "textured")
    return ResultEvent(files=files, mesh=result, info={"kind": "texture", "uv_source": "planar",
                                                       "prompt": params.prompt})
