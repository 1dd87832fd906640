"""The add-on's live state and its one timer pump (main thread only).

``RUNTIME`` owns the ``Client``, an optional ``LocalBackend`` child process, one
``PreviewSlot`` per running job and a queue of staged scene edits (preview swaps, the final
import). ``pump()`` is the single persistent ``bpy.app.timers`` callback: each tick it reads
the socket and applies staged edits within a budget of about 4 ms, and it records how long
each tick took (``tick_seconds``) so tests and benchmarks can report p99.

In background mode (``blender -b``) and bpy-as-a-module timers never fire; ``api.py`` then
calls ``process()`` in its own blocking loop.
"""

import atexit
import os
import time
from collections import deque

import bpy

from . import importer, texture_ops, thumbnails
from .backend_process import LocalBackend
from .client import Client, ConjureError, load_connection, parse_address
from .prefs_access import default_connection_file, get_prefs

#: The backend's own pipeline, as ``hello_reply.pipeline`` names it (tests run other ones).
STANDARD_PIPELINE = "backend.pipeline.run:run_job"
TICK_BUDGET_S = 0.004
BUSY_INTERVAL_S = 0.01
IDLE_INTERVAL_S = 0.1
OFFLINE_INTERVAL_S = 0.5
REDRAW_EVERY_S = 0.1
MIN_SOCKET_S = 0.001
MAX_SOCKET_GAP_S = 0.1


class Status:
    """The connection as the panel shows it: ``kind`` (one of ``STATUS_KINDS``; ``panel.py`` maps
    kinds to icons and styles), a short ``text`` and an optional ``hint`` (what to do about it)."""

    __slots__ = ("kind", "text", "hint")

    def __init__(self, kind, text, hint=""):
        self.kind, self.text, self.hint = kind, text, hint

    def __iter__(self):  # (kind, text), for logs and tests
        return iter((self.kind, self.text))

    @property
    def problem(self):
        return self.kind in PROBLEM_KINDS

    def __repr__(self):
        return "Status(%r, %r, %r)" % (self.kind, self.text, self.hint)


#: starting, start_failed: our local backend; error: a request failed before any connection;
#: slow: connected but not answering (busy), lost: gone.
STATUS_KINDS = ("not_connected", "starting", "start_failed", "error", "connecting", "connected", "slow",
                "lost", "incompatible")
PROBLEM_KINDS = ("start_failed", "error", "lost", "incompatible")


class Runtime:
    def __init__(self):
        self.client = None
        self.backend = None  # LocalBackend we started
        self.error = None  # ConjureError for the panel (connection/start problems)
        self.slots = {}  # job_id -> importer.PreviewSlot
        self.placement = {}  # job_id -> (location tuple, collection name)
        self.tasks = deque()  # (job_id, kind, generator)
        self.tick_seconds = deque(maxlen=20000)  # wall time of each pump tick
        self.tick_cpu_seconds = deque(maxlen=20000)  # CPU time of this thread in each tick
        self.stats = {"previews_applied": 0, "previews_skipped": 0, "imports": 0, "ticks": 0}
        self.current_job_id = None  # the job the panel follows
        self.timer_registered = False
        self._last_redraw = 0.0
        self._dirty = False  # the panel needs a redraw
        self._scene_dirty = False  # the viewport too (a preview or result changed the scene)
        self._stage_cost = {}  # (task kind, previous stage name) -> seconds the next stage took
        self._last_socket = 0.0
        self._next_stage = {}  # job_id -> name of the stage that ran last (None: a new task)
        self._waiting_backend_since = None
        self.on_import = []  # callbacks(job, obj) (tests, scripts)
        self.pending_request = None  # (request, location, collection name) until the backend answers
        self.requests = {}  # job_id -> the request dict sent (for Resubmit)
        self._finished_seen = set()  # job ids whose end was handled (history refresh)

    def mark_dirty(self):
        """Ask for a panel redraw at the next tick (operators call this after changing state);
        starts the timer if needed, so a message shown before any connection is drawn too."""
        self._dirty = True
        if not bpy.app.background:
            self.ensure_timer()

    # -- connection -------------------------------------------------------------------------
    def connection_source(self, prefs):
        """(ConnectionInfo or None, file path or None) from the preferences."""
        if prefs.mode == "CONNECT" and prefs.connect_with == "ADDRESS":
            return parse_address(prefs.address, prefs.key), None
        return None, default_connection_file(prefs)

    def ensure_client(self, prefs=None, connection=None):
        """The connected (or connecting) client; builds it from ``connection`` or the preferences.

        Raises ``ConjureError`` (with ``action='start_backend'`` when there is nothing to
        connect to yet).
        """
        if self.client is not None and not self.client.closed:
            return self.client
        prefs = prefs or get_prefs()
        if connection is not None:
            info, path = load_connection(connection)
        else:
            info, path = self.connection_source(prefs)
            if info is None:
                if not os.path.exists(path):
                    if prefs.mode == "CONNECT":
                        raise ConjureError(
                            "no_backend", "No backend is running: there is no connection file at %s. Start "
                            "one with `conjure-backend serve` (or choose Start Local Backend in the Conjure "
                            "preferences)." % path, action="start_backend")
                    raise ConjureError("no_backend", "No backend is running (no connection file at %s)." % path,
                                       action="start_backend")
                info, path = load_connection(path)
        try:
            self.client = Client(info, connection_file=path)
        except ImportError as e:  # _deps.MissingDependency
            raise ConjureError("missing_pyzmq", str(e)) from None
        self.error = None
        self.ensure_timer()
        return self.client

    def start_backend(self, prefs=None):
        """Start the local backend from the preferences (no-op if ours is running)."""
        prefs = prefs or get_prefs()
        if self.backend is not None and self.backend.running:
            return self.backend
        conn = default_connection_file(prefs)
        self.backend = LocalBackend(bpy.path.abspath(prefs.python_path) if prefs.python_path else "python3",
                                    conn, data_dir=bpy.path.abspath(prefs.data_dir) if prefs.data_dir else "",
                                    device=prefs.device, extra_args=prefs.backend_args)
        self.backend.start()
        self._waiting_backend_since = time.monotonic()
        self.error = None
        if self.client is not None and self.client.connection_file != conn:
            self.drop_client()
        self.ensure_timer()
        self._dirty = True
        return self.backend

    def stop_backend(self):
        if self.backend is not None:
            self.backend.stop()
        self.backend = None
        self._waiting_backend_since = None
        self._dirty = True

    def drop_client(self):
        if self.client is not None:
            self.client.close()
        self.client = None

    def status(self):
        """The connection's ``Status`` (kind, text, hint) for the panel and preferences."""
        c = self.client
        b = self.backend
        if self._waiting_backend_since is not None and (c is None or c.state != "connected"):
            if b is not None and not b.running:
                line, hint = b.failure_summary()
                return Status("start_failed", "The backend did not start: " + line, hint)
            return Status("starting", "Starting backend… %.0f s" % (time.monotonic() - self._waiting_backend_since))
        if c is None:
            if self.error is not None:
                return Status("error", self.error.message)
            return Status("not_connected", "Not connected")
        if c.state == "connected":
            if c.slow:
                return Status("slow", "Backend busy: no answer for %.0f s" % c.silent_for(),
                              "Still connected; it answers when its CPU is free.")
            return Status("connected", self.what_runs())
        if c.state == "connecting":
            return Status("connecting", "Connecting to %s…" % c.info.url)
        if c.state == "incompatible":
            return Status("incompatible", c.error.message if c.error else "Incompatible backend")
        if c.error is not None:
            return Status("lost", c.error.message)
        return Status("lost", c.state.capitalize())

    def what_runs(self):
        """"CPU · conjure-solids" (device · model) from the backend's hello, else "Connected (v0.1.0)"."""
        info = self.client.server_info if self.client is not None else {}
        parts = [x for x in (info.get("device"), info.get("model")) if isinstance(x, str) and x]
        if parts:
            return " · ".join(parts)
        ver = info.get("server_version") or ""
        return "Connected" + (" (v%s)" % ver if ver else "")

    def strict_overrides(self):
        """True when the backend runs the standard pipeline, whose settings table
        (``protocol.params.OVERRIDE_SPECS``) the add-on can check keys against before sending."""
        info = self.client.server_info if self.client is not None else {}
        return info.get("pipeline") == STANDARD_PIPELINE

    def vocabulary(self):
        """Words the running model knows (empty for an open-vocabulary model or when unknown)."""
        info = self.client.server_info if self.client is not None else {}
        return [w for w in info.get("vocabulary") or () if isinstance(w, str)]

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, request, *, location=None, collection=None, prefs=None, connection=None):
        """Send a generation request (kwargs of ``Client.submit``); returns the ``JobState``."""
        client = self.ensure_client(prefs, connection)
        job = client.submit(**request)
        self.requests[job.job_id] = dict(request)
        if location is None:
            location = importer.default_location()
        if collection is None:
            collection = importer.default_collection()
        self.placement[job.job_id] = (tuple(location), collection.name)
        self.current_job_id = job.job_id
        self.ensure_timer()
        self._dirty = True
        return job

    def cancel(self, job_id=None):
        job_id = job_id or self.current_job_id
        if self.client is not None and job_id:
            self.client.cancel(job_id)
            self._dirty = True

    def resubmit(self, job_id=None, *, location=None, collection=None):
        """Send a failed job's request again, same settings (the seed it ran with), new job id."""
        job_id = job_id or self.current_job_id
        job = self.client.jobs.get(job_id) if self.client is not None and job_id else None
        request = self.requests.get(job_id)
        if request is None and job is not None and job.params:
            request = {k: job.params.get(k) for k in ("prompt", "negative_prompt", "seed", "preset", "overrides")}
        if request is None:
            raise ConjureError("nothing_to_resubmit", "There is no job to submit again.")
        if location is None and job_id in self.placement:
            location = self.placement[job_id][0]
        return self.submit(dict(request), location=location, collection=collection)

    def current_job(self):
        if self.client is None or self.current_job_id is None:
            return None
        return self.client.jobs.get(self.current_job_id)

    def reimport(self, job_id, params=None):
        """Bring a finished job's result into the scene again (re-attaches from seq 1)."""
        client = self.ensure_client()
        job = client.jobs.get(job_id)
        if job is not None and job.state == "done" and job.result_mesh is None:
            client.forget(job_id)
        job = client.attach(job_id, 1, params=params, origin="reimport")
        self.placement[job_id] = (importer.default_location(), importer.default_collection().name)
        self.current_job_id = job_id
        self.ensure_timer()
        return job

    # -- the pump -----------------------------------------------------------------------------
    def process(self, budget_s=TICK_BUDGET_S, *, timeout_ms=0, previews=True):
        """One round within ``budget_s``: staged scene edits first, then the socket. True if busy.

        A stage runs only if its expected cost (the slowest recent run of that stage, decaying)
        fits in what is left; the first stage of a round always runs, at the start of the round,
        so work never stalls. The socket then gets the rest of the budget; when less than
        ``MIN_SOCKET_S`` is left it is skipped, except that it is read at least every
        ``MAX_SOCKET_GAP_S`` so heartbeats never look late.
        """
        start = time.perf_counter()
        deadline = start + budget_s
        ran = 0
        while self.tasks:
            job_id, kind, gen = self.tasks[0]
            if ran and time.perf_counter() + self._stage_cost.get((kind, self._next_stage.get(job_id)), 0.0) \
                    > deadline:
                break
            t_stage = time.perf_counter()
            try:
                stage = next(gen)
            except StopIteration:
                self.tasks.popleft()
                self._next_stage.pop(job_id, None)
                self._task_done(job_id, kind, gen)
                continue
            except Exception as e:  # a bad mesh must not kill the pump
                self.tasks.popleft()
                self._next_stage.pop(job_id, None)
                self._task_failed(job_id, kind, e)
                continue
            ran += 1
            cost = time.perf_counter() - t_stage
            key = (kind, self._next_stage.get(job_id))
            old = self._stage_cost.get(key)
            self._stage_cost[key] = cost if old is None else max(cost, 0.8 * old + 0.2 * cost)
            self._next_stage[job_id] = stage
            if stage in ("swap", "object"):
                self._dirty = True
                self._scene_dirty = True

        client = self.client
        if self._waiting_backend_since is not None or (client is not None and client.slow):
            self._dirty = True  # the status counts seconds (and a backend may exit meanwhile)
        if client is None and self._waiting_backend_since is not None:
            try:
                if self.backend is not None and self.backend.connection_ready():
                    self.ensure_client()
                    client = self.client
            except ConjureError:
                pass
        if client is not None:
            now = time.perf_counter()
            left = deadline - now
            if timeout_ms or left >= MIN_SOCKET_S or now - self._last_socket >= MAX_SOCKET_GAP_S:
                self._last_socket = now
                client.poll(max(left, MIN_SOCKET_S), timeout_ms=timeout_ms)
            if client.state == "connected":
                self._waiting_backend_since = None
                if self.pending_request is not None:
                    request, loc, coll_name = self.pending_request
                    self.pending_request = None
                    coll = bpy.data.collections.get(coll_name) or bpy.context.scene.collection
                    try:
                        self.submit(request, location=loc, collection=coll)
                    except ConjureError as e:
                        self.error = e
            self._schedule(client, previews)
            self._notice_job_ends(client)
            if client.changed:
                client.changed = False
                self._dirty = True
        self._redraw()
        busy = bool(self.tasks) or (client is not None and bool(client.active_jobs()))
        return busy

    def _schedule(self, client, previews):
        queued = {(j, k) for j, k, _ in self.tasks}
        for job in list(client.jobs.values()):
            jid = job.job_id
            if job.result_mesh is not None and (jid, "result") not in queued:
                self._drop_tasks(jid, "preview")
                payload, job.result_mesh = job.result_mesh, None
                self.tasks.append((jid, "result", self._result_stages(job, payload)))
            elif job.preview_mesh is not None and (jid, "preview") not in queued and not job.finished:
                payload, job.preview_mesh = job.preview_mesh, None
                if not previews or not get_prefs().show_previews or job.origin == "reimport":
                    self.stats["previews_skipped"] += 1
                    continue
                slot = self._slot(job)
                self.tasks.append((jid, "preview", slot.stages(payload)))
            elif job.finished and job.state != "done" and jid in self.slots:
                self._drop_tasks(jid, "preview")
                self.slots.pop(jid).remove()
                self._dirty = True

    def _notice_job_ends(self, client):
        """When a job ends, ask for the history again (so it shows the new job, its time and
        thumbnail) once the history was loaded at least once."""
        while client.deleted:
            thumbnails.forget(client.deleted.pop())
            if client.state == "connected":
                client.list_jobs()
        ended = [j.job_id for j in client.jobs.values() if j.finished and j.job_id not in self._finished_seen]
        if not ended:
            return
        self._finished_seen.update(ended)
        if client.history is not None and client.state == "connected":
            client.list_jobs()

    def _drop_tasks(self, job_id, kind):
        self._next_stage.pop(job_id, None)
        for item in [t for t in self.tasks if t[0] == job_id and t[1] == kind]:
            self.tasks.remove(item)
            item[2].close()

    def _slot(self, job):
        slot = self.slots.get(job.job_id)
        if slot is None:
            loc, coll_name = self.placement.get(job.job_id, (None, None))
            coll = bpy.data.collections.get(coll_name) if coll_name else None
            slot = texture_ops.preview_slot(job, coll) or importer.PreviewSlot(
                job.job_id, importer.object_name_for_prompt(job.prompt), location=loc, collection=coll)
            self.slots[job.job_id] = slot
        return slot

    def _result_stages(self, job, payload):
        if texture_ops.is_texture_job(job.job_id):  # Texture Selected: map back onto the user's object
            return texture_ops.TextureResultStages(self, job, payload)
        loc, coll_name = self.placement.get(job.job_id, (None, None))
        coll = None
        if coll_name:
            coll = bpy.data.collections.get(coll_name)
            if coll is None and coll_name == bpy.context.scene.collection.name:
                coll = bpy.context.scene.collection
        props = result_props(job)
        name = importer.object_name_for_prompt((job.params or {}).get("prompt") or "Conjure")
        return importer.import_result_stages(payload, name=name, location=loc, collection=coll, props=props,
                                             replace=self.slots.get(job.job_id))

    def _task_done(self, job_id, kind, gen):
        if kind == "preview":
            self.stats["previews_applied"] += 1
            return
        self.slots.pop(job_id, None)
        self.stats["imports"] += 1
        job = self.client.jobs.get(job_id) if self.client else None
        obj = gen.obj
        if job is not None:
            job.imported_object = obj.name
        _undo_push("Conjure: " + obj.name)
        for cb in list(self.on_import):
            cb(job, obj)
        self._dirty = True

    def _task_failed(self, job_id, kind, exc):
        job = self.client.jobs.get(job_id) if self.client else None
        if job is not None and kind == "result":
            job.state = "failed"
            job.error = ConjureError("import_failed", "Could not build the result in Blender: %s" % exc,
                                     job_id=job_id)
        self._dirty = True

    def _redraw(self):
        """Redraw the sidebar (cheap) when the panel changed; the whole 3D view only when the
        scene did. At most every ``REDRAW_EVERY_S``."""
        now = time.monotonic()
        if not self._dirty or now - self._last_redraw < REDRAW_EVERY_S:
            return
        scene = self._scene_dirty
        self._dirty = self._scene_dirty = False
        self._last_redraw = now
        wm = getattr(bpy.context, "window_manager", None)
        if wm is None:
            return
        for window in wm.windows:
            for area in window.screen.areas:
                if area.type == "VIEW_3D":
                    if scene:
                        area.tag_redraw()
                    else:
                        for region in area.regions:
                            if region.type == "UI":
                                region.tag_redraw()
                elif area.type == "PREFERENCES":
                    area.tag_redraw()

    def tick(self):
        """The timer callback body: one budgeted round; returns seconds until the next tick."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        try:
            busy = self.process(TICK_BUDGET_S)
        except Exception as e:  # never let the timer die
            self.error = ConjureError("internal", "Conjure pump error: %s" % e)
            busy = False
        self.tick_seconds.append(time.perf_counter() - t0)
        self.tick_cpu_seconds.append(time.thread_time() - c0)
        self.stats["ticks"] += 1
        if busy or self._waiting_backend_since is not None:
            return BUSY_INTERVAL_S
        if self.client is None:
            return OFFLINE_INTERVAL_S
        return IDLE_INTERVAL_S

    def ensure_timer(self):
        if not bpy.app.timers.is_registered(pump):
            bpy.app.timers.register(pump, first_interval=0.0, persistent=True)
        self.timer_registered = True

    def stop_timer(self):
        if bpy.app.timers.is_registered(pump):
            bpy.app.timers.unregister(pump)
        self.timer_registered = False

    def shutdown(self):
        """Close the socket (linger 0), stop our backend, drop the timer. Safe to repeat."""
        try:
            self.stop_timer()
        except Exception:
            pass
        for _job_id, _kind, gen in self.tasks:
            gen.close()
        self.tasks.clear()
        self.drop_client()
        self.stop_backend()
        self.slots.clear()

    def on_file_loaded(self):
        """After File > Open/New: old preview objects are gone; keep jobs, forget slots."""
        self._drop_all_previews()
        if self.client is not None:
            self.ensure_timer()

    def _drop_all_previews(self):
        for job_id, kind, gen in list(self.tasks):
            if kind == "preview":
                self.tasks.remove((job_id, kind, gen))
                gen.close()
        self.slots.clear()


def result_props(job):
    """Custom properties recorded on a result object: what was asked and what ran.

    ``conjure_job_id``, ``conjure_prompt``, ``conjure_negative_prompt``, ``conjure_seed`` (the seed
    that ran; a string when it does not fit a Blender int), ``conjure_preset`` (the preset that
    ran, e.g. "cpu" for "auto"), ``conjure_model``, ``conjure_device``, ``conjure_duration_s`` and
    ``conjure_warnings`` (a list of strings, empty when none).
    """
    params = job.params or {}
    info = job.result_info or {}
    seed = info.get("seed", params.get("seed"))
    props = {
        importer.PROP_JOB_ID: job.job_id,
        "conjure_prompt": params.get("prompt", ""),
        "conjure_negative_prompt": params.get("negative_prompt", ""),
        "conjure_seed": seed if isinstance(seed, int) and 0 <= seed < 2**31 else str(seed),
        "conjure_preset": info.get("resolved_preset") or params.get("preset", ""),
        "conjure_model": info.get("model") or (info.get("info") or {}).get("model") or "",
        "conjure_device": info.get("device") or "",
        "conjure_warnings": list(job.warnings),
    }
    duration = job.duration_s
    if duration is not None:
        props["conjure_duration_s"] = round(float(duration), 2)
    return props


def _undo_push(message):
    """One undo step for the imported object, where there is a UI to undo in."""
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    window = wm.windows[0] if wm and wm.windows else None
    if window is None:
        return
    try:
        with bpy.context.temp_override(window=window):
            bpy.ops.ed.undo_push(message=message)
    except Exception:
        pass


RUNTIME = Runtime()


def pump():
    """The persistent timer: ``bpy.app.timers`` calls this; it returns its next interval."""
    return RUNTIME.tick()


def _at_exit():
    RUNTIME.shutdown()


_atexit_registered = False


def register():
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True


def unregister():
    global _atexit_registered
    RUNTIME.shutdown()
    if _atexit_registered:
        atexit.unregister(_at_exit)
        _atexit_registered = False
