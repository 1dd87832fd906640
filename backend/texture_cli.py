"""``conjure-backend texture IN.glb|IN.obj "prompt" --out OUT.glb``: texture a mesh file in this process.

Reads the mesh with ``backend.mesh.load.load_mesh_file`` (validated like an upload over the wire),
runs the pipeline module's ``run_texture`` (``backend.pipeline.run.run_texture`` by default) and
writes OUT.glb plus OUT.obj/.mtl/.png next to it. The positions in OUT are the input's, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    from backend.server.worker import DEFAULT_PIPELINE

    t = sub.add_parser("texture", help="texture an existing mesh (GLB/OBJ/PLY/STL) from a prompt and write a GLB")
    t.add_argument("mesh", type=Path, help="input mesh: .glb, .gltf, .obj (+Y up), .ply or .stl (+Z up)")
    t.add_argument("prompt")
    t.add_argument("--out", type=Path, required=True, help="output GLB path (OBJ/MTL/PNG go next to it)")
    t.add_argument("--preset", default="auto",
                   help="draft | standard | high | cpu | auto (standard with CUDA, cpu without; default)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--negative", default="", help="negative prompt")
    t.add_argument("--color", default=None, metavar="R,G,B",
                   help="start colour (sRGB 0..1) instead of the file's own colour or texture")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="preset override, e.g. --set fine.steps=100 (repeatable)")
    t.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true", help="no progress output")
    return t


def _fail(message: str, code: int = 2) -> int:
    print(f"conjure-backend: error: {message}", file=sys.stderr)
    return code


def _progress(quiet: bool):
    last = [0.0, None]

    def emit(event):
        from backend.pipeline.events import ProgressEvent

        if quiet or not isinstance(event, ProgressEvent):
            return
        now = time.monotonic()
        if event.stage != last[1] or now - last[0] > 1.0 or event.step == event.total:
            last[0], last[1] = now, event.stage
            print(f"  {event.stage} {event.step}/{event.total} {event.message[:60]}", file=sys.stderr)

    return emit


def cmd_texture(args) -> int:
    import tempfile

    from backend.cli import export_next_to, parse_sets
    from backend.mesh.load import MeshLoadError, load_mesh_file
    from backend.pipeline.events import JobContext
    from backend.server.preflight import params_checker
    from backend.server.uploads import UnsupportedJobKindError
    from backend.server.worker import PipelineSpecError, classify_error, load_callable
    from protocol import ProtocolError, validate_params

    try:
        overrides = parse_sets(args.sets)
        params = validate_params({"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed,
                                  "preset": args.preset, "overrides": overrides})
        color = None
        if args.color is not None:
            color = [float(c) for c in args.color.split(",")]
            if len(color) not in (3, 4) or not all(0.0 <= c <= 1.0 for c in color):
                raise ValueError(f"--color must be 3 or 4 numbers in 0..1 separated by commas, got {args.color!r}")
    except (ValueError, ProtocolError) as exc:
        return _fail(getattr(exc, "message", str(exc)))
    if args.out.suffix.lower() != ".glb":
        return _fail(f"--out must end in .glb, got {args.out}")
    try:
        params_checker(args.pipeline)(params.preset, params.overrides)
        run_job = load_callable(args.pipeline)
    except (ValueError, PipelineSpecError) as exc:
        return _fail(str(exc))
    run_texture = getattr(sys.modules.get(run_job.__module__), "run_texture", None)
    if not callable(run_texture):
        return _fail(str(UnsupportedJobKindError(f"the pipeline {run_job.__module__!r} cannot texture meshes")))
    try:
        t_read = time.perf_counter()
        mesh, file_color = load_mesh_file(args.mesh)
        t_read = time.perf_counter() - t_read
    except MeshLoadError as exc:
        return _fail(str(exc))
    if not args.quiet:
        print(f"read {args.mesh}: {len(mesh.positions)} vertices, {len(mesh.faces)} triangles"
              f"{', UVs' if mesh.uvs is not None else ''}{', texture' if mesh.texture_rgba is not None else ''}"
              f" ({t_read:.2f} s)", file=sys.stderr)
    if params.seed is None:
        import random

        params.seed = random.randrange(2**31)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".conjure-", dir=args.out.parent) as work:
        ctx = JobContext(out_dir=Path(work), emit=_progress(args.quiet))
        try:
            result = run_texture(params, mesh, ctx, base_color=color if color is not None else file_color)
        except ValueError as exc:
            return _fail(str(exc))
        except Exception as exc:
            if os.environ.get("CONJURE_DEBUG"):
                raise
            code, _ = classify_error(exc)
            return _fail(f"the texture job failed ({code}): {type(exc).__name__}: {exc}"
                         " (set CONJURE_DEBUG=1 for the traceback)", 1)
        written = export_next_to(result.files, args.out)
    info = result.info or {}
    print(f"wrote {written['glb']} ({written['glb'].stat().st_size} bytes) in {time.perf_counter() - t0:.1f} s")
    for kind in ("obj", "mtl", "png"):
        if kind in written:
            print(f"  also {written[kind]}")
    print(f"UVs: {info.get('uv_source', '?')}; preset {(info.get('preset') or {}).get('name', params.preset)}, "
          f"seed {info.get('seed', params.seed)}")
    for warning in info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return 0
