"""A small blocking client for the backend (tests, benchmarks, scripts). Not used by Blender.

    client = BackendClient.from_connection_file(path)
    job_id = client.submit({"prompt": "a red cube", "preset": "draft"})
    result = client.wait_result(job_id, timeout=600)        # the result_ready Message
    data = client.fetch(job_id)                              # GLB bytes, SHA-256 checked

Messages that arrive while the client waits for something else are kept (in arrival order)
and handed out by later calls, so nothing is lost between calls.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import zmq

from protocol import PROTOCOL_VERSION, ConnectionInfo, Message, ProtocolError, Session, new_job_id
from protocol.connection import read_connection_file

TERMINAL = ("result_ready", "error", "cancelled")


class BackendError(Exception):
    """The server answered with ``error`` (or a job ended without a result)."""

    def __init__(self, code: str, message: str, retriable: bool = False, msg: Message | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retriable, self.msg = code, message, retriable, msg


class BackendTimeout(TimeoutError):
    """No expected answer within the timeout (the server may be down)."""


class BackendClient:
    """Blocking DEALER client.

    Args:
        info: the server's ``ConnectionInfo``.
        client_cert: with CURVE, the client's secret certificate file (``NAME.key_secret``); a fresh
            key pair (not on any allow-list) when omitted.
        session_id: the client's session id (default random).
    """

    def __init__(self, info: ConnectionInfo, *, client_cert: Path | None = None, session_id: str | None = None,
                 context: zmq.Context | None = None):
        self.info = info
        self.session = Session(info.key, session_id)
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if info.server_public_key:
            if client_cert is not None:
                from zmq.auth import load_certificate

                pub, sec = load_certificate(str(client_cert))
            else:
                pub, sec = zmq.curve_keypair()
            self.sock.curve_publickey = pub
            self.sock.curve_secretkey = sec
            self.sock.curve_serverkey = info.server_public_key.encode()
        self.sock.connect(info.url)
        self.inbox: deque[Message] = deque()
        self.dropped = 0
        self.server_session: str | None = None

    @classmethod
    def from_connection_file(cls, path=None, **kw) -> BackendClient:
        return cls(read_connection_file(path), **kw)

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ raw
    def send(self, msg_type: str, content: dict | None = None, *, job_id: str | None = None, buffers=()) -> Message:
        return self.session.send(self.sock, msg_type, content or {}, buffers, job_id=job_id)

    def _read(self, timeout: float) -> Message | None:
        if not self.sock.poll(max(0, int(timeout * 1000))):
            return None
        try:
            _, msg = self.session.recv(self.sock, zmq.NOBLOCK)
        except zmq.Again:
            return None
        except ProtocolError:
            self.dropped += 1
            return None
        if msg.server_session:
            self.server_session = msg.server_session
        return msg

    def next(self, predicate: Callable[[Message], bool] = lambda m: True, timeout: float = 5.0) -> Message:
        """The first message (kept or new) that matches ``predicate``; others stay kept."""
        for i, m in enumerate(self.inbox):
            if predicate(m):
                del self.inbox[i]
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeout(f"no matching message within {timeout:g} s")
            m = self._read(left)
            if m is None:
                continue
            if predicate(m):
                return m
            self.inbox.append(m)

    def request(self, msg_type: str, content: dict | None = None, *, job_id: str | None = None,
                expect: tuple[str, ...], timeout: float = 5.0) -> Message:
        """Send and wait for a reply of a type in ``expect`` (or an ``error`` about the request)."""
        sent = self.send(msg_type, content, job_id=job_id)

        def match(m: Message) -> bool:
            if m.msg_type == "error" and m.content.get("in_reply_to") == sent.msg_id:
                return True
            return m.msg_type in expect and (job_id is None or m.job_id == job_id)

        reply = self.next(match, timeout)
        if reply.msg_type == "error":
            raise BackendError(reply.content["code"], reply.content["message"], reply.content["retriable"], reply)
        return reply

    # ------------------------------------------------------------------ API
    def hello(self, timeout: float = 5.0) -> Message:
        return self.request("hello", {"protocol_version": PROTOCOL_VERSION, "client_name": "backend.server.client"},
                            expect=("hello_reply",), timeout=timeout)

    def ping(self, timeout: float = 5.0) -> Message:
        token = new_job_id()
        return self.request("ping", {"token": token}, expect=("pong",), timeout=timeout)

    def submit(self, params: dict, job_id: str | None = None, *, preview_credits: int | None = None,
               timeout: float = 5.0, mesh=None, base_color=None) -> str:
        """Submit; returns the job id once ``accepted`` arrives (raises ``BackendError``).

        With ``mesh`` (a ``MeshPayload``) the job is a texture job: the mesh is uploaded
        (``protocol.mesh.texture_submit``: in the submit, or in ``upload`` pieces before it) with the
        optional ``base_color`` (3 or 4 sRGB floats in 0..1).
        """
        job_id = job_id or new_job_id()
        content = {"params": params}
        buffers = ()
        if mesh is not None:  # small meshes ride in the submit, larger ones go first in upload pieces
            from protocol.mesh import texture_submit

            pieces, content, buffers = texture_submit(params, mesh, base_color)
            for piece, chunk in pieces:
                self.send("upload", piece, job_id=job_id, buffers=chunk)
        if preview_credits is not None:
            content["preview_credits"] = preview_credits
        sent = self.send("submit", content, job_id=job_id, buffers=buffers)

        def match(m):
            if m.job_id != job_id:
                return False
            return m.msg_type == "accepted" or (m.msg_type == "error" and m.content.get("in_reply_to") == sent.msg_id)

        reply = self.next(match, timeout)
        if reply.msg_type == "error":
            raise BackendError(reply.content["code"], reply.content["message"], reply.content["retriable"], reply)
        self.inbox.appendleft(reply)  # keep it in the job's event stream
        return job_id

    def events(self, job_id: str, timeout: float = 60.0):
        """Yield the job's messages until a terminal one (inclusive)."""
        while True:
            m = self.next(lambda m: m.job_id == job_id and m.msg_type not in ("status_reply", "result_chunk"),
                          timeout)
            yield m
            if m.msg_type in TERMINAL and m.seq is not None:
                return

    def wait_result(self, job_id: str, timeout: float = 600.0, on_event=None) -> Message:
        """Events until the end; returns ``result_ready`` or raises ``BackendError``."""
        deadline = time.monotonic() + timeout
        for m in self.events(job_id, timeout):
            if on_event is not None:
                on_event(m)
            if m.msg_type == "result_ready":
                return m
            if m.msg_type == "error" and m.seq is not None:
                raise BackendError(m.content["code"], m.content["message"], m.content["retriable"], m)
            if m.msg_type == "cancelled" and m.seq is not None:
                raise BackendError("cancelled", m.content.get("message", ""), False, m)
            if time.monotonic() > deadline:
                break
        raise BackendTimeout(f"job {job_id} did not finish within {timeout:g} s")

    def cancel(self, job_id: str, timeout: float = 5.0) -> Message:
        return self.request("cancel", {}, job_id=job_id, expect=("cancelled",), timeout=timeout)

    def status(self, job_id: str, timeout: float = 5.0, **extra) -> Message:
        return self.request("status", dict(extra), job_id=job_id, expect=("status_reply",), timeout=timeout)

    def list_jobs(self, timeout: float = 5.0, **content) -> list[dict]:
        return self.request("list_jobs", content, expect=("jobs",), timeout=timeout).content["jobs"]

    def attach(self, job_id: str, from_seq: int = 1, preview_credits: int | None = None) -> Message:
        content = {"from_seq": from_seq}
        if preview_credits is not None:
            content["preview_credits"] = preview_credits
        return self.send("attach", content, job_id=job_id)

    def fetch(self, job_id: str, name: str | None = None, *, chunk: int = 1 << 20, window: int = 4,
              timeout: float = 30.0) -> bytes:
        """Download a result file (default the GLB) chunk by chunk; checks size and SHA-256."""
        first = {"offset": 0, "length": chunk}
        if name:
            first["name"] = name
        reply = self.request("fetch_result", first, job_id=job_id, expect=("result_chunk",), timeout=timeout)
        size, digest, name = reply.content["size"], reply.content.get("sha256"), reply.content["name"]
        parts = {0: bytes(reply.buffers[0])}
        if not reply.content["eof"]:
            chunk = len(parts[0])  # the server may cap the chunk size
        offsets = list(range(chunk, size, chunk))
        inflight: dict[int, str] = {}
        while offsets or inflight:
            while offsets and len(inflight) < window:
                off = offsets.pop(0)
                sent = self.send("fetch_result", {"name": name, "offset": off, "length": chunk}, job_id=job_id)
                inflight[off] = sent.msg_id
            ids = set(inflight.values())

            def match(m, ids=ids):
                if m.msg_type == "error":
                    return m.content.get("in_reply_to") in ids
                return (m.msg_type == "result_chunk" and m.job_id == job_id
                        and m.content["offset"] in inflight and m.content["name"] == name)

            m = self.next(match, timeout)
            if m.msg_type == "error":
                raise BackendError(m.content["code"], m.content["message"], m.content["retriable"], m)
            parts[m.content["offset"]] = bytes(m.buffers[0])
            del inflight[m.content["offset"]]
        data = b"".join(parts[k] for k in sorted(parts))
        if len(data) != size:
            raise BackendError("bad_transfer", f"got {len(data)} bytes of {size}")
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise BackendError("bad_transfer", "SHA-256 of the downloaded file does not match")
        return data
