"""Connection files: atomic 0600 writes, validation, default location."""

import json
import os
import stat

import pytest

from protocol import (
    ConnectionInfo,
    ProtocolError,
    default_connection_path,
    new_key,
    read_connection_file,
    write_connection_file,
)


def _info(**kw):
    base = dict(transport="tcp", ip="127.0.0.1", port=5555, key=new_key(), protocol_version="1.0")
    base.update(kw)
    return ConnectionInfo(**base)


def test_write_read_roundtrip_mode_0600(tmp_path):
    path = tmp_path / "rt" / "connection.json"
    info = _info(server_public_key="Z85publickey")
    old = os.umask(0)
    try:
        write_connection_file(path, info)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_connection_file(path) == info
    data = json.loads(path.read_text())
    assert data["key"] == info.key.hex() and data["port"] == 5555
    assert [p.name for p in path.parent.iterdir()] == ["connection.json"]  # no temp files left
    assert info.url == "tcp://127.0.0.1:5555"
    assert _info(ip="::1").url == "tcp://[::1]:5555"
    assert _info(transport="ipc", ip="/run/c.sock", port=0).url == "ipc:///run/c.sock"


def test_rewrite_replaces_atomically(tmp_path):
    path = tmp_path / "connection.json"
    write_connection_file(path, _info(port=1000))
    write_connection_file(path, _info(port=2000))
    assert read_connection_file(path).port == 2000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_given_as_hex_string():
    info = _info(key="00ff10")
    assert info.key == b"\x00\xff\x10"


@pytest.mark.parametrize("kw,field", [
    ({"transport": "udp"}, "transport"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"port": "5555"}, "port"),
    ({"ip": ""}, "ip"),
    ({"key": b""}, "key"),
    ({"key": "zz"}, "key"),
    ({"protocol_version": "1"}, "protocol_version"),
    ({"server_public_key": 5}, "server_public_key"),
])
def test_invalid_info(kw, field):
    with pytest.raises(ProtocolError) as e:
        _info(**kw)
    assert e.value.code == "bad_connection_file" and e.value.field == field


@pytest.mark.parametrize("text", ["", "{", "[]", '{"transport": "tcp"}', "x" * 70000,
                                  '{"transport":"tcp","ip":"h","port":1,"key":5,"protocol_version":"1.0"}'])
def test_bad_files(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ProtocolError) as e:
        read_connection_file(path)
    assert e.value.code == "bad_connection_file"


def test_missing_file(tmp_path):
    with pytest.raises(ProtocolError) as e:
        read_connection_file(tmp_path / "nope.json")
    assert e.value.code == "bad_connection_file"


def test_default_path_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CONJURE_RUNTIME_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "b"))
    assert default_connection_path() == tmp_path / "a" / "connection.json"
    monkeypatch.delenv("CONJURE_RUNTIME_DIR")
    assert default_connection_path() == tmp_path / "b" / "conjure" / "connection.json"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_connection_path() == tmp_path / "home" / ".local" / "share" / "conjure" / "runtime" / "connection.json"
