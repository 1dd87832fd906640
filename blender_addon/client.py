"""The add-on's connection to a backend: one DEALER socket, used from the main thread only.

``Client`` knows sockets and the protocol, not Blender: it queues outgoing messages and sends
them with ``zmq.NOBLOCK`` (a full pipe leaves them queued, never blocks), reads what arrived
within a time budget, keeps a ``JobState`` per job, sends heartbeats, notices a lost or
restarted server and re-attaches to its unfinished jobs from the last sequence number.
Blender's timer pump (``runtime.py``) and the headless API (``api.py``) both drive it by
calling ``poll(budget_s)``.

Received messages are checked (HMAC, JSON, schema, mesh validation: pure Python and numpy, no
``bpy``) on one helper thread, in arrival order, so a megabyte-sized preview does not spend the
main thread's tick on hashing; the main thread only reads the socket and applies checked
messages, in order.
"""

import concurrent.futures
import os
import time
from collections import deque

from . import _deps
from .protocol import (
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    ConnectionInfo,
    ProtocolError,
    Session,
    new_job_id,
    read_connection_file,
    validate_params,
    version_compatible,
)
from .protocol.mesh import texture_submit

__all__ = ["Client", "JobState", "ConjureError", "FINAL_STATES"]

#: Job states that end a job (``lost``: the backend forgot it, e.g. it restarted mid-job).
FINAL_STATES = ("done", "failed", "cancelled", "interrupted", "lost")

PING_INTERVAL_S = 0.5
#: Nothing listening (no TCP connection ever made): the backend is gone after this long.
LOST_AFTER_S = 1.5
#: A backend whose TCP connection stands but whose pings go unanswered this long is "slow"
#: (its control loop is starved, e.g. by a busy CPU); it is not reported as gone ...
SLOW_AFTER_S = 2.0
#: ... until it stayed silent this long. A backend that exits closes its connection, which the
#: socket monitor reports at once, so a dead backend is still noticed within a poll or two.
GONE_AFTER_S = 30.0
RECONNECT_EVERY_S = 1.0
#: Previews the client lets the server send ahead (each preview received grants one more).
PREVIEW_CREDITS = 2
MAX_OUTBOX = 1000
#: Received messages waiting to be checked or applied; beyond this the socket is left unread.
MAX_INBOX = 64
#: A small message's check is waited for at most this long inside a poll (it takes ~0.1 ms).
SMALL_CHECK_WAIT_S = 0.002
SMALL_MESSAGE_BYTES = 64 * 1024


def _check_message(session, frames):
    """Helper thread: verify and parse ``frames`` and decode a mesh it carries (``Message.mesh``
    keeps it, so the handler's call is free). No bpy here. Raises ``ProtocolError`` for a bad
    message; a bad mesh raises again when the handler asks for it."""
    msg = session.deserialize(frames)
    if "mesh" in msg.content:
        try:
            msg.mesh()
        except ProtocolError:
            pass
    return msg


class ConjureError(RuntimeError):
    """What went wrong, for people: ``code`` (snake_case) and ``message`` (a sentence).

    ``action`` names the fix the panel offers (``"start_backend"``, ``"retry"`` or None).
    """

    def __init__(self, code, message, *, job_id=None, action=None, retriable=False):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.job_id = job_id
        self.action = action
        self.retriable = retriable


class JobState:
    """What the client knows about one job; times are ``time.monotonic()`` seconds."""

    def __init__(self, job_id, params, *, origin="submit"):
        self.job_id = job_id
        self.params = params  # dict as sent (prompt, negative_prompt, seed, preset, overrides)
        self.origin = origin  # "submit" (ours), "reimport" (history), "attach"
        self.state = "submitting"
        self.queue_position = None
        self.stage = ""
        self.step = 0
        self.total = 0
        self.fraction = 0.0
        self.elapsed = 0.0
        self.eta = None
        self.message = ""
        self.last_seq = 0
        self.error = None  # ConjureError
        self.result_info = None  # content of result_ready
        self.result_mesh = None  # MeshPayload, until the runtime imports it
        self.preview_mesh = None  # latest MeshPayload not yet shown
        self.preview_step = None
        self.previews_received = 0
        self.submitted_at = time.monotonic()
        self.updated_at = self.submitted_at
        self.finished_at = None
        self.imported_object = None  # name of the object made from the result
        self.warnings = []  # str, from progress messages ("warning: ...") and result_ready
        self.cancel_requested = False  # Cancel pressed; the backend has not confirmed yet
        self.overall = 0.0  # one 0..1 figure across every stage (never goes back)

    @property
    def finished(self):
        return self.state in FINAL_STATES

    @property
    def prompt(self):
        return (self.params or {}).get("prompt", "")

    @property
    def duration_s(self):
        """Seconds the job ran, as the backend measured it (else what we saw), or None."""
        info = self.result_info or {}
        d = info.get("duration_s")
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            return float(d)
        return self.elapsed or None

    def stage_label(self):
        """The stage in words a person understands: "Shaping", "Texturing", "Saving", ..."""
        return STAGE_LABELS.get(self.stage, self.stage.replace("_", " ").capitalize() or "Working")

    def status_line(self):
        """One short line for the panel: "Shaping 225/350", "Queued (position 2)", "Done in 42 s"."""
        if self.cancel_requested and not self.finished:
            return "Cancelling…"
        if self.state == "submitting":
            return "Sending…"
        if self.state == "queued":
            pos = self.queue_position
            return "Queued" + (" (position %d)" % pos if pos else "")
        if self.state == "running":
            label = self.stage_label()
            if self.total > 1:
                label += " %d/%d" % (self.step, self.total)
            return label
        if self.state == "done":
            if self.origin == "reimport":
                return "Re-imported"
            d = self.duration_s
            return "Done" + (" in " + _fmt_s(d) if d else "")
        if self.state == "cancelled":
            return "Cancelled"
        if self.error is not None:
            return self.error.message
        return self.state.capitalize()

    def time_line(self):
        """"0:42 elapsed · about 1:20 left in this stage" (running jobs), else ""."""
        if self.state != "running":
            return ""
        line = _fmt_s(self.elapsed) + " elapsed"
        if self.eta is not None and self.total > 1:
            line += " · about %s left in %s" % (_fmt_s(self.eta), self.stage_label().lower())
        return line

    def add_warning(self, text):
        text = " ".join(str(text).split())
        if text.lower().startswith("warning:"):
            text = text[len("warning:"):].strip()
        if text and text not in self.warnings:
            self.warnings.append(text)


#: Error codes that answer a ``fetch_result`` (they end that fetch, not the job).
FETCH_ERRORS = ("unknown_file", "not_ready", "result_missing", "bad_offset")

#: Backend stage names -> what the panel calls them.
STAGE_LABELS = {"load": "Loading model", "coarse": "Shaping", "fine": "Texturing", "export": "Saving"}
#: Where each stage sits on the one progress bar (start, end), in the order the pipeline runs them.
STAGE_SPANS = {"load": (0.0, 0.05), "coarse": (0.05, 0.6), "fine": (0.6, 0.95), "export": (0.95, 1.0)}


def _fmt_s(seconds):
    seconds = max(0.0, float(seconds or 0.0))
    if seconds < 10:
        return "%.1f s" % seconds
    if seconds < 60:
        return "%.0f s" % seconds
    return "%d:%02d" % (seconds // 60, seconds % 60)


class Client:
    """A DEALER connection to one backend. Main thread only; nothing here blocks.

    Args:
        info: a ``ConnectionInfo``; or None with ``connection_file`` given.
        connection_file: path the info is read from (re-read when the backend restarts on a
            new port while the connection is lost).
        client_name: sent in ``hello``.
    """

    def __init__(self, info=None, *, connection_file=None, client_name="conjure-blender"):
        self.zmq = _deps.ensure_zmq()
        self.connection_file = str(connection_file) if connection_file else None
        self._file_stamp = None
        if info is None:
            info = self._read_file()
        self.info = info
        self.client_name = client_name
        self.session = Session(info.key)
        self.jobs = {}  # job_id -> JobState, in submit order
        self.server_session = None
        self.server_info = {}  # hello_reply content
        self.state = "connecting"  # connecting | connected | lost | incompatible | closed
        self.error = None  # ConjureError describing the connection problem, or None
        self.history = None  # list of dicts from the last ``jobs`` reply
        self.history_at = None
        self.changed = True  # set whenever something the panel shows changed
        self.stats = {"sent": 0, "received": 0, "dropped": 0, "restarts": 0, "eagain": 0}
        self._ctx = None
        self._sock = None
        self._outbox = deque()
        self._inbox = deque()  # (future of _check_message, size in bytes), arrival order
        self._checker = None  # one-thread executor, made on first use
        self._last_rx = None
        self._unanswered_since = None
        self._last_ping = 0.0
        self._connected_at = time.monotonic()
        self._last_reconnect = 0.0
        self.trace = deque(maxlen=64)  # (msg_type, seq, short content) of recent messages, for debugging
        self._fetches = {}  # (job_id, file name) -> {"name", "size", "sha256", "data", "on_done"}
        self._monitor = None  # PAIR socket of the DEALER's monitor (connect/disconnect events)
        self.tcp_connected = None  # None: unknown (no monitor); else the last monitor event
        self.slow = False  # connected, but pings go unanswered (busy backend)
        self.deleted = []  # job ids the backend confirmed deleted
        self.notice = None  # ConjureError about a request on a job we do not follow (e.g. delete)
        self._open()

    # -- socket life cycle -------------------------------------------------------------------
    def _read_file(self):
        info = read_connection_file(self.connection_file)
        try:
            st = os.stat(self.connection_file)
            self._file_stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            self._file_stamp = None
        return info

    def _open(self):
        zmq = self.zmq
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.session.max_message_bytes)
        if self.info.server_public_key:
            public, secret = zmq.curve_keypair()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = self.info.server_public_key.encode("ascii")
        self._close_monitor()
        try:  # connection events: a backend that exits is noticed at once, a busy one is not "gone"
            self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self.tcp_connected = False
        except Exception:  # a pyzmq/libzmq without monitors: judge by pings alone
            self._monitor = None
            self.tcp_connected = None
        sock.connect(self.info.url)
        self._sock = sock
        self._outbox.clear()
        self._inbox.clear()
        self._connected_at = time.monotonic()
        self._last_rx = None
        self._unanswered_since = None
        self.trace.append(("_open", None, {"url": self.info.url}))
        self._hello()

    def _hello(self):
        self._send("hello", {"protocol_version": PROTOCOL_VERSION, "client_name": self.client_name,
                             "capabilities": ["preview_mesh", "attach", "result_mesh"]})
        self._send_ping(force=True)

    def _close_monitor(self):
        if self._monitor is not None:
            try:
                if self._sock is not None:
                    self._sock.disable_monitor()
            except Exception:
                pass
            try:
                self._monitor.close(linger=0)
            except Exception:
                pass
            self._monitor = None

    def _read_monitor(self):
        """Apply waiting connect/disconnect events (never blocks)."""
        mon = self._monitor
        if mon is None:
            return
        zmq = self.zmq
        while True:
            try:
                frames = mon.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception:
                return
            if not frames or len(frames[0]) < 2:
                continue
            event = int.from_bytes(frames[0][:2], "little")
            self.trace.append(("_monitor", None, {"event": event, "state": self.state}))
            if event == zmq.EVENT_CONNECTED:
                self.tcp_connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.tcp_connected = False
                if self.state in ("connected", "connecting"):
                    self._mark_lost("The backend at %s closed the connection (it stopped or crashed)."
                                    % self.info.url)

    def _mark_lost(self, message):
        self.trace.append(("_lost", None, {"message": message, "tcp": self.tcp_connected}))
        self.state = "lost"
        self.slow = False
        self.error = ConjureError("backend_unreachable", message, action="start_backend", retriable=True)
        self.changed = True

    def close(self):
        """Close the socket (linger 0) and the context; safe to call more than once."""
        self._close_monitor()
        if self._sock is not None:
            try:
                self._sock.close(linger=0)
            except Exception:
                pass
            self._sock = None
        if self._ctx is not None:
            try:
                self._ctx.term()
            except Exception:
                pass
            self._ctx = None
        self._outbox.clear()
        self._inbox.clear()
        if self._checker is not None:
            self._checker.shutdown(wait=False, cancel_futures=True)
            self._checker = None
        self.state = "closed"

    @property
    def closed(self):
        return self._sock is None

    def reconnect(self, info=None):
        """Drop the socket and connect again (to ``info`` if given); jobs are re-attached."""
        if info is not None:
            self.info = info
            self.session = Session(info.key)
        self._close_monitor()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._open()
        self.state = "connecting"
        self._reattach()
        self.changed = True

    @property
    def socket(self):
        return self._sock

    # -- sending (never blocks) --------------------------------------------------------------
    def _send(self, msg_type, content=None, buffers=(), *, job_id=None):
        if self._sock is None:
            raise ConjureError("closed", "the connection to the backend was closed")
        msg = self.session.msg(msg_type, content, buffers, job_id=job_id)
        frames = self.session.serialize(msg)
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.stats["dropped"] += 1
        self._outbox.append(frames)
        self.flush()
        return msg

    def flush(self):
        """Send queued messages until the socket would block; returns how many are left."""
        zmq = self.zmq
        sock = self._sock
        while self._outbox and sock is not None:
            try:
                sock.send_multipart(self._outbox[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.stats["eagain"] += 1
                break
            self._outbox.popleft()
            self.stats["sent"] += 1
        return len(self._outbox)

    def _send_ping(self, force=False):
        now = time.monotonic()
        if force or now - self._last_ping >= PING_INTERVAL_S:
            self._last_ping = now
            if not any(_is_ping(f) for f in self._outbox):  # one outstanding ping at most
                self._send("ping", {"token": "%.3f" % now})
                if self._unanswered_since is None:
                    self._unanswered_since = now

    # -- public requests ---------------------------------------------------------------------
    def submit(self, prompt, *, negative_prompt="", seed=None, preset=None, overrides=None, job_id=None,
               mesh=None, base_color=None):
        """Queue a generation (or, with ``mesh``, a texture job); returns its ``JobState``.

        ``mesh`` is a ``MeshPayload`` to texture (uploaded with ``encode_mesh``, validated here
        as strictly as the server will); ``base_color`` its sRGB [r, g, b] start colour or None.
        Raises ``ConjureError("invalid_params")`` naming the bad field, or the mesh's error code.
        """
        params = {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed,
                  "preset": preset or "auto", "overrides": dict(overrides or {})}
        try:
            validate_params(params)
        except ProtocolError as e:
            raise ConjureError("invalid_params", e.message) from None
        content, buffers, pieces = {"params": params}, (), []
        if mesh is not None:  # small meshes ride in the submit, larger ones go first in upload pieces
            try:
                pieces, content, buffers = texture_submit(params, mesh, base_color)
            except ProtocolError as e:
                raise ConjureError(e.code, "the mesh cannot be sent: " + e.message) from None
        job_id = job_id or new_job_id()
        for piece, chunk in pieces:  # queued in order; the socket keeps it (non-blocking sends)
            self._send("upload", piece, chunk, job_id=job_id)
        job = self.jobs.get(job_id) or JobState(job_id, params)
        job.kind = content.get("kind", "generate")
        self.jobs[job_id] = job
        self._send("submit", content, job_id=job_id, buffers=buffers)
        self.changed = True
        return job

    def cancel(self, job_id, reason="cancelled from Blender"):
        job = self.jobs.get(job_id)
        if job is not None and job.finished:
            return
        if job is not None:
            job.cancel_requested = True
            self.changed = True
        self._send("cancel", {"reason": reason}, job_id=job_id)

    def delete_job(self, job_id):
        """Ask the backend to remove a finished job and its files (answer: ``job_deleted``)."""
        self._send("delete_job", {}, job_id=job_id)

    def list_jobs(self, limit=50):
        self._send("list_jobs", {"limit": int(limit)})

    def attach(self, job_id, from_seq=1, *, params=None, origin="attach"):
        """Follow a job we did not submit (or re-follow one): events from ``from_seq`` on."""
        job = self.jobs.get(job_id)
        if job is None:
            job = JobState(job_id, params or {}, origin=origin)
            job.state = "queued"
            self.jobs[job_id] = job
        self._send("attach", {"from_seq": int(from_seq), "preview_credits": PREVIEW_CREDITS}, job_id=job_id)
        self.changed = True
        return job

    def forget(self, job_id):
        self.jobs.pop(job_id, None)
        for key in [k for k in self._fetches if k[0] == job_id]:
            del self._fetches[key]

    def active_jobs(self):
        return [j for j in self.jobs.values() if not j.finished]

    # -- receiving -----------------------------------------------------------------------------
    def poll(self, budget_s=0.004, *, timeout_ms=0):
        """Flush, read what arrived, and apply checked messages until ``budget_s`` is spent.

        ``timeout_ms`` > 0 waits that long for the first message (headless loops); the timer
        pump passes 0. Messages are checked on the helper thread and applied here in arrival
        order; one whose check is still running stays queued for the next poll. Returns the
        number of messages applied. Heartbeats and loss detection run here too.
        """
        if self._sock is None:
            return 0
        zmq = self.zmq
        start = time.perf_counter()
        self._read_monitor()
        self.flush()
        if timeout_ms and not self._inbox and not self._sock.poll(timeout_ms, zmq.POLLIN):
            self._heartbeat(drained=True)
            return 0
        socket_empty = self._receive()
        handled = 0
        while self._inbox:
            future, size = self._inbox[0]
            if not future.done():
                if timeout_ms and not handled:
                    wait = max(timeout_ms / 1000.0, SMALL_CHECK_WAIT_S)  # headless: blocking is fine
                elif size < SMALL_MESSAGE_BYTES:
                    wait = SMALL_CHECK_WAIT_S  # nothing is ahead of it on the helper: ~0.1 ms
                else:
                    break  # a big check still running: apply it next poll
                try:
                    future.result(timeout=wait)
                except concurrent.futures.TimeoutError:
                    break
                except Exception:
                    pass
            self._inbox.popleft()
            try:
                msg = future.result()
            except ProtocolError as e:
                self.stats["dropped"] += 1
                if e.code == "version_mismatch":
                    self._incompatible(e.message)
                continue
            except Exception:  # a bug in checking one message must not stop the pump
                self.stats["dropped"] += 1
                continue
            handled += 1
            self.stats["received"] += 1
            self._handle(msg)
            if time.perf_counter() - start >= budget_s:
                break
            if not self._inbox and not socket_empty:
                socket_empty = self._receive()
        self._heartbeat(socket_empty and not self._inbox)
        if handled:
            self.flush()
        return handled

    def _receive(self):
        """Move waiting messages from the socket to the check queue (no copies). True if drained."""
        zmq = self.zmq
        while len(self._inbox) < MAX_INBOX:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if self._checker is None:
                self._checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conjure-check")
            size = sum(len(f) for f in frames)
            self._inbox.append((self._checker.submit(_check_message, self.session, frames), size))
        return False

    def silent_for(self):
        """Seconds since the backend last said anything (since connecting, if it never did)."""
        return time.monotonic() - (self._last_rx if self._last_rx is not None else self._connected_at)

    def _heartbeat(self, drained=False):
        """Ping every ``PING_INTERVAL_S`` and judge the silence, only when the socket was just read
        empty (so a Blender that itself stalled reads the waiting pong before judging):

        - nothing listening (no TCP connection) and a ping unanswered for ``LOST_AFTER_S``: lost;
        - connected but unanswered for ``SLOW_AFTER_S``: ``slow`` (busy, not gone);
        - unanswered for ``GONE_AFTER_S`` even though connected: lost.
        A closed connection (the socket monitor's disconnect event) is lost at once (``_read_monitor``).
        """
        now = time.monotonic()
        if self.state == "incompatible":
            return
        self._send_ping()
        since = self.silent_for()
        waited = now - self._unanswered_since if self._unanswered_since is not None else 0.0
        if drained and self.state != "lost":
            gone_after = LOST_AFTER_S if self.tcp_connected is False else GONE_AFTER_S
            if waited > gone_after:
                self._mark_lost("No backend answers at %s (silent for %.0f s)." % (self.info.url, since))
            elif waited > SLOW_AFTER_S and self.state == "connected" and not self.slow:
                self.slow = True
                self.changed = True
        if self.state == "lost" and now - self._last_reconnect > RECONNECT_EVERY_S:
            self._last_reconnect = now
            self._maybe_new_endpoint()

    def _maybe_new_endpoint(self):
        """While lost: if the connection file changed (backend restarted elsewhere), follow it."""
        if not self.connection_file:
            return
        try:
            st = os.stat(self.connection_file)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) == self._file_stamp:
            return
        try:
            info = self._read_file()
        except ProtocolError:
            return
        if info.url != self.info.url or info.key != self.info.key:
            self.reconnect(info)

    def _incompatible(self, message):
        self.state = "incompatible"
        self.error = ConjureError(
            "version_mismatch",
            "The backend speaks protocol %s; this add-on speaks %s. Update the older one."
            % (message, PROTOCOL_VERSION))
        self.changed = True

    def _handle(self, msg):
        now = time.monotonic()
        self._last_rx = now
        self._unanswered_since = None
        if self.slow:
            self.slow = False
            self.changed = True
        if msg.server_session and msg.server_session != self.server_session:
            restarted = self.server_session is not None
            self.server_session = msg.server_session
            if restarted:
                self.stats["restarts"] += 1
                self._hello()
                self._reattach()
        if self.state == "lost" and self.tcp_connected is False:
            pass  # read before the connection closed (it waited in the inbox): the backend is still gone
        elif self.state in ("connecting", "lost"):
            was_lost = self.state == "lost"
            self.state = "connected"
            self.error = None
            self.changed = True
            if was_lost:
                self._reattach()
        self.trace.append((msg.msg_type, msg.seq, {k: v for k, v in msg.content.items()
                                                   if k in ("state", "code", "stage", "step", "message")}))
        handler = getattr(self, "_on_" + msg.msg_type, None)
        if handler is not None:
            handler(msg)

    def _reattach(self):
        for job in self.jobs.values():
            if not job.finished:
                self._send("attach", {"from_seq": job.last_seq + 1, "preview_credits": PREVIEW_CREDITS},
                           job_id=job.job_id)
                self._send("status", {}, job_id=job.job_id)
        for (job_id, _name), fetch in list(self._fetches.items()):
            self._request_chunk(job_id, fetch)

    # -- message handlers ----------------------------------------------------------------------
    def _job_for(self, msg):
        job = self.jobs.get(msg.job_id) if msg.job_id else None
        if job is None:
            return None
        if msg.seq is not None:
            if msg.seq <= job.last_seq:
                return None  # a repeat after re-attaching
            job.last_seq = msg.seq
        job.updated_at = time.monotonic()
        self.changed = True
        return job

    def _on_hello_reply(self, msg):
        self.server_info = dict(msg.content)
        version = msg.content.get("protocol_version", "")
        if not version_compatible(version):
            self._incompatible(version)

    def _on_pong(self, msg):
        pass

    def _on_ping(self, msg):
        self._send("pong", {"token": msg.content.get("token", "")})

    def _on_accepted(self, msg):
        job = self._job_for(msg)
        if job is None:
            return
        job.queue_position = msg.content.get("queue_position")
        state = msg.content.get("state") or "queued"
        if not job.finished and state in ("queued", "running"):
            job.state = state

    def _on_progress(self, msg):
        job = self._job_for(msg)
        if job is None or job.finished:
            return
        c = msg.content
        job.state = "running"
        job.stage = c["stage"]
        job.step = c["step"]
        job.total = c["total"]
        job.fraction = c["fraction"]
        job.elapsed = c["elapsed"]
        job.eta = c.get("eta")
        job.message = c.get("message", "")
        if job.message.lower().startswith("warning:"):
            job.add_warning(job.message)
        lo, hi = STAGE_SPANS.get(job.stage, (job.overall, job.overall))
        job.overall = min(1.0, max(job.overall, lo + (hi - lo) * float(job.fraction)))

    def _on_preview_mesh(self, msg):
        job = self._job_for(msg)
        if job is None or job.finished:
            return
        try:
            job.preview_mesh = msg.mesh()
        except ProtocolError as e:
            job.message = "bad preview: " + e.message
            return
        job.preview_step = msg.content.get("step")
        job.previews_received += 1
        self._grant_credit(job)

    def _grant_credit(self, job):
        """Tell the server we are ready for one more preview (credit-based flow control):
        ``preview_credits`` in a ``status`` request adds credits to our subscription."""
        self._send("status", {"preview_credits": 1}, job_id=job.job_id)

    def _on_result_ready(self, msg):
        job = self._job_for(msg)
        if job is None:
            return
        job.result_info = {k: v for k, v in msg.content.items() if k != "mesh"}
        for text in msg.content.get("warnings") or ():
            job.add_warning(text)
        job.preview_mesh = None
        job.fraction = job.overall = 1.0
        try:
            mesh = msg.mesh()
        except ProtocolError as e:
            self._fail(job, ConjureError(e.code, "the result mesh is malformed: " + e.message, job_id=job.job_id))
            return
        if mesh is None:
            self._fail(job, ConjureError("no_mesh", "the backend sent a result without a mesh", job_id=job.job_id))
            return
        job.result_mesh = mesh
        job.state = "done"
        job.finished_at = time.monotonic()

    def _fail(self, job, error, state="failed"):
        job.error = error
        job.state = state
        job.finished_at = time.monotonic()
        job.preview_mesh = None
        self.changed = True

    def _on_cancelled(self, msg):
        job = self._job_for(msg)
        if job is None:
            return
        job.state = "cancelled"
        job.preview_mesh = None
        job.finished_at = time.monotonic()
        job.error = ConjureError("cancelled", msg.content.get("message") or "Cancelled.", job_id=job.job_id)

    def _on_error(self, msg):
        c = msg.content
        code, text = c["code"], c["message"]
        if msg.job_id and code in FETCH_ERRORS:
            for key in [k for k in self._fetches if k[0] == msg.job_id]:
                self._fetches.pop(key)["on_done"](ConjureError(code, text, job_id=msg.job_id))
            if msg.job_id not in self.jobs or self.jobs[msg.job_id].finished:
                return
        if msg.job_id and msg.job_id not in self.jobs:
            # about a job we do not follow (a history request such as delete_job): not a
            # connection problem, so it goes to ``notice``, which the panel shows once
            self.notice = ConjureError(code, text, job_id=msg.job_id)
            self.changed = True
            return
        job = self._job_for(msg) if msg.job_id else None
        if job is None:
            if msg.job_id and msg.job_id in self.jobs:
                return  # a repeated job error after re-attaching
            self.error = ConjureError(code, text, retriable=c.get("retriable", False))
            self.changed = True
            return
        if job.finished:
            return
        action = "retry" if c.get("retriable") else None
        state = "interrupted" if code == "interrupted" else ("lost" if code in ("unknown_job", "no_such_job")
                                                             else "failed")
        self._fail(job, ConjureError(code, text, job_id=job.job_id, action=action,
                                     retriable=c.get("retriable", False)), state)

    def _on_status_reply(self, msg):
        """Status replies (answers to credit grants and to the check after a restart) can end a
        job whose final event we will never see, e.g. one interrupted by a server restart."""
        job = self.jobs.get(msg.job_id)
        if job is None or job.finished:
            return
        c = msg.content
        state = c.get("state")
        if state in ("failed", "cancelled", "interrupted"):
            err = c.get("error") or {}
            code = err.get("code") or state
            text = err.get("message") or "the job %s" % state
            end = "interrupted" if "interrupted" in (code, state) else state
            self._fail(job, ConjureError(code, text, job_id=job.job_id, retriable=bool(err.get("retriable")),
                                         action="retry" if code == "interrupted" else None), end)
        elif state == "done" and not getattr(job, "_refetch", False):
            job._refetch = True  # the result event was missed: ask for the job's events again
            self._send("attach", {"from_seq": 1}, job_id=job.job_id)

    def _on_jobs(self, msg):
        self.history = list(msg.content["jobs"])
        self.history_at = time.monotonic()
        self.changed = True

    def _on_job_deleted(self, msg):
        self.deleted.append(msg.job_id)
        if self.history is not None:
            self.history = [h for h in self.history if h.get("job_id") != msg.job_id]
        self.forget(msg.job_id)
        self.changed = True

    # -- result files (chunked, checked by SHA-256) ------------------------------------------
    def fetch_result(self, job_id, name, size, sha256, on_done, chunk=4 << 20):
        """Fetch a result file in chunks; ``on_done(bytes)`` or ``on_done(ConjureError)``."""
        fetch = {"name": name, "size": int(size), "sha256": sha256, "data": bytearray(),
                 "on_done": on_done, "chunk": int(chunk)}
        self._fetches[(job_id, name)] = fetch
        self._request_chunk(job_id, fetch)

    def fetching(self, job_id, name):
        return (job_id, name) in self._fetches

    def _request_chunk(self, job_id, fetch):
        self._send("fetch_result", {"name": fetch["name"], "offset": len(fetch["data"]),
                                    "length": fetch["chunk"]}, job_id=job_id)

    def _on_result_chunk(self, msg):
        import hashlib

        key = (msg.job_id, msg.content["name"])
        fetch = self._fetches.get(key)
        if fetch is None or msg.content["offset"] != len(fetch["data"]):
            return
        fetch["data"] += bytes(msg.buffers[0])
        if not msg.content["eof"]:
            self._request_chunk(msg.job_id, fetch)
            return
        del self._fetches[key]
        data = bytes(fetch["data"])
        if fetch["sha256"] and hashlib.sha256(data).hexdigest() != fetch["sha256"]:
            fetch["on_done"](ConjureError("bad_checksum", "the fetched result does not match its SHA-256"))
        else:
            fetch["on_done"](data)


def _is_ping(frames):
    try:
        return b'"msg_type":"ping"' in bytes(frames[2])
    except Exception:
        return False


def load_connection(connection=None):
    """A ``ConnectionInfo`` and the file it came from, from any of: None (the default file),
    a path, a ``ConnectionInfo``, or a dict ``{"address": "tcp://host:port", "key": "<hex>"}``.
    """
    if connection is None or isinstance(connection, (str, os.PathLike)):
        path = None if connection is None else os.fspath(connection)
        from .protocol import default_connection_path

        path = path or str(default_connection_path())
        try:
            return read_connection_file(path), path
        except ProtocolError as e:
            raise ConjureError("no_connection_file",
                               "Cannot use the connection file %s: %s" % (path, e.message),
                               action="start_backend") from None
    if isinstance(connection, ConnectionInfo):
        return connection, None
    if isinstance(connection, dict):
        return parse_address(connection.get("address", ""), connection.get("key", "")), None
    raise TypeError("connection must be None, a path, a ConnectionInfo or a dict, not %r" % type(connection))


def parse_address(address, key):
    """``tcp://host:port`` (or ``host:port``) and a hex key -> ``ConnectionInfo``."""
    text = (address or "").strip()
    if "://" in text:
        transport, rest = text.split("://", 1)
    else:
        transport, rest = "tcp", text
    if transport == "ipc":
        host, port = rest, 0
    else:
        host, _, port_text = rest.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            raise ConjureError("bad_address", "Address %r needs a port, like tcp://127.0.0.1:5555" % address) from None
    try:
        return ConnectionInfo(transport=transport, ip=host, port=port, key=(key or "").strip(),
                              protocol_version="%d.0" % PROTOCOL_MAJOR)
    except ProtocolError as e:
        raise ConjureError("bad_address", e.message) from None
