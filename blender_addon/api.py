"""Headless API: ``generate(prompt, ...)`` and ``texture(obj, prompt, ...)`` -> ``bpy.types.Object``, blocking.

Works where timers never run (``blender -b --python script.py``, bpy as a module): it
pumps the socket itself until the result is in the scene, and raises ``ConjureError`` on
a backend error, a cancel, a lost backend or a timeout. Warnings about the result (for example
words of the prompt the model does not know) are issued with ``warnings.warn`` and kept on the
object (``obj["conjure_warnings"]``). Example (prompts the bundled CPU model can make; the
default Cube sits at the origin, so the props go beside it)::

    import bpy
    from conjure import api            # bl_ext.user_default.conjure.api for the extension

    for i, prompt in enumerate(["a red cube", "a blue torus", "a yellow cone"]):
        bpy.context.scene.cursor.location = (3.0 + i * 2.0, 0, 0)
        obj = api.generate(prompt, seed=i, size=1.0)
        print(obj.name, obj["conjure_model"], list(obj["conjure_warnings"]) or "no warnings")
    bpy.ops.wm.save_as_mainfile(filepath="props.blend")

    api.texture(bpy.data.objects["Crate"], "a weathered wooden crate", preset="cpu")
"""

import time
import warnings

import bpy

from .client import ConjureError
from .prefs_access import get_prefs
from .properties import SEED_MAX
from .runtime import RUNTIME

__all__ = ["generate", "texture", "ConjureError", "ConjureWarning", "connect", "disconnect"]


class ConjureWarning(UserWarning):
    """A result was made, but not quite as asked (e.g. the model does not know a word)."""

LOST_GIVE_UP_S = 30.0


def connect(connection=None):
    """Connect (or reconnect) to a backend; ``connection`` as in ``generate``. Returns the Client."""
    client = RUNTIME.client
    if connection is not None and client is not None:
        from .client import load_connection

        info, _path = load_connection(connection)
        if info.url != client.info.url or info.key != client.info.key:
            RUNTIME.drop_client()
    return RUNTIME.ensure_client(get_prefs(), connection)


def disconnect():
    """Close the socket (linger 0). Scripts may call it at the end; Blender also does at exit."""
    RUNTIME.drop_client()


def generate(prompt, *, negative_prompt="", seed=None, preset=None, overrides=None, size=None, timeout=None,
             connection=None, location=None, collection=None, previews=False):
    """Generate a textured mesh from ``prompt`` and return the new object (blocking).

    Args:
        prompt: what to make.
        negative_prompt: what to avoid.
        seed: int in [0, 2**31 - 1] (the panel's limit too), or None for a random one chosen by
            the backend.
        preset: a preset the backend offers (``hello_reply.presets``: "auto", "draft", "standard",
            "high", "cpu"); default: the add-on preference.
        overrides: dotted preset overrides, e.g. ``{"coarse.steps": 300}``.
        size: largest dimension of the object in metres (the ``object_size`` override); its base
            rests on ``location``.
        timeout: seconds before the job is cancelled and ``ConjureError('timeout')`` is raised
            (default: the add-on preference, 1 hour).
        connection: None (the preferences / default connection file), a connection-file path,
            a ``protocol.ConnectionInfo`` or ``{"address": "tcp://host:port", "key": "<hex>"}``.
        location: where the object's base centre goes (default: the 3D cursor).
        collection: a ``bpy.types.Collection`` (default: the active collection).
        previews: also show preview meshes while waiting (off: faster).

    Returns:
        The new ``bpy.types.Object`` (selected and active), with custom properties
        ``conjure_job_id``, ``conjure_prompt``, ``conjure_negative_prompt``, ``conjure_seed`` (the
        seed that ran), ``conjure_preset`` (the preset that ran), ``conjure_model``,
        ``conjure_device``, ``conjure_duration_s`` and ``conjure_warnings`` (a list of strings).
        Each warning is also issued as a ``ConjureWarning``.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise ConjureError("invalid_params", "seed must be a whole number from 0 to %d (as in the panel), got %r"
                           % (SEED_MAX, seed))
    prefs = get_prefs()
    timeout = float(prefs.timeout if timeout is None else timeout)
    client = connect(connection)
    overrides = dict(overrides or {})
    if size is not None:
        overrides["object_size"] = float(size)
    request = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
               "preset": preset or prefs.default_preset or "auto", "overrides": overrides}
    job = RUNTIME.submit(request, location=location, collection=collection, connection=connection)
    return _wait_for_object(job, client, timeout, previews)


def texture(obj, prompt, *, negative_prompt="", seed=None, preset=None, overrides=None, timeout=None,
            connection=None, previews=False):
    """Texture the mesh object ``obj`` from ``prompt`` in place and return it (blocking).

    The object keeps its topology, modifiers, UV maps and materials; it gains a UV map named
    ``Conjure`` and a new material (in a new slot, given to every face) whose image is the
    texture (see ``texture_ops``). Arguments and errors as in :func:`generate`; ``obj`` must be
    a mesh object with faces (else ``ConjureError('bad_object')``).
    """
    from . import texture_ops

    prefs = get_prefs()
    timeout = float(prefs.timeout if timeout is None else timeout)
    client = connect(connection)
    request = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
               "preset": preset or prefs.default_preset, "overrides": overrides or {}}
    request = texture_ops.texture_request(obj, request)
    try:
        job = RUNTIME.submit(request, location=(0.0, 0.0, 0.0), connection=connection)
    except ConjureError:
        texture_ops.TEXTURE_JOBS.pop(request["job_id"], None)
        raise
    return _wait_for_object(job, client, timeout, previews)


def _wait_for_object(job, client, timeout, previews):
    """Pump until ``job``'s result is in the scene; return the object (raises ``ConjureError``)."""
    start = time.monotonic()
    lost_since = None
    try:
        while True:
            RUNTIME.process(0.05, timeout_ms=20, previews=previews)
            if job.imported_object is not None and not any(t[0] == job.job_id for t in RUNTIME.tasks):
                obj = bpy.data.objects.get(job.imported_object)
                if obj is None:
                    raise ConjureError("import_failed", "the imported object disappeared", job_id=job.job_id)
                for text in job.warnings:
                    warnings.warn("Conjure: %s: %s" % (obj.name, text), ConjureWarning, stacklevel=2)
                return obj
            if job.finished and job.state != "done":
                raise job.error or ConjureError(job.state, "the job ended: " + job.state, job_id=job.job_id)
            now = time.monotonic()
            if client.state == "lost":
                lost_since = lost_since or now
                if now - lost_since > LOST_GIVE_UP_S:
                    why = client.error.message if client.error is not None else "The backend stopped answering."
                    raise ConjureError("backend_unreachable", why + " Gave up waiting after %.0f s."
                                       % (now - lost_since + 2.0), job_id=job.job_id, retriable=True,
                                       action="start_backend")
            else:
                lost_since = None
            if client.state == "incompatible":
                raise client.error
            if now - start > timeout:
                client.cancel(job.job_id, "timeout")
                client.flush()
                raise ConjureError("timeout", "no result after %.0f s; the job was cancelled" % timeout,
                                   job_id=job.job_id)
    except KeyboardInterrupt:
        client.cancel(job.job_id, "interrupted by the user")
        client.flush()
        raise
