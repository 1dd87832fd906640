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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_LOG_LIMIT = 4096
DEFAULT_PREVIEW_CREDITS = 2
MAX_PREVIEW_CREDITS = 64


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
