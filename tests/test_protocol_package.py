"""The package is vendorable: relative imports only, importable under another name, light imports."""

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "protocol"

SCRIPT = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "vendored.protocol", {str(PKG / "__init__.py")!r}, submodule_search_locations=[{str(PKG)!r}])
sys.modules["vendored"] = type(sys)("vendored")
mod = importlib.util.module_from_spec(spec)
sys.modules["vendored.protocol"] = mod
spec.loader.exec_module(mod)
s = mod.Session(b"k")
msg = s.deserialize(s.serialize(s.msg("ping", {{"token": "t"}})))
assert msg.content == {{"token": "t"}}
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("protocol", "torch", "bpy", "backend", "zmq"))
print("LOADED", bad)
"""


def test_no_absolute_self_imports():
    for path in PKG.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+protocol\b", text, re.M), path.name


def test_importable_under_another_name_without_heavy_modules():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
