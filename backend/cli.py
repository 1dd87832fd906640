"""``conjure-backend`` (also ``python -m backend``): serve | generate | texture | jobs | keys.

    conjure-backend serve [--data-dir DIR] [--connection-file PATH] [--bind IP] [--port N] ...
    conjure-backend generate "a prompt" --out chair.glb [--preset P] [--seed N] [--set key=value ...]
    conjure-backend texture IN.glb|IN.obj "a prompt" --out OUT.glb [--preset P] [--color R,G,B] [--set k=v]
    conjure-backend jobs [--data-dir DIR] [--json]
    conjure-backend keys --dir DIR --client NAME     (CurveZMQ keys for --bind on a network address)
    conjure-backend models list | pull ID | remove ID   (the Hugging Face cache + known-good models)
    conjure-backend doctor                            (GPU, CUDA toolkit, extensions, models, what will run)

Defaults: data directory ``$CONJURE_DATA_DIR`` or ``~/.local/share/conjure/jobs``; connection
file ``$CONJURE_RUNTIME_DIR/connection.json``, ``$XDG_RUNTIME_DIR/conjure/connection.json`` or
``~/.local/share/conjure/runtime/connection.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from backend.fsutil import atomic_copy, atomic_write_text

DEFAULT_PIPELINE = "backend.pipeline.run:run_job"


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> overrides for ``validate_params``, through the one override parser
    (``protocol.params``): keys of the real pipeline are checked against ``OVERRIDE_SPECS`` (type,
    range, nearest-key suggestion); other keys (a test pipeline's) keep their literal value
    (true/false, int, float or text). Raises ``ValueError`` with the parser's message.
    """
    from protocol.errors import ProtocolError
    from protocol.params import (
        OVERRIDE_SPECS,
        coerce_overrides,
        parse_literal,
        parse_override_text,
        suggest_key,
    )

    raw: dict[str, str] = {}
    try:
        for item in items or []:
            if "=" not in item:
                raise ValueError(f"--set {item!r} must look like section.field=value (e.g. coarse.steps=300)")
            raw.update(parse_override_text(item))
        coerce_overrides(raw, unknown="keep", allow_local_paths=True)  # the CLI runs here: local folders ok
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    sections = {k.split(".", 1)[0] for k in OVERRIDE_SPECS}
    for key in raw:
        if key not in OVERRIDE_SPECS and key.split(".", 1)[0] in sections:
            raise ValueError(suggest_key(key, OVERRIDE_SPECS))  # a real section with a misspelt field
    return {k: parse_literal(v) for k, v in raw.items()}


def build_parser() -> argparse.ArgumentParser:
    from backend.server.jobs import default_data_dir

    p = argparse.ArgumentParser(prog="conjure-backend", description="Conjure's text-to-3D backend.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ZeroMQ server that Blender connects to")
    s.add_argument("--data-dir", type=Path, default=None,
                   help=f"job folders and journal (default: $CONJURE_DATA_DIR or {default_data_dir()})")
    s.add_argument("--connection-file", type=Path, default=None,
                   help="where to write the connection file (mode 0600; default: protocol's default path)")
    s.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; others need --curve-keys)")
    s.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free port)")
    s.add_argument("--advertise-ip", default=None, help="address written to the connection file")
    s.add_argument("--pipeline", default=DEFAULT_PIPELINE,
                   help="pipeline entry point module:function (default %(default)s)")
    s.add_argument("--preset", default=None,
                   help="check at start-up that this preset can run here (CUDA, gsplat, nvdiffrast)")
    s.add_argument("--queue-limit", type=int, default=16, help="most queued jobs (default %(default)s)")
    s.add_argument("--cancel-timeout", type=float, default=5.0,
                   help="seconds a cancelled job may take to stop before the worker is killed (default %(default)s)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker count: N local processes, one GPU each (default 1), or with --ray N actors "
                        "(default: one per GPU of the cluster)")
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the workers as Ray actors on the cluster at ADDRESS ('auto': the one `ray start` "
                        "made; 'host:port'; 'local': a private one-machine instance); needs conjure[farm]")
    s.add_argument("--curve-keys", type=Path, default=None,
                   help="CurveZMQ key folder: server.key_secret + clients/*.key allow-list")
    s.add_argument("--log-level", default="WARNING")

    g = sub.add_parser("generate", help="run the pipeline in this process and write a GLB")
    g.add_argument("prompt")
    g.add_argument("--out", type=Path, required=True, help="output GLB path (OBJ/MTL/PNG go next to it)")
    g.add_argument("--preset", default="auto",
                   help="draft | standard | high | cpu | auto (standard with CUDA, cpu without; default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="preset override, e.g. --set coarse.steps=300 (repeatable)")
    g.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=argparse.SUPPRESS)
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    from backend.texture_cli import add_parser as add_texture_parser

    add_texture_parser(sub)

    j = sub.add_parser("jobs", help="list the jobs in the data directory")
    j.add_argument("--data-dir", type=Path, default=None)
    j.add_argument("--json", action="store_true", help="print JSON records")

    k = sub.add_parser("keys", help="create CurveZMQ keys for a network bind")
    k.add_argument("--dir", type=Path, required=True)
    k.add_argument("--client", action="append", default=[], help="client name to create and allow (repeatable)")
    add_model_commands(sub)
    return p


def add_model_commands(sub) -> None:
    """The ``models`` and ``doctor`` subcommands (see ``cmd_models`` / ``cmd_doctor``)."""
    m = sub.add_parser("models", help="list, download or remove guidance models (Hugging Face cache)")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="cached models (size, licence) and the known-good catalogue")
    ml.add_argument("--json", action="store_true", help="print JSON")
    mp = msub.add_parser("pull", help="download a model into the cache (resumes an interrupted download)")
    mp.add_argument("model_id")
    mp.add_argument("--quiet", action="store_true", help="no progress bar")
    mr = msub.add_parser("remove", help="delete a model from the cache")
    mr.add_argument("model_id")
    d = sub.add_parser("doctor", help="what this machine can run: GPU, CUDA toolkit, extensions, models")
    d.add_argument("--build", action="store_true",
                   help="also build/load the gsplat and nvdiffrast extensions now (can take minutes)")
    d.add_argument("--json", action="store_true", help="print JSON")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from backend.texture_cli import cmd_texture

        return {"serve": cmd_serve, "generate": cmd_generate, "texture": cmd_texture, "jobs": cmd_jobs,
                "keys": cmd_keys, "models": cmd_models, "doctor": cmd_doctor}[args.command](args)
    except KeyboardInterrupt:
        print("conjure-backend: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, code: int = 2) -> int:
    print(f"conjure-backend: error: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from backend.server.app import ServerConfig, ServerStartError, run_server
    from backend.server.jobs import default_data_dir

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServerConfig(
        data_dir=args.data_dir or default_data_dir(), connection_file=args.connection_file, ip=args.bind,
        port=args.port, advertise_ip=args.advertise_ip, pipeline=args.pipeline, preset=args.preset,
        queue_limit=args.queue_limit, cancel_timeout=args.cancel_timeout, curve_keys=args.curve_keys,
        workers=args.workers, ray=args.ray,
    )
    if not 0 <= cfg.port <= 65535:
        return _fail(f"--port must be in 0..65535, got {cfg.port}")
    if cfg.queue_limit < 1:
        return _fail("--queue-limit must be at least 1")
    if cfg.workers is not None and not 1 <= cfg.workers <= 256:
        return _fail(f"--workers must be between 1 and 256, got {cfg.workers}")
    if cfg.cancel_timeout <= 0:
        return _fail(f"--cancel-timeout must be more than 0 seconds, got {cfg.cancel_timeout:g}")
    try:
        return run_server(cfg)
    except ServerStartError as exc:
        return _fail(str(exc))


def cmd_keys(args: argparse.Namespace) -> int:
    from backend.server.security import SecurityError, make_keys

    try:
        written = make_keys(args.dir, args.client)
    except SecurityError as exc:
        return _fail(str(exc))
    for path in written:
        print(path)
    print(f"serve with: conjure-backend serve --bind 0.0.0.0 --curve-keys {args.dir}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from backend.server.jobs import RESULT_DIR, default_data_dir, read_data_dir

    data_dir = args.data_dir or default_data_dir()
    records = read_data_dir(data_dir)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    if not records:
        print(f"no jobs in {data_dir}")
        return 0
    print(f"{len(records)} job(s) in {data_dir}")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        prompt = r.prompt if len(r.prompt) <= 40 else r.prompt[:37] + "..."
        glb = r.results.get("glb")
        where = str(Path(data_dir) / r.job_id / RESULT_DIR / glb["name"]) if glb else (r.error or {}).get("code", "")
        print(f"{r.job_id}  {r.state:<11} {when}  {r.preset:<8} {prompt!r}  {where}")
    return 0


# ---------------------------------------------------------------------------- models / doctor
def cmd_models(args) -> int:
    from backend.models import CATALOGUE, ModelStoreError, cached_models, hub_cache_dir, pull, remove
    from backend.models.cache import human_size

    if args.models_command == "pull":
        try:
            path = pull(args.model_id, progress=not args.quiet)
        except ModelStoreError as exc:
            return _fail(str(exc), 1)
        print(f"{args.model_id}: ready in {path}")
        print(f"use it with: --set guidance.model={args.model_id}")
        return 0
    if args.models_command == "remove":
        try:
            freed = remove(args.model_id)
        except ModelStoreError as exc:
            return _fail(str(exc), 1)
        print(f"removed {args.model_id} ({human_size(freed)} freed)")
        return 0
    cached = cached_models()
    by_id = {m.id: m for m in cached}
    if args.json:
        print(json.dumps({
            "cache_dir": str(hub_cache_dir()),
            "cached": [{"id": m.id, "size_bytes": m.size_bytes, "licence": m.licence, "revisions": m.revisions,
                        "diffusers": m.diffusers, "path": str(m.snapshot) if m.snapshot else None} for m in cached],
            "catalogue": [{"id": e.id, "name": e.name, "kind": e.kind, "licence": e.licence, "role": e.role,
                           "present": e.kind == "bundled" or e.id in by_id} for e in CATALOGUE],
        }, indent=2))
        return 0
    print(f"model cache: {hub_cache_dir()}")
    if cached:
        print(f"{'cached model':<48} {'size':>10}  licence")
        for m in cached:
            note = "" if m.diffusers else "  (not a diffusers model)"
            print(f"{m.id:<48} {human_size(m.size_bytes):>10}  {m.licence or 'unknown'}{note}")
    else:
        print("no models in the cache")
    print()
    print("known-good models:")
    for e in CATALOGUE:
        present = e.kind == "bundled" or e.id in by_id
        mark = "present" if present else f"missing: conjure-backend models pull {e.id}"
        print(f"  {e.id:<46} {e.licence:<22} {e.role}  [{mark}]")
    return 0


def cmd_doctor(args) -> int:
    from backend.doctor import collect_report, format_report

    report = collect_report(build=args.build)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    return 0


# ---------------------------------------------------------------------------- generate
def _copy_durable(src: Path, dst: Path, rewrite: dict[str, str] | None = None) -> None:
    """Copy ``src`` to ``dst`` atomically and durably; optionally replace names in text files."""
    if rewrite:
        text = src.read_text(encoding="utf-8")
        for old, new in rewrite.items():
            text = text.replace(old, new)
        atomic_write_text(dst, text)
    else:
        atomic_copy(src, dst)


def export_next_to(files: dict, out: Path) -> dict[str, Path]:
    """Copy the GLB to ``out`` and OBJ/MTL/PNG to ``out`` with their suffixes (references rewritten)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    names = {kind: Path(p).name for kind, p in files.items()}
    targets = {kind: out.with_suffix("." + kind) if kind != "glb" else out for kind in files}
    rename = {names[k]: targets[k].name for k in ("mtl", "png") if k in files}
    for kind, src in files.items():
        if kind not in ("glb", "obj", "mtl", "png"):
            continue
        _copy_durable(Path(src), targets[kind], rename if kind in ("obj", "mtl") else None)
        written[kind] = targets[kind]
    return written


def cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent
    from backend.server.preflight import params_checker
    from backend.server.worker import PipelineSpecError, load_callable
    from protocol import ProtocolError, validate_params

    try:
        overrides = parse_sets(args.sets)
        params = validate_params({"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed,
                                  "preset": args.preset, "overrides": overrides})
    except (ValueError, ProtocolError) as exc:
        return _fail(getattr(exc, "message", str(exc)))
    if args.out.suffix.lower() != ".glb":
        return _fail(f"--out must end in .glb, got {args.out}")
    try:
        params_checker(args.pipeline)(params.preset, params.overrides)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        run_job = load_callable(args.pipeline)
    except PipelineSpecError as exc:
        return _fail(str(exc))
    if params.seed is None:
        import random

        params.seed = random.randrange(2**31)

    bar = None
    stage = [None]

    def emit(event):
        nonlocal bar
        if args.quiet:
            return
        if isinstance(event, ProgressEvent):
            from tqdm import tqdm

            if event.stage != stage[0]:
                if bar is not None:
                    bar.close()
                stage[0] = event.stage
                bar = tqdm(total=max(event.total, 1), desc=event.stage, unit="step", file=sys.stderr,
                           dynamic_ncols=True)
            if bar is not None:
                bar.total = max(event.total, 1)
                bar.n = min(event.step, bar.total)
                if event.message:
                    bar.set_postfix_str(event.message[:40], refresh=False)
                bar.refresh()
        elif isinstance(event, PreviewEvent) and bar is not None:
            bar.set_postfix_str(f"preview {len(event.mesh.positions)} verts", refresh=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".conjure-", dir=args.out.parent) as work:
        ctx = JobContext(out_dir=Path(work), emit=emit)
        try:
            result = run_job(params, ctx)
        except ValueError as exc:
            return _fail(str(exc))
        except Exception as exc:  # a clear one-line error instead of a traceback
            from backend.server.worker import classify_error

            code, _ = classify_error(exc)
            hint = ("; try a smaller preset such as 'draft' or 'cpu', or lower the resolutions"
                    if code == "out_of_memory" else "")
            if os.environ.get("CONJURE_DEBUG"):
                raise
            return _fail(f"the pipeline failed ({code}): {type(exc).__name__}: {exc}{hint}"
                         " (set CONJURE_DEBUG=1 for the traceback)", 1)
        finally:
            if bar is not None:
                bar.close()
        written = export_next_to(result.files, args.out)
    seconds = time.perf_counter() - t0
    info = result.info or {}
    print(f"wrote {written['glb']} ({written['glb'].stat().st_size} bytes) in {seconds:.1f} s")
    for kind in ("obj", "mtl", "png"):
        if kind in written:
            print(f"  also {written[kind]}")
    used = ", ".join(f"{k}: {info[k]}" for k in ("model", "renderer", "rasterizer", "device") if k in info)
    preset = (info.get("preset") or {}).get("name", params.preset)  # 'auto' resolved by the pipeline
    seed = info.get("seed", params.seed)
    print(f"preset {preset}, seed {seed}" + (f"; {used}" if used else ""))
    for warning in info.get("warnings") or []:  # last, so they are what the user reads
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
