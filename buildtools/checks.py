"""Checks of what the build made: static checks of each zip and the backend wheel, Blender's own
extension validator, and installs into bpy 5.0.1 and Debian's Blender 3.4 (each in a fresh user
folder) that run the probe scripts in ``buildtools/probes/``."""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .common import (
    ADDON_MODULE,
    ADDON_SRC,
    EXTENSION_PYTHONS,
    LEGACY_PYTHONS,
    MANIFEST_REQUIRED,
    PLATFORM_INTERPRETER_TAG,
    PLATFORMS,
    PYZMQ_VERSION,
    REPO_PACKAGES,
    SEMVER,
    clean_env,
    log,
    project_version,
    protocol_version,
)
from .package import Artifact, BuildResult

#: the scripts the install checks run inside Blender (real files, linted like the rest)
PROBES = Path(__file__).resolve().parent / "probes"


@dataclass
class Check:
    target: str
    name: str
    ok: bool | None  # None = skipped
    detail: str = ""


def _load_deps_module():
    """The add-on's ``_deps.py`` (stdlib only at import) for its wheel-fit rule."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_conjure_deps_for_build", ADDON_SRC / "_deps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def blender_ext_cli() -> Path | None:
    """Blender's own extension command-line tool from the installed ``bpy`` (stdlib-only script)."""
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.origin:
        return None
    base = Path(spec.origin).resolve().parent  # .../site-packages/bpy/5.0/scripts/modules/bpy or .../bpy
    for cand in [base, *base.parents][:6]:
        hits = sorted(cand.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")) + sorted(
            cand.glob("scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if hits:
            return hits[0]
    return None


def scan_absolute_imports(source: str, filename: str) -> list[str]:
    """Absolute imports of repository packages (``import protocol``, ``from backend.x import y``...).

    An import inside an ``except ImportError`` handler is a repository fallback that the vendored
    copy makes unreachable, so it is allowed. Returns "file:line: statement" strings.
    """
    tree = ast.parse(source, filename)
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = []
                t = handler.type
                for n in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(n, ast.Name):
                        names.append(n.id)
                if {"ImportError", "ModuleNotFoundError"} & set(names):
                    for sub in handler.body:
                        for inner in ast.walk(sub):
                            allowed.add(id(inner))
    bad = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        for m in mods:
            if m.split(".")[0] in REPO_PACKAGES:
                bad.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return bad


def blender_python_versions(wheel_names: Iterable[str]) -> set[str]:
    """The ``python_versions`` Blender derives from a manifest's wheels (bl_pkg's rule: a stable-ABI
    wheel counts as plain "3", and "3" is dropped when any "3.x" is present)."""
    major_only, major_minor = set(), set()
    for name in wheel_names:
        parts = name[:-4].split("-")
        py, abi = parts[-3], parts[-2]
        if any(t.startswith("abi") and t[3:].isdigit() for t in abi.split(".")):
            major_only.update(t[3:] for t in abi.split(".") if t.startswith("abi") and t[3:].isdigit())
            continue
        for t in py.split("."):
            digits = t[2:]
            if len(digits) > 1:
                major_minor.add(f"{digits[0]}.{digits[1:]}")
            else:
                major_only.add(digits)
    major_only -= {v.split(".")[0] for v in major_minor}
    return major_only | major_minor


def check_zip_contents(art: Artifact, version: str, proto: tuple[str, int]) -> list[Check]:
    """Static checks of one add-on zip (extension or legacy)."""
    t = art.path.name
    checks: list[Check] = []
    prefix = f"{ADDON_MODULE}/" if art.kind == "legacy" else ""
    with zipfile.ZipFile(art.path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        bad_names = [n for n in names if "__pycache__" in n.split("/") or n.endswith((".pyc", ".pyo"))]
        checks.append(Check(t, "no __pycache__/.pyc", not bad_names, ", ".join(bad_names[:5])))
        unsafe = [n for n in names if n.startswith("/") or ".." in n.split("/") or "\\" in n
                  or not n.startswith(prefix)]
        links = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
        checks.append(Check(t, "paths relative, under one root, no links", not unsafe and not links,
                            ", ".join((unsafe + links)[:5])))
        bad_dupes = len(names) != len(set(names))
        checks.append(Check(t, "no duplicate entries", not bad_dupes))

        def read(rel: str) -> bytes | None:
            try:
                return zf.read(prefix + rel)
            except KeyError:
                return None

        init = read("__init__.py")
        ok = init is not None
        detail = ""
        if init is not None:
            tree = ast.parse(init, "__init__.py")
            funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            ok = {"register", "unregister"} <= funcs
            detail = "" if ok else f"functions: {sorted(funcs)}"
        checks.append(Check(t, "__init__.py with register/unregister", ok, detail))

        required = ["protocol/__init__.py", "_build_info.py", "_deps.py", "backend_src/pyproject.toml",
                    "backend_src/backend/__init__.py", "backend_src/protocol/__init__.py"]
        missing = [r for r in required if read(r) is None]
        checks.append(Check(t, "vendored protocol, build info, backend sources", not missing,
                            "missing " + ", ".join(missing) if missing else ""))

        info_src = read("_build_info.py")
        if info_src is not None:
            ns: dict = {}
            exec(compile(info_src, "_build_info.py", "exec"), ns)  # our own generated constants
            ok = (ns.get("VERSION") == version and ns.get("PROTOCOL_MAJOR") == proto[1]
                  and ns.get("BUILD_KIND") == art.kind)
            checks.append(Check(t, "_build_info VERSION/PROTOCOL_MAJOR", ok,
                                f"{ns.get('VERSION')} / protocol {ns.get('PROTOCOL_MAJOR')}"))

        # Absolute imports of repo packages in the add-on part (wheels and backend sources excluded).
        offenders: list[str] = []
        n_py = 0
        for n in names:
            rel = n[len(prefix):]
            if not rel.endswith(".py") or rel.startswith(("backend_src/", "wheels/")):
                continue
            n_py += 1
            try:
                offenders += scan_absolute_imports(zf.read(n).decode("utf-8"), rel)
            except SyntaxError as e:
                offenders.append(f"{rel}: syntax error {e}")
        checks.append(Check(t, "no absolute imports of protocol/backend", not offenders,
                            "; ".join(offenders[:5]) or f"{n_py} .py files scanned"))

        wheel_files = sorted(n[len(prefix) + len("wheels/"):] for n in names
                             if n.startswith(prefix + "wheels/") and n.endswith(".whl"))
        if art.kind == "legacy":
            stamped = None
            if init is not None:
                for node in ast.parse(init).body:
                    if isinstance(node, ast.Assign) and any(getattr(x, "id", "") == "bl_info" for x in node.targets):
                        stamped = ast.literal_eval(node.value)
            want = tuple(int(x) for x in version.split("-")[0].split("+")[0].split("."))
            ok = bool(stamped) and tuple(stamped.get("version", ())) == want and tuple(
                stamped.get("blender", (9,))) <= (3, 4, 0)
            checks.append(Check(t, "bl_info version == pyproject, blender <= 3.4", ok,
                                f"{stamped.get('version') if stamped else None}, blender "
                                f"{stamped.get('blender') if stamped else None}"))
            checks += _check_wheel_coverage(t, wheel_files, LEGACY_PYTHONS, art.platforms)
        else:
            raw = zf.read("blender_manifest.toml") if "blender_manifest.toml" in names else None
            checks += check_manifest(t, raw, wheel_files, version)
            checks += _check_wheel_coverage(t, wheel_files, EXTENSION_PYTHONS, art.platforms)
    checks.append(Check(t, "size", True, f"{art.size / 1e6:.2f} MB"))
    return checks


def check_manifest(t: str, raw: bytes | None, wheel_files: list[str], version: str) -> list[Check]:
    if raw is None:
        return [Check(t, "blender_manifest.toml at the zip root", False)]
    try:
        m = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return [Check(t, "manifest parses", False, str(e))]
    out = []
    missing = [k for k in MANIFEST_REQUIRED if not m.get(k)]
    out.append(Check(t, "manifest required keys", not missing, ", ".join(missing)))
    out.append(Check(t, "manifest version == pyproject, semver",
                     m.get("version") == version and bool(SEMVER.match(str(m.get("version")))),
                     str(m.get("version"))))
    out.append(Check(t, "manifest type add-on, id", m.get("type") == "add-on" and m.get("id") == ADDON_MODULE,
                     f"{m.get('type')} / {m.get('id')}"))
    perms = m.get("permissions") or {}
    ok = isinstance(perms, dict) and all(isinstance(perms.get(k), str) and perms.get(k) for k in ("network",
                                                                                                 "files"))
    out.append(Check(t, "permissions network + files with reasons", ok, ", ".join(sorted(perms))))
    listed = [w for w in m.get("wheels", [])]
    listed_names = sorted(w.rsplit("/", 1)[-1] for w in listed)
    missing_w = [w for w in listed if w.rsplit("/", 1)[-1] not in wheel_files or not w.startswith("./wheels/")]
    extra_w = [w for w in wheel_files if w not in listed_names]
    out.append(Check(t, "every listed wheel present (and none unlisted)", bool(listed) and not missing_w
                     and not extra_w, f"{len(listed)} wheels" + (f"; missing {missing_w}" if missing_w else "")
                     + (f"; unlisted {extra_w}" if extra_w else "")))
    pv = blender_python_versions(listed_names)
    want = set(EXTENSION_PYTHONS)
    out.append(Check(t, "Blender reads python_versions 3.11 + 3.13", want <= pv, ", ".join(sorted(pv))))
    plats = m.get("platforms") or []
    out.append(Check(t, "platforms listed", bool(plats) and all(p in PLATFORMS for p in plats), ", ".join(plats)))
    return out


def _check_wheel_coverage(t: str, wheel_files, pythons, platforms) -> list[Check]:
    """Every (platform, python) gets exactly one fitting pyzmq wheel by the add-on's own rule."""
    try:
        deps = _load_deps_module()
    except Exception as e:  # reported as a failed check
        return [Check(t, "pyzmq wheel for every platform x python", False, f"_deps.py: {e}")]
    gaps = []
    for plat in platforms:
        for py in pythons:
            vi = tuple(int(x) for x in py.split("."))
            fits = [w for w in wheel_files if deps.wheel_fits(w, vi, PLATFORM_INTERPRETER_TAG[plat])]
            if not fits:
                gaps.append(f"{plat}/py{py}")
    return [Check(t, "pyzmq wheel for every platform x python", not gaps,
                  ("none for " + ", ".join(gaps)) if gaps else f"{len(platforms)} platforms x {len(pythons)}")]


def check_with_blender_validator(art: Artifact) -> Check:
    cli = blender_ext_cli()
    if cli is None:
        return Check(art.path.name, "Blender's own validator", None, "bpy not installed")
    proc = subprocess.run([sys.executable, str(cli), "validate", "--valid-tags=", str(art.path)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    text = (proc.stdout + proc.stderr).strip().replace("\n", " ")
    return Check(art.path.name, "Blender's own validator (bl_pkg validate)", proc.returncode == 0, text[-300:])


def check_backend_wheel(art: Artifact, version: str) -> list[Check]:
    t = art.path.name
    out = []
    with zipfile.ZipFile(art.path) as zf:
        names = zf.namelist()
        dist_info = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(dist_info[0]).decode() if dist_info else ""
        eps = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        ep_text = zf.read(eps[0]).decode() if eps else ""
    out.append(Check(t, "wheel version == pyproject", f"\nVersion: {version}\n" in meta, version))
    m = re.search(r"^conjure-backend\s*=\s*([\w.]+):(\w+)", ep_text, re.M)
    target = m.group(1).replace(".", "/") + ".py" if m else ""
    out.append(Check(t, "conjure-backend entry point", bool(m) and target in names,
                     f"{m.group(1)}:{m.group(2)}" + ("" if target in names else f" ({target} not in wheel)")
                     if m else "no console script"))
    out.append(Check(t, "extra [gpu] declared", "Provides-Extra: gpu" in meta))
    pkgs = {n.split("/")[0] for n in names if n.endswith("/__init__.py") and n.count("/") == 1}
    out.append(Check(t, "packages backend + protocol", {"backend", "protocol"} <= pkgs, ", ".join(sorted(pkgs))))
    out.append(Check(t, "size", True, f"{art.size / 1e6:.2f} MB"))
    return out


def check_backend_wheel_installs(art: Artifact) -> Check:
    """``pip install --no-deps --prefix`` into a temp folder and run ``conjure-backend --help``."""
    t = art.path.name
    with tempfile.TemporaryDirectory(prefix="conjure-whl-inst-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                               "--disable-pip-version-check", "--prefix", tmp, str(art.path)],
                              capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp)
        if proc.returncode != 0:
            return Check(t, "installs; conjure-backend --help runs", False, proc.stderr[-300:])
        script = Path(tmp) / "bin" / "conjure-backend"
        if not script.exists():
            return Check(t, "installs; conjure-backend --help runs", False, "no bin/conjure-backend script")
        site = next(Path(tmp).glob("lib/python*/site-packages"))
        env = clean_env(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp)
        first = (run.stdout or run.stderr).strip().splitlines()[:1]
        return Check(t, "installs; conjure-backend --help runs", run.returncode == 0,
                     first[0][:80] if first else f"exit {run.returncode}: {run.stderr[-200:]}")


def _parse_result(proc: subprocess.CompletedProcess) -> dict | None:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT:"):
            return json.loads(line[len("RESULT:"):])
    return None


def _install_checks(t: str, res: dict | None, proc, seconds: float, want_version: str) -> list[Check]:
    if res is None:
        tail = (proc.stdout + proc.stderr)[-800:].replace("\n", " | ")
        return [Check(t, "install + enable", False, f"exit {proc.returncode}: {tail}")]
    out = [
        Check(t, "install + enable", bool(res.get("enabled")) and not res.get("error"),
              f"{seconds:.1f} s" + (f"; {res.get('error')}" if res.get("error") else "")),
        Check(t, "panel registered", bool(res.get("panels")), ", ".join(res.get("panels") or [])),
        Check(t, "operators registered", {"generate", "cancel"} <= set(res.get("operators") or []),
              f"{len(res.get('operators') or [])} in bpy.ops.conjure"),
        Check(t, "_build_info.VERSION", res.get("build_version") == want_version, str(res.get("build_version"))),
        Check(t, "zmq from the bundled wheel", bool(res.get("zmq_under_user"))
              and res.get("zmq_version") == PYZMQ_VERSION and bool(res.get("zmq_socket")),
              f"pyzmq {res.get('zmq_version')} from <user>/{res.get('zmq_rel')}" if res.get("zmq_rel") else
              f"pyzmq {res.get('zmq_version')} from {res.get('zmq_file')} (NOT under the user folder) "
              f"{res.get('zmq_error', '')}".strip()),
        Check(t, "disable unregisters the panel", not res.get("panels_after_disable"),
              ", ".join(res.get("panels_after_disable") or [])),
    ]
    return out


def check_install_bpy(art: Artifact, want_version: str) -> list[Check]:
    t = f"bpy 5.0.1 ← {art.path.name}"
    import importlib.util

    if importlib.util.find_spec("bpy") is None:
        return [Check(t, "install into bpy", None, "bpy not installed (pip install bpy==5.0.1)")]
    with tempfile.TemporaryDirectory(prefix="conjure-bpy-user-") as user:
        script = PROBES / "install_bpy.py"
        env = clean_env(BLENDER_USER_RESOURCES=str(Path(user) / "resources"), PYTHONNOUSERSITE="1")
        env.pop("CONJURE_BUNDLED_ZMQ", None)  # the extension path must load Blender's own wheel install
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), str(art.path), ADDON_MODULE], capture_output=True,
                              text=True, timeout=300, env=env, cwd=user)
        res = _parse_result(proc)
        checks = _install_checks(t, res, proc, time.perf_counter() - t0, want_version)
    return checks


def check_install_legacy(art: Artifact, want_version: str, blender: str | None = None) -> list[Check]:
    blender = blender or os.environ.get("CONJURE_BLENDER") or shutil.which("blender")
    t = f"blender 3.4 ← {art.path.name}"
    if not blender:
        return [Check(t, "install into Blender 3.4", None, "no `blender` on PATH (apt-get install blender)")]
    with tempfile.TemporaryDirectory(prefix="conjure-b34-user-") as user:
        script = PROBES / "install_legacy.py"
        env = clean_env(BLENDER_USER_SCRIPTS=str(Path(user) / "scripts"),
                   BLENDER_USER_CONFIG=str(Path(user) / "config"), BLENDER_USER_DATAFILES=str(Path(user) / "data"),
                   CONJURE_BUNDLED_ZMQ="1")  # the host may have python3-zmq; prove the bundled copy loads
        env.pop("CONJURE_DEPS_DIR", None)
        env.pop("PYTHONNOUSERSITE", None)
        # Debian's Blender embeds the system Python and finds its prefix through `python3` on PATH; a
        # pyenv/venv python3 first on PATH would hand it a foreign stdlib with no dist-packages.
        env["PATH"] = os.pathsep.join([str(Path(blender).resolve().parent), "/usr/bin", env.get("PATH", "")])
        t0 = time.perf_counter()
        proc = subprocess.run([blender, "-b", "--factory-startup", "-noaudio", "--python-exit-code", "1",
                               "--python", str(script), "--", str(art.path), ADDON_MODULE],
                              capture_output=True, text=True, timeout=300, env=env, cwd=user)
        res = _parse_result(proc)
        checks = _install_checks(t, res, proc, time.perf_counter() - t0, want_version)
        if res is not None:
            checks[0].detail = f"Blender {res.get('blender')}, Python {res.get('python')}; " + checks[0].detail
    return checks


def run_checks(result: BuildResult, *, blender: str | None = None, install: bool = True) -> list[Check]:
    version = project_version()
    proto = protocol_version()
    checks: list[Check] = []
    zips = result.of_kind("extension") + result.of_kind("legacy")
    if not zips:
        checks.append(Check("dist", "zips present", False, "no conjure zips; run build.py first"))
    for art in zips:
        checks += check_zip_contents(art, version, proto)
        if art.kind == "extension":
            checks.append(check_with_blender_validator(art))
    for art in result.of_kind("backend-wheel"):
        checks += check_backend_wheel(art, version)
    if install:
        here = "linux-x64"  # the check machines; pick the zip that serves this one
        ext = [a for a in result.of_kind("extension") if here in a.platforms]
        leg = [a for a in result.of_kind("legacy") if here in a.platforms]
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            f_whl = [pool.submit(check_backend_wheel_installs, a) for a in result.of_kind("backend-wheel")]
            f_bpy = pool.submit(check_install_bpy, ext[0], version) if ext else None
            f_leg = pool.submit(check_install_legacy, leg[0], version, blender) if leg else None
            checks += [f.result() for f in f_whl]
            if f_bpy:
                checks += f_bpy.result()
            else:
                checks.append(Check("bpy 5.0.1", "install into bpy", None, "no extension zip for linux-x64 built"))
            if f_leg:
                checks += f_leg.result()
            else:
                checks.append(Check("blender 3.4", "install into Blender 3.4", None,
                                    "no legacy zip for linux-x64 built"))
    return checks


def print_table(rows: list[Check]) -> None:
    mark = {True: "PASS", False: "FAIL", None: "skip"}
    w1 = max(len(r.target) for r in rows)
    w2 = max(len(r.name) for r in rows)
    log("")
    log(f"{'result':6}  {'target':{w1}}  {'check':{w2}}  detail")
    log(f"{'-' * 6}  {'-' * w1}  {'-' * w2}  {'-' * 30}")
    for r in rows:
        log(f"{mark[r.ok]:6}  {r.target:{w1}}  {r.name:{w2}}  {r.detail}")
    failed = sum(r.ok is False for r in rows)
    skipped = sum(r.ok is None for r in rows)
    log(f"\n{len(rows) - failed - skipped} passed, {failed} failed, {skipped} skipped")
