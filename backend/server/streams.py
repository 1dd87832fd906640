"""Per-job event streams and per-client subscriptions with bounded memory.

Every job has a :class:`JobStream`: a bounded log of its *reliable* events (``accepted``,
``progress``, ``result_ready``, ``cancelled``, ``error``), numbered 1, 2, 3, ... without gaps,
plus one slot holding the *latest* preview mesh ("latest wins": a newer preview replaces an
older one that was not sent yet). Previews are outside the numbered sequence.

A :class:`Subscription` (one client attached to one job) keeps a cursor into the log and a
count of preview credits. The server sends from the log as fast as the client's socket takes
messages (non-blocking); a preview goes out only while the client has credits, and each one
spends a credit. So a slow client costs at most the bounded log plus one preview per job,
never an unbounded queue.

:class:`Delivery` is the server's sending half: the peers (clients by session id, each with a
small outbox for direct replies that did not fit its socket), the job streams and the
subscriptions, and the flush that moves events and previews to subscribers as credits and
sockets allow. It knows the ROUTER socket and the signing :class:`protocol.Session`, nothing
about the worker or the disk (a stream of a job from an earlier run is rebuilt through the
``final_event`` callback it is given).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from protocol import ProtocolError

log = logging.getLogger("conjure.server")

DEFAULT_LOG_LIMIT = 4096
DEFAULT_PREVIEW_CREDITS = 2
MAX_PREVIEW_CREDITS = 64
#: streams of finished jobs kept in memory (older ones are rebuilt from the record on demand)
KEEP_FINISHED_STREAMS = 16
#: a peer silent this long (seconds), with nothing pending, is forgotten
PEER_FORGET_S = 3600.0
#: peers that never grant preview credits get one back every LEGACY_REFILL_S while seen alive
LEGACY_REFILL_S = 1.0
LEGACY_ALIVE_S = 5.0
#: most direct replies queued for one peer whose socket is full, and most bytes of their buffers
OUTBOX_LIMIT = 256
OUTBOX_BYTES = 8 << 20
#: most peers remembered; beyond it the least recently seen idle peer is forgotten (LRU)
MAX_PEERS = 4096


@dataclass
class Event:
    """One numbered event: ``msg_type``, ``content`` dict and binary ``buffers``."""

    seq: int
    msg_type: str
    content: dict
    buffers: tuple = ()


@dataclass
class Preview:
    """The latest preview of a job: ``number`` counts previews (1, 2, ...); ``after_seq`` is the seq
    of the last reliable event when it arrived."""

    number: int
    after_seq: int
    content: dict
    buffers: tuple


class JobStream:
    """Bounded log of a job's reliable events plus the latest preview."""

    def __init__(self, job_id: str, limit: int = DEFAULT_LOG_LIMIT, first_seq: int = 1):
        self.job_id = job_id
        self.limit = limit
        self.events: deque[Event] = deque(maxlen=limit)
        self.next_seq = first_seq
        self.preview: Preview | None = None
        self.preview_count = 0
        self.closed = False  # a final event was appended

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def first_seq(self) -> int:
        """Oldest seq still held (``last_seq + 1`` when empty)."""
        return self.events[0].seq if self.events else self.next_seq

    def append(self, msg_type: str, content: dict, buffers: tuple = (), final: bool = False) -> Event:
        ev = Event(self.next_seq, msg_type, content, tuple(buffers))
        self.events.append(ev)
        self.next_seq += 1
        if final:
            self.closed = True
        return ev

    def get(self, seq: int) -> Event | None:
        """Event ``seq`` if still held."""
        if not self.events:
            return None
        i = seq - self.events[0].seq
        if 0 <= i < len(self.events):
            return self.events[i]
        return None

    def set_preview(self, content: dict, buffers: tuple) -> Preview:
        self.preview_count += 1
        self.preview = Preview(self.preview_count, self.last_seq, content, tuple(buffers))
        return self.preview

    def drop_preview(self) -> None:
        """Free the preview mesh (after the job ended and no subscriber needs it)."""
        self.preview = None


@dataclass
class Subscription:
    """A client following a job's stream. ``cursor`` is the last seq sent to it."""

    job_id: str
    client: str  # the client's session id
    cursor: int = 0
    credits: int = DEFAULT_PREVIEW_CREDITS
    preview_sent: int = 0  # number of the last preview sent
    missed: int = 0  # events evicted from the log before this client read them

    def grant(self, credits: int) -> None:
        self.credits = max(0, min(MAX_PREVIEW_CREDITS, self.credits + int(credits)))

    def pending(self, stream: JobStream | None) -> bool:
        if stream is None:
            return False
        if self.cursor < stream.last_seq:
            return True
        p = stream.preview
        return p is not None and self.credits > 0 and p.number > self.preview_sent


@dataclass
class Peer:
    """A client of this server, known by its session id (header ``session``).

    ``routing_id`` is its ROUTER identity (updated on every message); ``outbox`` holds direct
    replies that its socket did not take yet (at most ``OUTBOX_LIMIT`` entries and
    ``OUTBOX_BYTES`` of buffers), as :class:`Outgoing` items. A large reply (``result_chunk``) is
    queued *lazily*: only its recipe, read when the peer's pipe has room again, so a peer that
    does not read costs the ZeroMQ pipe (``SNDHWM`` messages) plus a few small records.
    """

    routing_id: bytes
    last_seen: float
    explicit_credits: bool = False
    last_refill: float = 0.0
    outbox: deque = field(default_factory=deque)
    outbox_bytes: int = 0


@dataclass
class Outgoing:
    """A direct reply waiting in a peer's outbox; ``make`` (lazy replies) returns
    ``(msg_type, content, buffers)`` when it is finally sent."""

    msg_type: str
    content: dict | None
    buffers: tuple = ()
    job_id: str | None = None
    seq: int | None = None
    make: Callable | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(b) if isinstance(b, (bytes, bytearray)) else int(getattr(b, "nbytes", 0))
                   for b in self.buffers)


class Delivery:
    """Outbox, streams, subscriptions and credits: everything the server sends goes through here.

    Args:
        stats: the server's counter dict (``sent``, ``send_again``, ``outbox_overflow``, ...).
        log_limit: events kept per job stream.
        final_event: ``rec -> (msg_type, content, buffers)`` of a finished job, to rebuild the
            stream of a job whose stream was trimmed or that ended in an earlier run.
    """

    def __init__(self, stats: dict, log_limit: int, final_event: Callable):
        self.stats = stats
        self.log_limit = log_limit
        self.final_event = final_event
        self.session = None  # protocol.Session, set by bind()
        self.sock = None
        self.peers: OrderedDict[str, Peer] = OrderedDict()  # least recently seen first
        self.streams: OrderedDict[str, JobStream] = OrderedDict()
        self.subs: dict[str, dict[str, Subscription]] = {}
        self.dirty: set[str] = set()  # job ids whose subscribers may have something to send

    def bind(self, session, sock) -> None:
        self.session, self.sock = session, sock

    # ------------------------------------------------------------------ peers
    def touch(self, peer_id: str, routing_id: bytes, now: float) -> Peer:
        """The peer that sent a message (created on its first message)."""
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = Peer(routing_id, now, last_refill=now)
            if len(self.peers) > MAX_PEERS:
                self._evict_peers()
        else:
            self.peers.move_to_end(peer_id)
        peer.routing_id = routing_id
        peer.last_seen = now
        return peer

    def _evict_peers(self) -> None:
        """Forget the least recently seen peers that follow no job and wait for nothing."""
        subscribed = {pid for subs in self.subs.values() for pid in subs}
        for peer_id in list(self.peers):
            if len(self.peers) <= MAX_PEERS:
                return
            peer = self.peers[peer_id]
            if not peer.outbox and peer_id not in subscribed:
                del self.peers[peer_id]
                self.stats["peers_evicted"] = self.stats.get("peers_evicted", 0) + 1

    def peer_gone(self, peer_id: str) -> None:
        """The peer's socket disconnected: drop its subscriptions (jobs go on, results persist)."""
        self.stats["clients_gone"] += 1
        peer = self.peers.pop(peer_id, None)
        if peer is not None:
            peer.outbox.clear()
        for subs in self.subs.values():
            subs.pop(peer_id, None)

    def forget_idle(self, now: float) -> None:
        for peer_id, peer in list(self.peers.items()):
            if now - peer.last_seen > PEER_FORGET_S and not peer.outbox:
                if not any(peer_id in subs for subs in self.subs.values()):
                    del self.peers[peer_id]

    # ------------------------------------------------------------------ sending
    def send(self, peer_id: str, msg_type: str, content: dict, buffers=(), *, job_id=None, seq=None,
             direct: bool = True) -> str:
        """Send to a peer (by session id). Returns 'ok', 'again' (its pipe is full), 'gone' or 'skip'.

        ``direct`` replies that cannot go out now are kept in the peer's small outbox. A message
        the protocol refuses to encode (a bug, e.g. NaN in stored data) is sent with non-finite
        numbers as null, or replaced by an ``error`` naming what failed: the peer always gets an answer.
        """
        peer = self.peers.get(peer_id)
        if peer is None:
            return "gone"
        if direct and peer.outbox:
            return self._queue_direct(peer, Outgoing(msg_type, content, tuple(buffers), job_id, seq))
        r = self._send_now(peer_id, peer, msg_type, content, buffers, job_id, seq)
        if r == "again" and direct:
            return self._queue_direct(peer, Outgoing(msg_type, content, tuple(buffers), job_id, seq))
        return r

    def send_lazy(self, peer_id: str, make: Callable, *, job_id=None) -> str:
        """A large direct reply built by ``make() -> (msg_type, content, buffers)`` only when the
        peer's pipe takes it (read the file then, not now). Same returns as :meth:`send`."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return "gone"
        if not peer.outbox:
            msg_type, content, buffers = make()
            r = self._send_now(peer_id, peer, msg_type, content, buffers, job_id, None)
            if r != "again":
                return r
        return self._queue_direct(peer, Outgoing("", None, (), job_id, None, make))

    def _send_now(self, peer_id: str, peer: Peer, msg_type, content, buffers, job_id, seq) -> str:
        try:
            self._encode_and_send(peer_id, peer, msg_type, content, buffers, job_id, seq)
        except zmq.Again:
            self.stats["send_again"] += 1
            return "again"
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self.peer_gone(peer_id)
                return "gone"
            raise
        except _Unsendable:
            return "skip"
        self.stats["sent"] += 1
        return "ok"

    def _encode_and_send(self, peer_id: str, peer: Peer, msg_type, content, buffers, job_id, seq) -> None:
        send = self.session.send
        kw = dict(job_id=job_id, seq=seq, routing_id=peer.routing_id, session=peer_id, flags=zmq.NOBLOCK)
        try:
            send(self.sock, msg_type, content, buffers, **kw)
            return
        except ProtocolError as exc:  # our own message does not fit the schema: a bug, not the peer's fault
            first = exc
        from .jobs import json_safe

        self.stats["unsendable"] += 1
        try:
            send(self.sock, msg_type, json_safe(content), buffers, **kw)
            log.error("sent %s to %s with non-finite numbers as null (%s)", msg_type, peer_id, first)
            return
        except ProtocolError as exc:
            log.error("cannot send %s to %s: %s", msg_type, peer_id, exc)
        try:  # the peer still learns that something went wrong (same job id and seq)
            send(self.sock, "error", {"code": "internal_error", "retriable": False,
                                      "message": f"the server could not encode its {msg_type} message: "
                                                 f"{first.message}"[:2000]}, (), **kw)
        except ProtocolError as exc:
            log.error("cannot send an error to %s either: %s", peer_id, exc)
            raise _Unsendable from exc

    def error(self, peer_id: str, code: str, message: str, *, job_id=None, retriable: bool = False,
              in_reply_to=None, field=None) -> None:
        content = {"code": code, "message": message, "retriable": retriable}
        if in_reply_to:
            content["in_reply_to"] = in_reply_to
        if field:
            content["field"] = field
        self.send(peer_id, "error", content, job_id=job_id)

    def _queue_direct(self, peer: Peer, item: Outgoing) -> str:
        size = item.nbytes
        if len(peer.outbox) >= OUTBOX_LIMIT or peer.outbox_bytes + size > OUTBOX_BYTES:
            self.stats["outbox_overflow"] += 1
            return "again"
        peer.outbox.append(item)
        peer.outbox_bytes += size
        return "again"

    def _flush_outbox(self, peer_id: str, peer: Peer) -> bool:
        """Send queued direct replies; True when the outbox is empty."""
        while peer.outbox:
            item = peer.outbox[0]
            if item.make is not None:  # built now, when it can go out (and again after a retry)
                msg_type, content, buffers = item.make()
            else:
                msg_type, content, buffers = item.msg_type, item.content, item.buffers
            r = self._send_now(peer_id, peer, msg_type, content, buffers, item.job_id, item.seq)
            if r == "again":
                return False
            if r == "gone":
                return False
            peer.outbox.popleft()
            peer.outbox_bytes = max(0, peer.outbox_bytes - item.nbytes)
        return True

    # ------------------------------------------------------------------ streams
    def new_stream(self, job_id: str, first_seq: int = 1) -> JobStream:
        stream = JobStream(job_id, self.log_limit, first_seq)
        self.streams[job_id] = stream
        self.streams.move_to_end(job_id)
        return stream

    def ensure_stream(self, rec) -> JobStream:
        """The job's stream, rebuilt from the record for jobs of a previous run or evicted streams:
        the final event gets the seq it had (``rec.last_seq``)."""
        stream = self.streams.get(rec.job_id)
        if stream is not None:
            return stream
        if rec.state in ("queued", "running"):  # cannot happen: active jobs always have streams
            return self.new_stream(rec.job_id)
        stream = self.new_stream(rec.job_id, first_seq=max(1, rec.last_seq))
        msg_type, content, buffers = self.final_event(rec)
        stream.append(msg_type, content, buffers, final=True)
        return stream

    def append(self, rec, stream: JobStream, msg_type: str, content: dict, buffers=(),
               final: bool = False) -> None:
        """Add a numbered event to the job's stream; ``rec.last_seq`` follows (persisted with the
        job's next state change, no fsync on this path)."""
        if stream.closed:
            return
        ev = stream.append(msg_type, content, buffers, final=final)
        rec.last_seq = ev.seq
        self.dirty.add(rec.job_id)

    def set_preview(self, job_id: str, stream: JobStream, content: dict, buffers: tuple) -> None:
        stream.set_preview(content, buffers)
        self.dirty.add(job_id)

    def subscribe(self, job_id: str, peer_id: str, cursor: int) -> Subscription:
        subs = self.subs.setdefault(job_id, {})
        sub = subs.get(peer_id)
        if sub is None:
            sub = subs[peer_id] = Subscription(job_id, peer_id, cursor=cursor)
        else:
            sub.cursor = cursor
        self.dirty.add(job_id)
        return sub

    def subscription(self, job_id: str, peer_id: str) -> Subscription | None:
        return self.subs.get(job_id, {}).get(peer_id)

    def grant(self, peer_id: str, sub: Subscription, credits: int) -> None:
        """Add preview credits (explicitly granted: the legacy refill stops for this peer)."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.explicit_credits = True
        sub.grant(credits)
        self.dirty.add(sub.job_id)

    def trim(self, keep: set[str] = frozenset()) -> None:
        """Keep the streams of active jobs (``keep``: running and queued, whatever their stream
        says) and of the last KEEP_FINISHED_STREAMS finished ones."""
        finished = [j for j, s in self.streams.items() if s.closed and not self.subs.get(j) and j not in keep]
        for job_id in finished[:-KEEP_FINISHED_STREAMS] if len(finished) > KEEP_FINISHED_STREAMS else []:
            del self.streams[job_id]
            self.subs.pop(job_id, None)
        for job_id, stream in self.streams.items():
            if stream.closed and stream.preview is not None and not self.subs.get(job_id):
                stream.drop_preview()
        for job_id in [j for j, s in self.subs.items() if not s]:
            del self.subs[job_id]

    # ------------------------------------------------------------------ flush
    def flush(self) -> None:
        """Send what can go now: outboxes first, then every dirty job's subscribers."""
        now = time.monotonic()
        for peer_id, peer in list(self.peers.items()):
            if peer.outbox:
                self._flush_outbox(peer_id, peer)
        for job_id in list(self.dirty):
            subs = self.subs.get(job_id)
            stream = self.streams.get(job_id)
            busy = False
            if subs and stream is not None:
                for peer_id, sub in list(subs.items()):
                    peer = self.peers.get(peer_id)
                    if peer is None:
                        subs.pop(peer_id, None)
                        continue
                    if peer.outbox:
                        busy = True
                        continue
                    if not peer.explicit_credits and sub.credits == 0 and \
                            now - peer.last_refill >= LEGACY_REFILL_S and now - peer.last_seen < LEGACY_ALIVE_S:
                        sub.credits = 1
                        peer.last_refill = now
                    if self._flush_sub(stream, sub):
                        busy = True
                    elif stream.closed and sub.cursor >= stream.last_seq:
                        del subs[peer_id]  # the peer has the whole stream: forget it
            if not busy:
                self.dirty.discard(job_id)

    def _flush_sub(self, stream: JobStream, sub: Subscription, budget: int = 256) -> bool:
        """Send what ``sub`` has not seen; True if something is still pending afterwards."""
        for _ in range(budget):
            if sub.cursor < stream.last_seq:
                nxt = sub.cursor + 1
                ev = stream.get(nxt)
                if ev is None:  # evicted from the bounded log
                    sub.missed += stream.first_seq - nxt
                    sub.cursor = stream.first_seq - 1
                    continue
                content = ev.content
                if sub.missed:
                    content = {**content, "missed": sub.missed}
                r = self.send(sub.client, ev.msg_type, content, ev.buffers, job_id=stream.job_id, seq=ev.seq,
                              direct=False)
                if r in ("again", "gone"):
                    return r == "again"
                sub.missed = 0
                sub.cursor = nxt  # sent (or unsendable: skipped so the stream goes on)
                continue
            p = stream.preview
            if p is not None and not stream.closed and sub.credits > 0 and p.number > sub.preview_sent:
                content = {**p.content, "preview_no": p.number, "after_seq": p.after_seq}
                r = self.send(sub.client, "preview_mesh", content, p.buffers, job_id=stream.job_id, direct=False)
                if r in ("again", "gone"):
                    return r == "again"
                if sub.preview_sent and p.number > sub.preview_sent + 1:
                    self.stats["previews_replaced"] += p.number - sub.preview_sent - 1
                sub.preview_sent = p.number
                sub.credits -= 1
                self.stats["previews_sent"] += 1
                continue
            return False
        return True


class _Unsendable(Exception):
    """Neither the message nor an error about it could be encoded (logged, counted)."""
