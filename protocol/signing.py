"""Message signing (HMAC-SHA256) and replay protection.

The signature of a message is the hex HMAC-SHA256, under the shared key, of every frame
after the signature frame (header JSON, content JSON, buffers), each frame framed by its
length so that bytes cannot be moved across frame boundaries:

    mac = HMAC(key, u64le(n_frames) || for each frame: u64le(len) || body)

where ``body`` is the frame itself for frames up to ``CHUNK_BYTES``, and for larger frames
the concatenated SHA-256 digests of its consecutive ``CHUNK_BYTES`` pieces (a one-level hash
tree, so large buffers hash in parallel threads; hashlib releases the GIL). Verification
uses ``hmac.compare_digest`` (constant time) and happens before any JSON is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .errors import ProtocolError

#: Frames larger than this are hashed as a list of SHA-256 digests of pieces of this size.
CHUNK_BYTES = 1 << 20
#: Length of a signature frame: hex SHA-256.
SIGNATURE_LEN = 64
#: Minimum size (bytes) of all large frames together before hashing goes to threads.
_PARALLEL_MIN = 8 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor | None:
    global _pool
    workers = min(8, os.cpu_count() or 1)
    if workers < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conjure-hash")
        return _pool


def _sha(piece) -> bytes:
    return hashlib.sha256(piece).digest()


def new_key() -> bytes:
    """A fresh random 32-byte signing key."""
    return os.urandom(32)


def _as_view(frame) -> memoryview:
    if isinstance(frame, memoryview):
        view = frame
    elif hasattr(frame, "buffer") and not isinstance(frame, (bytes, bytearray)):
        view = frame.buffer  # zmq.Frame
    else:
        view = memoryview(frame)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B") if view.nbytes else memoryview(b"")
    return view


class Signer:
    """HMAC-SHA256 signer/verifier for a list of frames.

    Args:
        key: the shared secret (non-empty bytes; connection files hold 32 random bytes).
    """

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) == 0:
            raise ProtocolError("bad_key", "signing key must be non-empty bytes")
        self._key = bytes(key)

    def sign(self, frames: Sequence) -> bytes:
        """Hex signature (64 ASCII bytes) over ``frames`` (bytes-likes, memoryviews or zmq Frames)."""
        views = [_as_view(f) for f in frames]
        mac = hmac.new(self._key, digestmod="sha256")
        mac.update(len(views).to_bytes(8, "little"))
        big = [(i, v) for i, v in enumerate(views) if len(v) > CHUNK_BYTES]
        digests: dict[int, bytes] = {}
        if big:
            pieces = [(i, v[o:o + CHUNK_BYTES]) for i, v in big for o in range(0, len(v), CHUNK_BYTES)]
            pool = _get_pool() if sum(len(v) for _, v in big) >= _PARALLEL_MIN else None
            hashed = list(pool.map(_sha, [p for _, p in pieces])) if pool else [_sha(p) for _, p in pieces]
            for (i, _), d in zip(pieces, hashed):
                digests[i] = digests.get(i, b"") + d
        for i, v in enumerate(views):
            mac.update(len(v).to_bytes(8, "little"))
            mac.update(digests[i] if i in digests else v)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature, frames: Sequence) -> None:
        """Raise ``ProtocolError("bad_signature")`` unless ``signature`` signs ``frames``.

        Constant-time comparison; call before parsing anything in ``frames``.
        """
        sig = bytes(_as_view(signature)) if not isinstance(signature, bytes) else signature
        if len(sig) != SIGNATURE_LEN:
            raise ProtocolError("bad_signature", f"signature frame must be {SIGNATURE_LEN} hex bytes")
        if not hmac.compare_digest(self.sign(frames), sig):
            raise ProtocolError("bad_signature", "signature does not match (wrong key or altered message)")


class ReplayGuard:
    """Rejects messages whose signature was already seen, or whose time is out of a window.

    Memory is bounded: at most ``max_entries`` signatures are kept (oldest evicted first,
    entries older than the window are dropped since the time check covers them). When an
    entry still inside the window must be evicted, the guard raises its floor: from then on
    messages with a header time at or below the evicted entry's time are rejected as well, so
    an evicted signature can never be replayed.

    Args:
        window_s: accepted |now - header time| in seconds.
        max_entries: most signatures remembered.
    """

    def __init__(self, window_s: float = 300.0, max_entries: int = 100_000):
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._floor = float("-inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_signature(self, signature: bytes) -> None:
        """Raise ``ProtocolError("replayed")`` if ``signature`` was already accepted."""
        if signature in self._seen:
            raise ProtocolError("replayed", "message signature already seen (replay)")

    def accept(self, signature: bytes, msg_time: float, now: float | None = None) -> None:
        """Check time window and novelty, then remember ``signature``. Raises ProtocolError."""
        now = time.time() if now is None else now
        if not (abs(now - msg_time) <= self.window_s):
            raise ProtocolError(
                "expired", f"header time is {now - msg_time:.1f} s from now (window ±{self.window_s:g} s)"
            )
        with self._lock:
            if signature in self._seen:
                raise ProtocolError("replayed", "message signature already seen (replay)")
            if msg_time <= self._floor:
                raise ProtocolError("replayed", "message older than the replay guard's memory")
            seen = self._seen
            # drop entries that the time window already rejects
            horizon = now - self.window_s
            while seen:
                sig0, t0 = next(iter(seen.items()))
                if t0 >= horizon and len(seen) < self.max_entries:
                    break
                seen.popitem(last=False)
                if t0 >= horizon:
                    self._floor = max(self._floor, t0)
            seen[signature] = msg_time
