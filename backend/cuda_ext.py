"""The CUDA extensions (gsplat, nvdiffrast): toolkit check, stale-lock cleanup, time-boxed build, real probe.

Both pinned packages compile their CUDA code on first use (torch.utils.cpp_extension JIT): gsplat's
``.cu`` files take about 33 CPU-minutes, nvdiffrast about one and needs the cuBLAS, cuSPARSE and
cuSOLVER headers. Importing the package proves nothing (gsplat's ``_C`` is None without a toolkit;
nvdiffrast builds inside its first call). So:

* ``toolkit_status()`` finds ``CUDA_HOME``/``nvcc`` (``$CUDA_HOME``, ``$CUDA_PATH``, ``nvcc`` on
  ``$PATH``, ``/usr/local/cuda`` — torch's order) and the headers the builds include, also in pip's
  ``nvidia-*`` wheels (handed to the build through ``CPATH``);
* ``find_stale_locks()`` finds torch's build ``lock`` files that no live process owns (torch's
  ``FileBaton`` keeps the file open while building, so the owner is whoever holds it open in
  ``/proc/*/fd``, or a PID written in the file); a worker killed mid-build leaves one, and every later
  build would wait on it forever;
* ``build_extension()`` builds in a child process (its own session, so the compiler processes die
  with it) under a time limit, then ``probe()`` checks IN THIS PROCESS that the extension really runs:
  gsplat's ``_C`` is not None and a one-Gaussian ``rasterization`` covers pixels; nvdiffrast's
  ``RasterizeCudaContext()`` constructs and a one-triangle ``rasterize`` covers pixels;
* ``start_warm_up()`` does both in background threads (``serve``'s worker and ``generate`` call it at
  start); ``usable(name)`` is what the renderers' ``auto`` choice asks: True only once the extension
  is ready, so a job that starts while gsplat builds, or after a failed build, uses the PyTorch twin;
  ``status_lines()`` are the plain lines jobs show ("renderer: building gsplat (40 s)").

Environment: ``CONJURE_BUILD_TIMEOUT_S`` (default 1200 s per extension), ``CONJURE_NO_CUDA_EXT=1``
(never build or load the extensions; always the PyTorch twins; or a comma list such as ``gsplat``),
``MAX_JOBS`` (compiler jobs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUILD_TIMEOUT_S = 1200.0
#: a lock with no owner information at all (no /proc to look in) counts as stale after this long
STALE_LOCK_AGE_S = 900.0
#: headers the JIT builds include: gsplat needs the runtime, nvdiffrast (via ATen/cuda/CUDAContext.h) all of them
HEADERS = {
    "cuda_runtime.h": "CUDA runtime",
    "cublas_v2.h": "cuBLAS",
    "cusparse.h": "cuSPARSE",
    "cusolverDn.h": "cuSOLVER",
}


@dataclass(frozen=True)
class ExtensionSpec:
    """One CUDA extension: ``package`` to import, torch ``build_name`` (its build folder), the headers
    its build needs, and ``command`` to run the build + probe in a child (default: ``probe`` in a
    fresh interpreter)."""

    name: str
    package: str
    build_name: str
    headers: tuple[str, ...]
    command: tuple[str, ...] | None = None
    prebuilt_glob: str | None = None   # a compiled module shipped inside the package (no JIT build needed)


EXTENSIONS: dict[str, ExtensionSpec] = {
    "gsplat": ExtensionSpec("gsplat", "gsplat", "gsplat_cuda", ("cuda_runtime.h",), prebuilt_glob="csrc*.so"),
    # nvdiffrast names its torch extension after its own and torch's versions (nvdiffrast/torch/ops.py)
    "nvdiffrast": ExtensionSpec("nvdiffrast", "nvdiffrast", "nvdiffrast_plugin_{version}_torch{torch}", tuple(HEADERS)),
}


@dataclass
class ExtensionStatus:
    """state: "pending" (nothing tried), "building", "ready", "failed" or "unavailable" (no CUDA,
    package missing, no toolkit and not built); detail: the plain reason; seconds: build/probe time."""

    name: str
    state: str = "pending"
    detail: str = ""
    seconds: float | None = None
    started: float | None = None
    stale_locks_removed: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One plain line for clients, e.g. 'renderer: building gsplat (42 s so far)'."""
        if self.state == "building":
            since = f" ({time.monotonic() - self.started:.0f} s so far)" if self.started else ""
            return f"renderer: building {self.name}{since}; the PyTorch renderer stands in until it is ready"
        if self.state == "ready":
            return f"renderer: {self.name} ready" + (f" ({self.seconds:.0f} s)" if self.seconds else "")
        if self.state == "failed":
            return f"renderer: {self.name} failed ({self.detail}); using the PyTorch renderer instead"
        if self.state == "unavailable":
            return f"renderer: {self.name} unavailable ({self.detail}); using the PyTorch renderer"
        return f"renderer: {self.name} not checked yet"


# --------------------------------------------------------------------------------------------- toolkit
@dataclass
class ToolkitStatus:
    """cuda_home / nvcc paths (None when missing), headers {name: directory or None}, include_dirs to add
    to CPATH for a build (pip nvidia-* wheels), and problem(ext) -> None or a plain reason."""

    cuda_home: str | None
    nvcc: str | None
    headers: dict[str, str | None]
    include_dirs: list[str]

    def problem(self, needed: tuple[str, ...] = tuple(HEADERS)) -> str | None:
        if self.nvcc is None:
            return ("no CUDA toolkit: nvcc not found (CUDA_HOME=" + (self.cuda_home or "unset")
                    + "); install the CUDA toolkit matching torch, or set CUDA_HOME")
        missing = [h for h in needed if self.headers.get(h) is None]
        if missing:
            libs = ", ".join(HEADERS.get(h, h) for h in missing)
            return (f"the CUDA toolkit at {self.cuda_home} lacks {', '.join(missing)} ({libs} headers); install the "
                    f"toolkit's development packages or pip's nvidia-cublas/cusparse/cusolver wheels")
        return None


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parents[1])
    return "/usr/local/cuda" if Path("/usr/local/cuda").is_dir() else None


def _pip_nvidia_include_dirs() -> list[str]:
    import site

    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + list(sys.path)
    out = []
    for root in dict.fromkeys(roots):
        base = Path(root) / "nvidia"
        if base.is_dir():
            out += [str(d) for d in sorted(base.glob("*/include")) if d.is_dir()]
    return list(dict.fromkeys(out))


def toolkit_status() -> ToolkitStatus:
    """Where the CUDA toolkit and the headers the extension builds include are (read from the environment now)."""
    home = _find_cuda_home()
    nvcc = None
    if home and Path(home, "bin", "nvcc").is_file():
        nvcc = str(Path(home, "bin", "nvcc"))
    elif not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        nvcc = shutil.which("nvcc")
    toolkit_dirs = []
    if home:
        toolkit_dirs = [str(Path(home, "include"))] + [str(p) for p in sorted(Path(home).glob("targets/*/include"))]
    cpath = [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d]
    pip_dirs = _pip_nvidia_include_dirs()
    headers: dict[str, str | None] = {}
    extra: list[str] = []
    for h in HEADERS:
        found = next((d for d in toolkit_dirs + cpath if Path(d, h).is_file()), None)
        if found is None:
            found = next((d for d in pip_dirs if Path(d, h).is_file()), None)
            if found is not None:
                extra.append(found)
        headers[h] = found
    return ToolkitStatus(home, nvcc, headers, list(dict.fromkeys(extra)))


# ----------------------------------------------------------------------------------------------- locks
def build_name(spec: ExtensionSpec) -> str:
    """The torch extension name of ``spec``: ``{version}`` (the package's) and ``{torch}`` filled in, then
    sanitised as the packages do (non-word characters to '_')."""
    name = spec.build_name
    if "{" not in name:
        return name
    import re

    import torch

    version = "unknown"
    if "{version}" in name:
        try:
            version = __import__(spec.package).__version__
        except Exception:
            pass
    return re.sub(r"\W|^(?=\d)", "_", name.format(version=version, torch=torch.__version__))


def build_dir(spec: ExtensionSpec) -> Path:
    """torch.utils.cpp_extension's build folder of ``spec`` (same rule, without creating it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / build_name(spec)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    acc = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
           f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}" / build_name(spec)


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_holders(lock: Path) -> list[int] | None:
    """PIDs that have ``lock`` open (from ``/proc/*/fd``); None when ``/proc`` cannot be read."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    if os.readlink(fd) == target:
                        holders.append(int(entry.name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return holders


def lock_owners(lock: Path) -> tuple[list[int], bool]:
    """(owner PIDs, whether ownership could be determined): a PID written in the file, plus holders."""
    pids = []
    try:
        text = lock.read_text(errors="replace").strip()
    except OSError:
        text = ""
    if text.split() and text.split()[0].isdigit():
        pids.append(int(text.split()[0]))
    holders = lock_holders(lock)
    if holders is not None:
        pids += holders
    return list(dict.fromkeys(pids)), holders is not None or bool(pids)


def is_stale(lock: Path) -> bool:
    """True when no live process owns ``lock`` (or, with nothing to go on, when it is older than 15 min)."""
    owners, known = lock_owners(lock)
    if owners:
        return not any(pid_alive(p) for p in owners)
    if known:
        return True
    try:
        return time.time() - lock.stat().st_mtime > STALE_LOCK_AGE_S
    except OSError:
        return False


def find_stale_locks(dirs: list[Path]) -> list[Path]:
    """Build ``lock`` files in ``dirs`` that no live process owns."""
    return [d / "lock" for d in dirs if (d / "lock").exists() and is_stale(d / "lock")]


def remove_stale_locks(dirs: list[Path]) -> list[Path]:
    """Delete the stale locks in ``dirs`` (logged); return what was removed."""
    removed = []
    for lock in find_stale_locks(dirs):
        try:
            lock.unlink()
            removed.append(lock)
            log.warning("removed a stale build lock %s (its owner is gone)", lock)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    ok: bool
    detail: str
    seconds: float
    timed_out: bool = False
    pid: int | None = None


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error:", "assert", "FAILED", "fatal")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_build(command: list[str], timeout_s: float, env: dict | None = None, cwd: Path | None = None) -> BuildResult:
    """Run a build/probe ``command`` in its own session; kill the whole group after ``timeout_s``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(cwd) if cwd else None, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return BuildResult(False, f"the build timed out after {timeout_s:.0f} s", time.monotonic() - t0, True,
                           proc.pid)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        return BuildResult(False, _last_error_line(out or ""), seconds, False, proc.pid)
    return BuildResult(True, "built and probed in a child process", seconds, False, proc.pid)


def probe(name: str) -> str:
    """Check IN THIS PROCESS that extension ``name`` loads and runs on CUDA; return a short note or raise."""
    import torch

    dev = torch.device("cuda")
    if name == "gsplat":
        from gsplat.cuda._backend import _C

        if _C is None:
            raise RuntimeError("gsplat's CUDA extension did not load (gsplat.cuda._backend._C is None)")
        from gsplat import rasterization

        means = torch.tensor([[0.0, 0.0, 2.0]], device=dev)
        quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=dev)
        scales = torch.full((1, 3), 0.3, device=dev)
        K = torch.tensor([[[8.0, 0.0, 4.0], [0.0, 8.0, 4.0], [0.0, 0.0, 1.0]]], device=dev)
        img, alpha, _ = rasterization(means, quats, scales, torch.ones(1, device=dev), torch.ones(1, 3, device=dev),
                                      torch.eye(4, device=dev)[None], K, 8, 8)
        covered = int((alpha > 0.1).sum())
        if covered == 0:
            raise RuntimeError("gsplat's one-Gaussian test render came out empty")
        return f"one-Gaussian render covered {covered} px"
    if name == "nvdiffrast":
        import nvdiffrast.torch as dr

        ctx = dr.RasterizeCudaContext(device=dev)
        pos = torch.tensor([[[-0.8, -0.8, 0.0, 1.0], [0.8, -0.8, 0.0, 1.0], [0.0, 0.8, 0.0, 1.0]]], device=dev)
        rast, _ = dr.rasterize(ctx, pos, torch.tensor([[0, 1, 2]], dtype=torch.int32, device=dev), resolution=[8, 8])
        covered = int((rast[..., 3] > 0).sum())
        if covered == 0:
            raise RuntimeError("nvdiffrast's one-triangle test rasterisation came out empty")
        return f"one-triangle rasterise covered {covered} px"
    raise ValueError(f"unknown extension {name!r}")


def _has_prebuilt(spec: ExtensionSpec) -> bool:
    if spec.prebuilt_glob is None:
        return False
    found = importlib.util.find_spec(spec.package)
    roots = list(found.submodule_search_locations or []) if found is not None else []
    return any(any(Path(r).glob(spec.prebuilt_glob)) for r in roots)


def _child_command(spec: ExtensionSpec) -> list[str]:
    if spec.command is not None:
        return list(spec.command)
    return [sys.executable, "-c", f"from backend.cuda_ext import probe; print(probe({spec.name!r}))"]


def _child_env(tk: ToolkitStatus) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if tk.include_dirs:
        env["CPATH"] = os.pathsep.join(tk.include_dirs + [p for p in env.get("CPATH", "").split(os.pathsep) if p])
    if tk.cuda_home and not env.get("CUDA_HOME"):
        env["CUDA_HOME"] = tk.cuda_home
    env.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 2) - 1)))
    return env


def disabled(name: str) -> bool:
    """``CONJURE_NO_CUDA_EXT`` = 1/true/all (every extension) or a comma list of names (e.g. "gsplat")."""
    value = os.environ.get("CONJURE_NO_CUDA_EXT", "").strip().lower()
    if value in ("1", "true", "yes", "all"):
        return True
    return name.lower() in {v.strip() for v in value.split(",") if v.strip()}


def build_extension(spec: ExtensionSpec, timeout_s: float | None = None, *,
                    require_cuda: bool = True) -> ExtensionStatus:
    """Make ``spec`` usable or say why not: stale locks removed, toolkit checked, built in a time-boxed
    child, then probed in this process (a spec with its own ``command`` is judged by that command
    alone). Never raises for an ordinary failure."""
    load_in_process = spec.command is None
    timeout_s = float(timeout_s if timeout_s is not None else
                      os.environ.get("CONJURE_BUILD_TIMEOUT_S", DEFAULT_BUILD_TIMEOUT_S))
    st = ExtensionStatus(spec.name)
    if disabled(spec.name):
        st.state, st.detail = "unavailable", "disabled by CONJURE_NO_CUDA_EXT"
        return st
    if require_cuda:
        import torch

        if not torch.cuda.is_available():
            st.state, st.detail = "unavailable", "no CUDA device"
            return st
    if spec.command is None and importlib.util.find_spec(spec.package) is None:
        st.state, st.detail = "unavailable", f"{spec.package} is not installed (pip install '.[gpu]')"
        return st
    bdir = build_dir(spec)
    st.stale_locks_removed = [str(p) for p in remove_stale_locks([bdir])]
    # another live process is building it (e.g. the build of a worker that was replaced): wait for it rather
    # than start a second build in the same folder (gsplat deletes the folder before building)
    deadline = time.monotonic() + timeout_s
    while (bdir / "lock").exists() and not is_stale(bdir / "lock") and time.monotonic() < deadline:
        time.sleep(0.5)
    st.stale_locks_removed += [str(p) for p in remove_stale_locks([bdir])]
    built = (bdir / f"{build_name(spec)}.so").exists() or _has_prebuilt(spec)
    tk = toolkit_status()
    problem = tk.problem(spec.headers)
    if not built and problem:
        st.state, st.detail = "unavailable", f"not built, and {problem}"
        return st
    st.state, st.started = "building", time.monotonic()
    if built and load_in_process and not (bdir / "lock").exists():
        try:  # built before: loading is quick, no child needed
            st.detail = probe(spec.name)
            st.state, st.seconds = "ready", time.monotonic() - st.started
            return st
        except Exception as exc:
            log.warning("%s is built but did not load (%s: %s); rebuilding", spec.name, type(exc).__name__, exc)
    res = run_build(_child_command(spec), timeout_s, env=_child_env(tk), cwd=REPO_ROOT)
    if res.timed_out:
        remove_stale_locks([bdir])  # the killed build's lock: its owner is gone now
    if not res.ok:
        st.state, st.detail, st.seconds = "failed", res.detail, res.seconds
        return st
    if load_in_process:
        try:
            note = probe(spec.name)
        except Exception as exc:
            st.state, st.detail = "failed", f"loads in a child but not here: {type(exc).__name__}: {exc}"
            st.seconds = time.monotonic() - st.started
            return st
        st.detail = note
    else:
        st.detail = res.detail
    st.state, st.seconds = "ready", time.monotonic() - st.started
    return st


# --------------------------------------------------------------------------------------- process state
_STATUS: dict[str, ExtensionStatus] = {}
_THREADS: dict[str, threading.Thread] = {}
_LOCK = threading.Lock()


def status(name: str) -> ExtensionStatus:
    """The current status of extension ``name`` in this process."""
    with _LOCK:
        return _STATUS.setdefault(name, ExtensionStatus(name))


def _set(st: ExtensionStatus) -> None:
    with _LOCK:
        _STATUS[st.name] = st
    level = logging.WARNING if st.state == "failed" else logging.INFO
    log.log(level, "%s", st.line())


def register(spec: ExtensionSpec) -> None:
    """Add an extension spec (tests register fakes whose ``command`` stands in for the build)."""
    EXTENSIONS[spec.name] = spec


def ensure(name: str, timeout_s: float | None = None) -> ExtensionStatus:
    """Build/probe ``name`` now in this thread (unless already done) and record the result."""
    st = status(name)
    if st.state in ("ready", "failed", "unavailable"):
        return st
    with _LOCK:
        running = _THREADS.get(name)
    if running is not None and running is not threading.current_thread():
        running.join(timeout_s)
        return status(name)
    building = ExtensionStatus(name, "building", started=time.monotonic())
    _set(building)
    result = build_extension(EXTENSIONS[name], timeout_s)
    _set(result)
    return result


def start_warm_up(names: tuple[str, ...] = ("nvdiffrast", "gsplat"), timeout_s: float | None = None,
                  require_cuda: bool = True) -> list[str]:
    """Start building/probing the extensions in background threads (idempotent); return status lines.

    Without CUDA nothing starts and every extension is marked unavailable at once.
    """
    import torch

    cuda = torch.cuda.is_available() or not require_cuda
    started = []
    for name in names:
        with _LOCK:
            st = _STATUS.setdefault(name, ExtensionStatus(name))
            if st.state != "pending" or name in _THREADS:
                continue
            if not cuda:
                _STATUS[name] = ExtensionStatus(name, "unavailable", "no CUDA device")
                continue
            _STATUS[name] = ExtensionStatus(name, "building", started=time.monotonic())
            thread = threading.Thread(target=_warm_one, args=(name, timeout_s, require_cuda), name=f"warm-{name}",
                                      daemon=True)
            _THREADS[name] = thread
        thread.start()
        started.append(name)
    return status_lines(names)


def _warm_one(name: str, timeout_s: float | None, require_cuda: bool = True) -> None:
    try:
        _set(build_extension(EXTENSIONS[name], timeout_s, require_cuda=require_cuda))
    except Exception as exc:
        _set(ExtensionStatus(name, "failed", f"{type(exc).__name__}: {exc}"))


def wait(name: str, timeout_s: float | None = None) -> ExtensionStatus:
    """Wait for a running warm-up of ``name`` (at most ``timeout_s``); return its status."""
    with _LOCK:
        thread = _THREADS.get(name)
    if thread is not None:
        thread.join(timeout_s)
    return status(name)


def usable(name: str) -> bool:
    """True when ``name`` is built and probed in this process. Never waits for a running build; with no
    warm-up started yet it checks now (quick when already built, time-boxed otherwise)."""
    st = status(name)
    if st.state == "pending":
        st = ensure(name)
    return st.state == "ready"


def status_lines(names: tuple[str, ...] = ("gsplat", "nvdiffrast")) -> list[str]:
    """One line per extension that has something to say (nothing for 'pending')."""
    return [status(n).line() for n in names if status(n).state != "pending"]


def warnings() -> list[str]:
    """Lines for extensions that failed to build/load (the client shows these as warnings)."""
    return [status(n).line() for n in EXTENSIONS if status(n).state == "failed"]


def reset_for_tests() -> None:
    """Forget every status (tests only; running warm-up threads are left to finish)."""
    with _LOCK:
        _STATUS.clear()
        _THREADS.clear()
