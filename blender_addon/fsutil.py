"""The add-on's one atomic file write (it cannot import the backend's ``backend/fsutil.py``).

Same recipe as the backend's: write a temporary file beside the target (so the rename never
crosses a file system), flush and ``fsync`` it, ``os.replace`` it over the target, then ``fsync``
the folder. A reader sees the old file or the whole new one; on any failure the temporary file
is removed and the old target is left as it was. (``_deps.py`` unpacks wheels into a folder it
renames into place, which is a folder swap, not a file write.)
"""

import os
import tempfile


def fsync_dir(path):
    """fsync a folder so a rename inside it survives a power loss (best effort)."""
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


def atomic_write_bytes(path, data, durable=True):
    """Write ``data`` (bytes) to ``path`` atomically; ``durable=False`` skips the fsyncs."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(folder)
