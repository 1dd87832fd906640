"""Signer: the documented MAC construction, threaded hashing of large frames, key checks."""

import hashlib
import hmac
import os

import numpy as np
import pytest

from protocol import ProtocolError, Signer
from protocol.signing import CHUNK_BYTES


def reference_signature(key, frames):
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(len(frames).to_bytes(8, "little"))
    for f in frames:
        f = bytes(f)
        mac.update(len(f).to_bytes(8, "little"))
        if len(f) > CHUNK_BYTES:
            mac.update(b"".join(hashlib.sha256(f[o:o + CHUNK_BYTES]).digest() for o in range(0, len(f), CHUNK_BYTES)))
        else:
            mac.update(f)
    return mac.hexdigest().encode()


@pytest.mark.parametrize("sizes", [[0, 5], [CHUNK_BYTES, CHUNK_BYTES + 1], [3, 9 * CHUNK_BYTES + 17, 2 * CHUNK_BYTES]])
def test_signature_matches_reference(sizes):
    key = os.urandom(32)
    frames = [os.urandom(n) for n in sizes]
    s = Signer(key)
    sig = s.sign(frames)
    assert sig == reference_signature(key, frames)
    # memoryviews and numpy arrays of the same bytes sign the same
    assert s.sign([memoryview(f) for f in frames]) == sig
    assert s.sign([np.frombuffer(f, np.uint8) for f in frames]) == sig
    s.verify(sig, frames)
    with pytest.raises(ProtocolError):
        s.verify(sig, frames[:-1])


def test_bad_keys():
    for key in (b"", "text", None):
        with pytest.raises(ProtocolError) as e:
            Signer(key)
        assert e.value.code == "bad_key"
