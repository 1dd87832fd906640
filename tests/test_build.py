"""``build.py --check`` end to end: build every zip and the backend wheel into a temporary dist,
validate them, install the extension into bpy 5.0.1 and the legacy zip into Debian's Blender 3.4
(each in a fresh user folder), and import zmq from the bundled copy.

The pyzmq wheels come from the build cache (``~/.cache/conjure-build``); a cold cache downloads
them with pip (about 20 small wheels).
"""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build.py"

pytestmark = pytest.mark.slow


def _run(args, timeout=600):
    return subprocess.run([sys.executable, str(BUILD), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _rows(stdout):
    """{(target, check): result} from build.py's summary table."""
    rows = {}
    for line in stdout.splitlines():
        if line[:4] in ("PASS", "FAIL", "skip"):
            parts = [p.strip() for p in line.split("  ") if p.strip()]
            if len(parts) >= 3:
                rows[(parts[1], parts[2])] = parts[0]
    return rows


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    proc = _run(["--check", "--dist", str(dist)])
    return dist, proc


def test_check_passes_and_installs_into_both_blenders(checked):
    dist, proc = checked
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    rows = _rows(proc.stdout)
    assert rows, out[-3000:]
    assert not [k for k, v in rows.items() if v == "FAIL"]
    bpy_rows = {k[1]: v for k, v in rows.items() if k[0].startswith("bpy 5.0.1")}
    if importlib.util.find_spec("bpy") is not None:
        for name in ("install + enable", "panel registered", "operators registered", "zmq from the bundled wheel",
                     "_build_info.VERSION", "disable unregisters the panel"):
            assert bpy_rows.get(name) == "PASS", (name, bpy_rows)
    b34_rows = {k[1]: v for k, v in rows.items() if k[0].startswith("blender 3.4")}
    if shutil.which("blender"):
        for name in ("install + enable", "panel registered", "operators registered", "zmq from the bundled wheel"):
            assert b34_rows.get(name) == "PASS", (name, b34_rows)
    else:
        assert set(b34_rows.values()) == {"skip"}


def test_dist_holds_the_three_artifacts(checked):
    dist, proc = checked
    assert proc.returncode == 0
    names = sorted(p.name for p in dist.iterdir())
    version = next(line.split("=", 1)[1].strip().strip('"') for line in (ROOT / "pyproject.toml").read_text()
                   .splitlines() if line.startswith("version"))
    assert f"conjure-{version}.zip" in names
    assert f"conjure-{version}-legacy.zip" in names
    assert f"conjure-{version}-py3-none-any.whl" in names
    with zipfile.ZipFile(dist / f"conjure-{version}.zip") as zf:
        listing = zf.namelist()
        # the symlinked protocol package arrives as real files next to the add-on
        assert "protocol/__init__.py" in listing and zf.read("protocol/__init__.py")
        assert not any(n.startswith("blender_addon/") for n in listing)
    with zipfile.ZipFile(dist / f"conjure-{version}-legacy.zip") as zf:
        assert all(n.startswith("conjure/") for n in zf.namelist())


def test_platform_option_builds_one_valid_zip_per_platform(tmp_path):
    """``--platform`` (like ``--split-platforms``) gives one zip per platform with only its own wheels,
    each passing the static checks and Blender's own validator."""
    proc = _run(["--platform", "linux-x64", "--platform", "macos-arm64", "--platform", "windows-x64",
                 "--no-legacy", "--no-backend-wheel", "--check", "--no-install", "--dist", str(tmp_path)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    zips = sorted(p.name for p in tmp_path.glob("conjure-*.zip"))
    assert [z.rsplit("-", 1)[1] for z in zips] == ["linux_x64.zip", "macos_arm64.zip", "windows_x64.zip"]
    rows = _rows(proc.stdout)
    assert all(rows[(z, "Blender's own validator (bl_pkg validate)")] == "PASS" for z in zips)
    for z in zips:
        with zipfile.ZipFile(tmp_path / z) as zf:
            wheels = [n for n in zf.namelist() if n.endswith(".whl")]
            assert len(wheels) == 2, (z, wheels)  # cp311 + cp313
            if "linux" in z:
                assert all("manylinux" in w for w in wheels)
            if "windows_x64" in z:
                assert all(w.endswith("win_amd64.whl") for w in wheels)


def test_check_fails_on_a_damaged_zip(tmp_path, checked):
    """A listed wheel missing from the zip, and a stray __pycache__, are both reported as failures."""
    dist, proc = checked
    assert proc.returncode == 0
    src = next(p for p in dist.glob("conjure-*.zip") if "legacy" not in p.name)
    bad = tmp_path / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        dropped = None
        for info in zin.infolist():
            if info.filename.endswith(".whl") and "manylinux" in info.filename and dropped is None:
                dropped = info.filename
                continue
            zout.writestr(info, zin.read(info))
        zout.writestr("__pycache__/x.cpython-311.pyc", b"")
    res = _run(["--check", "--no-build", "--no-install", "--dist", str(tmp_path)])
    assert res.returncode == 1, res.stdout[-3000:]
    rows = _rows(res.stdout)
    assert rows[(bad.name, "every listed wheel present (and none unlisted)")] == "FAIL"
    assert rows[(bad.name, "no __pycache__/.pyc")] == "FAIL"
    assert rows[(bad.name, "pyzmq wheel for every platform x python")] == "FAIL"
