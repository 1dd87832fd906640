"""Remember the last few grid computations on the same Gaussians, within one process.

A job meshes the same final Gaussians twice (the coarse GLB and the fine stage's starting surface),
and with the cpu preset's equal grids both evaluate the same density grid and carve alike. A
:class:`GaussianMemo` keys a result by a digest of every tensor of the activated Gaussians and of the
computation's settings, so the second evaluation is a lookup. Results are numpy arrays made read-only,
shared by every caller that asks again (copy before writing).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def gaussians_digest(gaussians, settings: Any) -> str:
    """Hex digest of the activated Gaussians' means, quats, scales, opacities and colors (shapes and
    float32 bytes) and of ``repr(settings)``."""
    h = hashlib.blake2b(digest_size=16)
    for t in (gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.colors):
        a = t.detach().float().cpu().contiguous().numpy()
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    h.update(repr(settings).encode())
    return h.hexdigest()


def _parts(result: Any) -> tuple:
    """A result's parts: the items of a tuple, or the result alone."""
    return result if isinstance(result, tuple) else (result,)


def _nbytes(result: Any) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in _parts(result))


class GaussianMemo:
    """The last ``size`` results of one computation, by :func:`gaussians_digest` (thread-safe), holding
    at most ``max_bytes`` of numpy arrays: older results go first, and one larger than that alone is
    returned but not kept (a worker process lives long; the ``high`` preset's 192³ grids with colour
    are 113 MB each)."""

    def __init__(self, size: int = 2, max_bytes: int = 256 << 20):
        self.size = int(size)
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, gaussians, settings: Any, compute: Callable[[], Any]) -> Any:
        """The remembered result for these Gaussians and settings, or ``compute()``'s, remembered.
        Numpy arrays in the result (alone or in a tuple) are made read-only."""
        key = gaussians_digest(gaussians, settings)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        result = compute()
        for a in _parts(result):
            if hasattr(a, "flags"):
                a.flags.writeable = False
        if _nbytes(result) > self.max_bytes:
            return result
        with self._lock:
            self._items[key] = result
            while len(self._items) > self.size or sum(map(_nbytes, self._items.values())) > self.max_bytes:
                self._items.popitem(last=False)
        return result
