"""Who may talk to the server: loopback by default, CurveZMQ with a client allow-list otherwise.

Key directory layout (made by ``conjure-backend keys --dir DIR``)::

    DIR/server.key           server public key (ZeroMQ certificate format, z85)
    DIR/server.key_secret    server secret key (mode 0600)
    DIR/clients/*.key        public keys of the clients that may connect (the allow-list)
    DIR/<name>.key[_secret]  client key pairs made with ``--client NAME`` (copy them to the client)

A client whose public key is not in ``clients/`` fails the CURVE handshake (pyzmq's
``ThreadAuthenticator`` answers the ZAP request with 400) and never reaches the control loop.
The HMAC signing key of the connection file stays in force as a second layer.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


class SecurityError(Exception):
    """A bind or key configuration that the server refuses."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class CurveKeys:
    """Loaded server key pair and the allow-list folder."""

    public: bytes
    secret: bytes
    clients_dir: Path
    allowed: int


def load_curve_keys(keys_dir: Path) -> CurveKeys:
    """Load ``server.key_secret`` and count ``clients/*.key``; clear errors when something is missing."""
    keys_dir = Path(keys_dir).expanduser()
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support; cannot secure a network bind")
    secret_file = keys_dir / "server.key_secret"
    if not secret_file.exists():
        raise SecurityError(f"no server secret key at {secret_file}; create one with "
                            f"`conjure-backend keys --dir {keys_dir} --client NAME`")
    public, secret = zmq.auth.load_certificate(secret_file)
    if not secret:
        raise SecurityError(f"{secret_file} holds no secret key")
    clients = keys_dir / "clients"
    allowed = len(list(clients.glob("*.key"))) if clients.is_dir() else 0
    if allowed == 0:
        raise SecurityError(f"the client allow-list {clients} is empty; add client public keys "
                            f"(`conjure-backend keys --dir {keys_dir} --client NAME`)")
    return CurveKeys(public, secret, clients, allowed)


def check_bind(ip: str, curve: CurveKeys | None) -> None:
    """Refuse a non-loopback bind without CURVE."""
    if not is_loopback(ip) and curve is None:
        raise SecurityError(
            f"refusing to bind to {ip}: it is not a loopback address and CurveZMQ is not configured. "
            "Pass --curve-keys DIR with a server key pair and a client allow-list "
            "(make them with `conjure-backend keys --dir DIR --client NAME`), or bind to 127.0.0.1.")


def start_authenticator(context: zmq.Context, curve: CurveKeys):
    """Start pyzmq's ZAP authenticator that admits only the allow-listed client keys."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(curve.clients_dir))
    return auth


def apply_server_curve(socket: zmq.Socket, curve: CurveKeys) -> None:
    socket.curve_secretkey = curve.secret
    socket.curve_publickey = curve.public
    socket.curve_server = True


def make_keys(keys_dir: Path, clients: list[str]) -> list[Path]:
    """Create the server key pair (if missing) and one key pair per client name; allow-list them.

    Returns the files written. Secret files get mode 0600.
    """
    keys_dir = Path(keys_dir).expanduser()
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (keys_dir / "clients").mkdir(exist_ok=True, mode=0o700)
    written = []
    if not (keys_dir / "server.key_secret").exists():
        pub, sec = zmq.auth.create_certificates(str(keys_dir), "server")
        os.chmod(sec, 0o600)
        written += [Path(pub), Path(sec)]
    for name in clients:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise SecurityError(f"client name {name!r} must be letters, digits, '-' or '_'")
        pub, sec = zmq.auth.create_certificates(str(keys_dir), name)
        os.chmod(sec, 0o600)
        shutil.copy(pub, keys_dir / "clients" / f"{name}.key")
        written += [Path(pub), Path(sec), keys_dir / "clients" / f"{name}.key"]
    return written
