"""CUDA extension warm-up logic on the CPU: toolkit detection from the environment, stale build locks with
dead owners, a time-boxed build that really runs (and is really killed), fallback status lines.

The builds here are real child processes (python / sleep) standing in for the compiler; nothing about
the code under test is mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backend import cuda_ext
from backend.cuda_ext import ExtensionSpec


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    monkeypatch.delenv("CONJURE_NO_CUDA_EXT", raising=False)
    cuda_ext.reset_for_tests()
    yield
    cuda_ext.reset_for_tests()


def _fake_toolkit(root: Path, headers: tuple[str, ...]) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    for h in headers:
        (root / "include" / h).write_text("/* header */\n")
    return root


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not cuda_ext.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_missing_toolkit_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    tk = cuda_ext.toolkit_status()
    assert tk.nvcc is None
    assert "nvcc not found" in tk.problem()
    spec = ExtensionSpec("fakeext", "fakeext", "fakeext_cuda", ("cuda_runtime.h",),
                         command=(sys.executable, "-c", "raise SystemExit('must not run')"))
    st = cuda_ext.build_extension(spec, 5, require_cuda=False)
    assert st.state == "unavailable"
    assert st.detail.startswith("not built, and no CUDA toolkit: nvcc not found")
    assert "PyTorch renderer" in st.line()


def test_toolkit_without_the_math_library_headers(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path / "cuda", ("cuda_runtime.h",))
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.delenv("CPATH", raising=False)
    tk = cuda_ext.toolkit_status()
    assert tk.nvcc == str(home / "bin" / "nvcc")
    assert tk.problem(cuda_ext.EXTENSIONS["gsplat"].headers) is None  # gsplat only needs the runtime
    problem = tk.problem(cuda_ext.EXTENSIONS["nvdiffrast"].headers)
    assert "cublas_v2.h" in problem and "cusparse.h" in problem and "cusolverDn.h" in problem
    # headers found through CPATH count (how pip's nvidia-* include folders are handed to a build)
    extra = tmp_path / "pip-nvidia"
    extra.mkdir()
    for h in ("cublas_v2.h", "cusparse.h", "cusolverDn.h"):
        (extra / h).write_text("")
    monkeypatch.setenv("CPATH", str(extra))
    assert cuda_ext.toolkit_status().problem() is None


def test_lock_with_a_dead_owner_is_stale_and_a_held_lock_is_not(tmp_path):
    d = tmp_path / "build"
    d.mkdir()
    lock = d / "lock"
    lock.write_text(f"{_dead_pid()}\n")
    assert cuda_ext.is_stale(lock)
    assert cuda_ext.find_stale_locks([d]) == [lock]
    # an empty lock (torch's FileBaton writes nothing) held open by a live process: that process owns it
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDONLY)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert holder.pid in cuda_ext.lock_holders(lock)
        assert not cuda_ext.is_stale(lock)
        assert cuda_ext.remove_stale_locks([d]) == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cuda_ext.is_stale(lock)  # its owner died (killed mid-build)
    assert cuda_ext.remove_stale_locks([d]) == [lock] and not lock.exists()


def test_build_clears_a_stale_lock_then_loads_a_built_extension(tmp_path):
    spec = ExtensionSpec("fakeext", "fakeext", "fakeext_cuda", ("cuda_runtime.h",),
                         command=(sys.executable, "-c", "print('fakeext ready')"))
    bdir = cuda_ext.build_dir(spec)
    assert bdir == tmp_path / "torch_ext" / "fakeext_cuda"
    bdir.mkdir(parents=True)
    (bdir / "fakeext_cuda.so").write_bytes(b"\x7fELF")  # built earlier: no toolkit needed to load it
    (bdir / "lock").write_text(f"{_dead_pid()}\n")       # left by a worker killed mid-build
    st = cuda_ext.build_extension(spec, 30, require_cuda=False)
    assert st.state == "ready", st.detail
    assert st.stale_locks_removed == [str(bdir / "lock")] and not (bdir / "lock").exists()


def test_build_that_overruns_its_time_limit_is_killed_with_its_children(tmp_path):
    """A stand-in build takes the lock like torch's FileBaton, starts a compiler-like grandchild and hangs."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        bdir = os.environ["TORCH_EXTENSIONS_DIR"] + "/slowext_cuda"
        os.makedirs(bdir, exist_ok=True)
        fd = os.open(bdir + "/lock", os.O_CREAT | os.O_EXCL)
        child = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(60)
    """)
    spec = ExtensionSpec("slowext", "slowext", "slowext_cuda", (), command=(sys.executable, "-c", script))
    t0 = time.monotonic()
    st = cuda_ext.build_extension(spec, 2.0, require_cuda=False)
    took = time.monotonic() - t0
    assert st.state == "failed" and st.detail == "the build timed out after 2 s"
    assert took < 15
    parent, grandchild = (int(x) for x in pids.read_text().split())
    assert _wait_gone(parent) and _wait_gone(grandchild)
    assert not (cuda_ext.build_dir(spec) / "lock").exists()  # the killed build's lock does not block the next one
    assert "failed (the build timed out after 2 s); using the PyTorch renderer instead" in st.line()


def test_failed_build_reports_the_compiler_error():
    spec = ExtensionSpec("badext", "badext", "badext_cuda", (), command=(
        sys.executable, "-c", "import sys; print('compiling 3 files'); "
        "print('fatal error: cublas_v2.h: No such file or directory'); sys.exit(1)"))
    st = cuda_ext.build_extension(spec, 30, require_cuda=False)
    assert st.state == "failed"
    assert st.detail == "fatal error: cublas_v2.h: No such file or directory"


def test_warm_up_runs_in_the_background_and_the_twin_stands_in_until_ready():
    cuda_ext.register(ExtensionSpec("slowok", "slowok", "slowok_cuda", (), command=(
        sys.executable, "-c", "import time; time.sleep(1.0); print('ok')")))
    cuda_ext.register(ExtensionSpec("broken", "broken", "broken_cuda", (), command=(
        sys.executable, "-c", "raise SystemExit('error: nvcc fatal : Unsupported gpu architecture')")))
    t0 = time.monotonic()
    lines = cuda_ext.start_warm_up(("slowok", "broken"), timeout_s=30, require_cuda=False)
    assert time.monotonic() - t0 < 0.5  # returns at once
    assert any(line.startswith("renderer: building slowok") for line in lines)
    assert not cuda_ext.usable("slowok")  # never waits for a running build
    assert cuda_ext.wait("slowok", 30).state == "ready"
    assert cuda_ext.usable("slowok")
    assert cuda_ext.wait("broken", 30).state == "failed"
    assert cuda_ext.warnings() == ["renderer: broken failed (error: nvcc fatal : Unsupported gpu architecture); "
                                   "using the PyTorch renderer instead"]
    again = cuda_ext.start_warm_up(("slowok",), require_cuda=False)  # idempotent: no second build
    assert len(again) == 1 and again[0].startswith("renderer: slowok ready")


def test_without_cuda_everything_falls_back_at_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from backend.gaussians.render import gsplat_available, resolve_backend
    from backend.mesh import rasterize_nvdiffrast

    lines = cuda_ext.start_warm_up()
    assert lines == ["renderer: nvdiffrast unavailable (no CUDA device); using the PyTorch renderer",
                     "renderer: gsplat unavailable (no CUDA device); using the PyTorch renderer"]
    assert not gsplat_available() and not rasterize_nvdiffrast.is_available()
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_backend("gsplat", "cpu")


def test_no_cuda_ext_switch(monkeypatch):
    monkeypatch.setenv("CONJURE_NO_CUDA_EXT", "1")
    st = cuda_ext.build_extension(cuda_ext.EXTENSIONS["gsplat"], 5, require_cuda=False)
    assert st.state == "unavailable" and "CONJURE_NO_CUDA_EXT" in st.detail
    monkeypatch.setenv("CONJURE_NO_CUDA_EXT", "gsplat")
    assert cuda_ext.disabled("gsplat") and not cuda_ext.disabled("nvdiffrast")
    assert os.environ["CONJURE_NO_CUDA_EXT"] == "gsplat"


def test_build_folders_follow_the_packages_naming():
    import torch

    assert cuda_ext.build_dir(cuda_ext.EXTENSIONS["gsplat"]).name == "gsplat_cuda"
    name = cuda_ext.build_dir(cuda_ext.EXTENSIONS["nvdiffrast"]).name
    # nvdiffrast/torch/ops.py: sanitize_name('nvdiffrast_plugin_%s_torch%s' % (nvdiffrast.__version__, torch.__version__))
    assert name.startswith("nvdiffrast_plugin_") and name.endswith("_torch" + torch.__version__.replace(".", "_")
                                                                  .replace("+", "_"))


def test_a_live_build_elsewhere_is_waited_for_not_duplicated(tmp_path):
    spec = ExtensionSpec("busyext", "busyext", "busyext_cuda", (), command=(sys.executable, "-c", "print('ok')"))
    bdir = cuda_ext.build_dir(spec)
    bdir.mkdir(parents=True)
    lock = bdir / "lock"
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)
        print("building", flush=True)
        time.sleep(1.5)
        os.close(fd); os.remove({str(lock)!r})
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "building"
        t0 = time.monotonic()
        st = cuda_ext.build_extension(spec, 30, require_cuda=False)
        waited = time.monotonic() - t0
    finally:
        other.wait()
    assert st.state == "ready" and st.stale_locks_removed == []
    assert waited >= 0.8  # it waited for the other build's lock instead of removing it
