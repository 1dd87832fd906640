"""backend.fsutil: atomic durable writes (real files, a real size limit for the failure case)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.fsutil import (
    atomic_copy,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    durable_move,
    fsync_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_replace_the_target_and_leave_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write_bytes(target, b"two", durable=False)
    assert target.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "caf\u00e9\n")
    assert (tmp_path / "t.txt").read_bytes() == "caf\u00e9\n".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "j.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert _leftovers(tmp_path) == []


def test_new_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "p", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o644


def test_copy_and_move(tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(3 << 20)  # several copy chunks
    src.write_bytes(payload)
    (tmp_path / "out").mkdir()
    atomic_copy(src, tmp_path / "out" / "dst.bin")
    assert (tmp_path / "out" / "dst.bin").read_bytes() == payload
    assert src.exists()
    durable_move(src, tmp_path / "out" / "moved.bin")
    assert not src.exists() and (tmp_path / "out" / "moved.bin").read_bytes() == payload
    assert _leftovers(tmp_path / "out") == []


def test_exception_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_keeps_the_old_file(tmp_path):
    target = tmp_path / "job.json"
    target.write_text('{"state": "queued"}\n')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == '{"state": "queued"}\n'
    assert _leftovers(tmp_path) == []


def test_copy_of_a_missing_source_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "nope", tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_rename_failure_keeps_the_old_file(tmp_path):
    # os.replace of a file over a non-empty folder fails: the folder stays, no temp is left
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert (target / "inside").read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_full_disk_keeps_the_old_file(tmp_path):
    """A write that runs out of room (RLIMIT_FSIZE: the kernel refuses bytes past 64 KiB with
    EFBIG, as a full disk refuses them with ENOSPC) raises, keeps the old file, leaves no temp."""
    target = tmp_path / "result.glb"
    target.write_bytes(b"old result")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from backend.fsutil import atomic_write_bytes
        try:
            atomic_write_bytes({str(target)!r}, b"n" * (1 << 20))
        except OSError as exc:
            print("refused", exc.errno)
            sys.exit(0)
        sys.exit("the oversized write succeeded")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused")
    assert target.read_bytes() == b"old result"
    assert _leftovers(tmp_path) == []


def test_fsync_dir_tolerates_a_missing_folder(tmp_path):
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # best effort: no exception
