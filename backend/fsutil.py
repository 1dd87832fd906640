"""Atomic, durable file writes: the one way the backend puts a file where a reader may look.

Every writer here follows the same recipe: write a temporary file in the target's own folder
(so the rename never crosses a file system), flush and ``fsync`` it, ``os.replace`` it over the
target, then ``fsync`` the folder so the rename itself survives a power loss. A reader sees
either the old file or the whole new one, never a partial file; a failure at any step (an
exception, a full disk) removes the temporary file and leaves the old target untouched.

``durable=False`` skips both fsyncs: still atomic (survives a killed process), not a power loss.
Use it for files that are rewritten often and cheap to lose (preview meshes).

Temporary names are ``.<name>.<random>.tmp`` beside the target; new files get the permissions
``open()`` would give them (0o666 minus the umask).

The Blender add-on keeps its own copy of this recipe (it cannot import the backend), and
``protocol.connection`` its own (it sits below the backend and needs mode 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_copy",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "durable_move",
    "fsync_dir",
]

#: buffer size for copies (bytes)
COPY_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable (best effort: a no-op where the
    platform cannot open or sync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> tuple[int, Path]:
    """Create a fresh temporary file beside ``path``; return (open fd, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file whose contents replace ``path`` on a clean exit.

    If the block raises, the temporary file is removed, ``path`` is left as it was, and the
    exception propagates.
    """
    path = Path(path)
    fd, tmp = _temp_path(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``, atomically (and durably unless ``durable=False``)."""
    with atomic_open(path, durable=durable) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True,
                      encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` encoded as ``encoding`` (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding), durable=durable)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> None:
    """Replace ``path`` with ``obj`` as JSON (indent 2, sorted keys, trailing newline).

    The object is serialised before anything is written, so an unserialisable value leaves
    ``path`` untouched.
    """
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, data, durable=durable)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, durable: bool = True) -> None:
    """Copy the bytes of ``src`` over ``dst`` atomically (``dst`` need not exist)."""
    with open(src, "rb") as fin, atomic_open(dst, durable=durable) as fout:
        shutil.copyfileobj(fin, fout, COPY_CHUNK)


def durable_move(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` over ``dst`` (same file system) after fsyncing ``src``, then fsync the folder.

    For a file that was written completely in a scratch folder beside ``dst`` (no copy needed).
    """
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
