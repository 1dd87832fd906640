"""History thumbnails: the backend renders ``thumbnail.png`` (128², RGBA) for each finished job;
this fetches it once (``fetch_result``, checked by SHA-256), keeps it in a cache folder and
shows it through ``bpy.utils.previews``. Main thread only, like everything that touches bpy.
"""

import os
import tempfile
import time

import bpy.utils.previews

from .fsutil import atomic_write_bytes

THUMBNAIL_NAME = "thumbnail.png"
RETRY_AFTER_S = 10.0  # a failed fetch (backend restarting, reply lost) is tried again after this
_STATE = {"previews": None, "failed": {}}  # failed: job id -> time.monotonic() of the failure


def cache_dir():
    """Folder for fetched thumbnails (one PNG per job id)."""
    path = os.path.join(tempfile.gettempdir(), "conjure-thumbnails-%s" % _user())
    os.makedirs(path, exist_ok=True)
    return path


def _user():
    try:
        return str(os.getuid())
    except AttributeError:  # Windows
        return os.environ.get("USERNAME", "user")


def _previews():
    if _STATE["previews"] is None:
        _STATE["previews"] = bpy.utils.previews.new()
    return _STATE["previews"]


def icon_id(client, item):
    """The preview icon id of history entry ``item`` (a ``jobs`` reply entry), or 0.

    Starts fetching the thumbnail the first time it is asked for one the backend has; the panel
    redraws when it arrives (the client marks itself changed).
    """
    job_id = item.get("job_id")
    if not job_id or not item.get("thumbnail"):
        return 0
    pcoll = _previews()
    if job_id in pcoll:
        return pcoll[job_id].icon_id
    path = os.path.join(cache_dir(), job_id + ".png")
    if os.path.exists(path):
        return pcoll.load(job_id, path, "IMAGE").icon_id
    failed_at = _STATE["failed"].get(job_id)
    if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S:
        return 0
    if client is None or client.fetching(job_id, THUMBNAIL_NAME):
        return 0
    meta = (item.get("results") or {}).get("thumbnail") or {}
    if client.state != "connected" or not meta.get("size"):
        return 0

    def done(data):
        if isinstance(data, Exception):
            _STATE["failed"][job_id] = time.monotonic()
            return
        _STATE["failed"].pop(job_id, None)
        atomic_write_bytes(path, data, durable=False)  # a cache: atomic is enough
        client.changed = True

    client.fetch_result(job_id, THUMBNAIL_NAME, meta["size"], meta.get("sha256", ""), done)
    return 0


def loaded(job_id):
    """True once the job's thumbnail is in the preview collection."""
    pcoll = _STATE["previews"]
    return pcoll is not None and job_id in pcoll


def forget(job_id):
    """Drop a deleted job's thumbnail (preview and cached file)."""
    pcoll = _STATE["previews"]
    if pcoll is not None and job_id in pcoll:
        del pcoll[job_id]
    try:
        os.remove(os.path.join(cache_dir(), job_id + ".png"))
    except OSError:
        pass


def register():
    pass


def unregister():
    if _STATE["previews"] is not None:
        bpy.utils.previews.remove(_STATE["previews"])
        _STATE["previews"] = None
    _STATE["failed"].clear()
