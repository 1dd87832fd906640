"""Connection files: where the backend listens and the key that signs messages.

A connection file is JSON::

    {"transport": "tcp", "ip": "127.0.0.1", "port": 5555, "key": "<hex>",
     "protocol_version": "1.0", "server_public_key": null}

written atomically with mode 0600 (it holds the signing key).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ProtocolError

_TRANSPORTS = ("tcp", "ipc")
_VERSION_RE = re.compile(r"^\d+\.\d+$")
MAX_CONNECTION_FILE_BYTES = 64 * 1024


@dataclass
class ConnectionInfo:
    """How to reach a backend.

    Attributes:
        transport: ``"tcp"`` or ``"ipc"``.
        ip: host address for tcp (``"127.0.0.1"``); the socket path for ipc.
        port: TCP port (1..65535); 0 for ipc.
        key: signing key, bytes (a hex string is accepted and converted).
        protocol_version: ``"MAJOR.MINOR"`` the server speaks.
        server_public_key: optional CURVE public key (z85 text) of the server.
    """

    transport: str
    ip: str
    port: int
    key: bytes
    protocol_version: str
    server_public_key: str | None = None

    def __post_init__(self):
        if isinstance(self.key, str):  # accepted at run time, as the docstring says
            self.key = _key_from_hex(self.key)
        _validate(self)

    @property
    def url(self) -> str:
        """ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555`` or ``ipc:///run/conjure.sock``."""
        if self.transport == "tcp":
            host = f"[{self.ip}]" if ":" in self.ip else self.ip
            return f"tcp://{host}:{self.port}"
        return f"ipc://{self.ip}"

    def to_dict(self) -> dict:
        return {
            "transport": self.transport,
            "ip": self.ip,
            "port": self.port,
            "key": self.key.hex(),
            "protocol_version": self.protocol_version,
            "server_public_key": self.server_public_key,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConnectionInfo:
        if not isinstance(data, dict):
            raise ProtocolError("bad_connection_file", "connection file must hold a JSON object")
        required = ("transport", "ip", "port", "key", "protocol_version")
        for name in required:
            if name not in data:
                raise ProtocolError("bad_connection_file", f"missing field {name!r}", field=name)
        if not isinstance(data["key"], str):
            raise ProtocolError("bad_connection_file", "key must be a hex string", field="key")
        return cls(
            transport=data["transport"],
            ip=data["ip"],
            port=data["port"],
            key=_key_from_hex(data["key"]),
            protocol_version=data["protocol_version"],
            server_public_key=data.get("server_public_key"),
        )


def _key_from_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise ProtocolError("bad_connection_file", "key must be hex", field="key") from e


def _bad(field: str, msg: str) -> ProtocolError:
    return ProtocolError("bad_connection_file", f"{field}: {msg}", field=field)


def _validate(info: ConnectionInfo) -> None:
    if info.transport not in _TRANSPORTS:
        raise _bad("transport", f"must be one of {_TRANSPORTS}, got {info.transport!r}")
    if not isinstance(info.ip, str) or not info.ip or len(info.ip) > 4096:
        raise _bad("ip", "must be a non-empty string")
    if not isinstance(info.port, int) or isinstance(info.port, bool):
        raise _bad("port", "must be an integer")
    if info.transport == "tcp" and not 1 <= info.port <= 65535:
        raise _bad("port", f"must be in 1..65535 for tcp, got {info.port}")
    if not isinstance(info.key, bytes) or len(info.key) == 0:
        raise _bad("key", "must be non-empty")
    if not isinstance(info.protocol_version, str) or not _VERSION_RE.match(info.protocol_version):
        raise _bad("protocol_version", f"must look like '1.0', got {info.protocol_version!r}")
    if info.server_public_key is not None and not isinstance(info.server_public_key, str):
        raise _bad("server_public_key", "must be a string or null")


def default_connection_path() -> Path:
    """``$CONJURE_RUNTIME_DIR/connection.json``, else ``$XDG_RUNTIME_DIR/conjure/connection.json``,
    else ``~/.local/share/conjure/runtime/connection.json``."""
    runtime = os.environ.get("CONJURE_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "connection.json"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "conjure" / "connection.json"
    return Path.home() / ".local" / "share" / "conjure" / "runtime" / "connection.json"


def write_connection_file(path: str | os.PathLike, info: ConnectionInfo) -> Path:
    """Write ``info`` to ``path`` atomically with mode 0600; creates the folder (mode 0700).

    Writes a temporary file opened with ``O_CREAT | O_EXCL`` and mode 0600, fsyncs it and
    renames it over ``path``, so readers never see a partial file. Returns the path.
    """
    _validate(info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    data = json.dumps(info.to_dict(), indent=2).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # in case umask or the platform ignored the mode
        except (AttributeError, OSError):
            pass
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    try:  # make the rename itself durable (best effort: not every platform opens folders)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def read_connection_file(path: str | os.PathLike | None = None) -> ConnectionInfo:
    """Read and validate a connection file (default: ``default_connection_path()``).

    Raises ``ProtocolError("bad_connection_file")`` if it is missing, too big, not JSON or
    malformed (the error names the field).
    """
    path = Path(path) if path is not None else default_connection_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONNECTION_FILE_BYTES + 1)
    except OSError as e:
        raise ProtocolError("bad_connection_file", f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CONNECTION_FILE_BYTES:
        raise ProtocolError("bad_connection_file", f"{path} is larger than {MAX_CONNECTION_FILE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_connection_file", f"{path} is not valid JSON: {e}") from e
    return ConnectionInfo.from_dict(data)
