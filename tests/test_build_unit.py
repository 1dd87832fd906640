"""Fast checks of the build's pieces (``buildtools/``) and the add-on's bundled-wheel loader (``blender_addon/_deps.py``)."""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from buildtools import checks, common, package, wheels

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


deps = _load("conjure_deps_under_test", ROOT / "blender_addon" / "_deps.py")


# -- import scan ------------------------------------------------------------------------------

def test_scan_flags_absolute_repo_imports():
    src = (
        "import os\n"
        "import protocol\n"
        "from protocol.mesh import MeshPayload\n"
        "from backend.server import app\n"
        "import blender_addon.client as c\n"
        "def f():\n"
        "    import backend\n"
    )
    bad = checks.scan_absolute_imports(src, "x.py")
    assert [b.split(":")[1] for b in bad] == ["2", "3", "4", "5", "7"]


def test_scan_allows_relative_imports_and_importerror_fallbacks():
    src = (
        "from . import protocol\n"
        "from .protocol import Session\n"
        "from ..protocol import mesh\n"
        "import protocolbuffers\n"
        "try:\n"
        "    from .protocol import Session\n"
        "except ImportError:\n"
        "    from protocol import Session\n"
        "try:\n"
        "    pass\n"
        "except (ValueError, ModuleNotFoundError):\n"
        "    import protocol\n"
    )
    assert checks.scan_absolute_imports(src, "x.py") == []
    # ...but not in a handler for some other error
    assert checks.scan_absolute_imports("try:\n    pass\nexcept KeyError:\n    import protocol\n", "y.py")


# -- Blender's reading of wheel names --------------------------------------------------------------

def test_blender_python_versions_rule():
    # the trap that pins pyzmq 26.4.0: Blender reads an abi3 wheel as plain "3" and then drops it
    # next to "3.11", so a cp311 + cp312-abi3 set would declare the extension 3.11-only.
    assert checks.blender_python_versions(["pyzmq-27.1.0-cp311-cp311-win_amd64.whl",
                                          "pyzmq-27.1.0-cp312-abi3-win_amd64.whl"]) == {"3.11"}
    assert checks.blender_python_versions(["pyzmq-26.4.0-cp311-cp311-win_amd64.whl",
                                          "pyzmq-26.4.0-cp313-cp313-win_amd64.whl"]) == {"3.11", "3.13"}


@pytest.mark.parametrize("name,vi,plat,fits", [
    ("pyzmq-26.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", (3, 11), "linux_x86_64", True),
    ("pyzmq-26.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", (3, 13), "linux_x86_64", False),
    ("pyzmq-26.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", (3, 11), "linux_aarch64", False),
    ("pyzmq-27.1.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl", (3, 11), "linux_x86_64", True),
    ("pyzmq-26.4.0-cp313-cp313-macosx_10_15_universal2.whl", (3, 13), "macosx_11_0_arm64", True),
    ("pyzmq-26.4.0-cp313-cp313-macosx_10_15_universal2.whl", (3, 13), "macosx_14_0_x86_64", True),
    ("pyzmq-26.4.0-cp311-cp311-macosx_11_0_arm64.whl", (3, 11), "macosx_11_0_x86_64", False),
    ("pyzmq-26.4.0-cp310-cp310-win_amd64.whl", (3, 10), "win_amd64", True),
    ("pyzmq-26.4.0-cp310-cp310-win_amd64.whl", (3, 10), "win_arm64", False),
    ("pyzmq-27.1.0-cp312-abi3-win_amd64.whl", (3, 13), "win_amd64", True),   # stable ABI, newer Python
    ("pyzmq-27.1.0-cp312-abi3-win_amd64.whl", (3, 11), "win_amd64", False),  # ...never an older one
    ("six-1.16.0-py2.py3-none-any.whl", (3, 11), "win_amd64", True),
    ("not-a-wheel.zip", (3, 11), "win_amd64", False),
    ("broken-cp311-win_amd64.whl", (3, 11), "win_amd64", False),
])
def test_deps_wheel_fits(name, vi, plat, fits):
    assert deps.wheel_fits(name, vi, plat) is fits


def test_deps_prefers_exact_wheel_over_abi3(tmp_path):
    for n in ("pyzmq-27.1.0-cp312-abi3-win_amd64.whl", "pyzmq-26.4.0-cp313-cp313-win_amd64.whl",
              "pyzmq-26.4.0-cp311-cp311-win_amd64.whl"):
        (tmp_path / n).write_bytes(b"")
    got = deps.bundled_wheels(str(tmp_path), (3, 13), "win_amd64")
    assert got == ["pyzmq-26.4.0-cp313-cp313-win_amd64.whl", "pyzmq-27.1.0-cp312-abi3-win_amd64.whl"]


def test_deps_unpack_is_idempotent_and_refuses_parent_paths(tmp_path):
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("demo/__init__.py", "X = 1\n")
    target = tmp_path / "deps" / whl.stem
    assert deps.unpack_wheel(str(whl), str(target)) == str(target)
    assert (target / "demo" / "__init__.py").read_text() == "X = 1\n"
    (target / "demo" / "__init__.py").write_text("X = 2\n")  # a second call must not re-extract
    deps.unpack_wheel(str(whl), str(target))
    assert (target / "demo" / "__init__.py").read_text() == "X = 2\n"
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]

    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.py", "")
    with pytest.raises(deps.MissingDependency, match="bad member"):
        deps.unpack_wheel(str(evil), str(tmp_path / "deps" / "evil"))
    assert not (tmp_path / "deps" / "escape.py").exists()


@pytest.mark.slow
def test_deps_loads_bundled_pyzmq_instead_of_the_hosts(tmp_path):
    """In a fresh interpreter that has its own pyzmq, the forced path imports the bundled wheel."""
    ws = wheels.fetch_wheels(["3.11"], ["linux-x64"])
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        pytest.skip("the cached wheel is for CPython 3.11 on Linux x86_64")
    addon = tmp_path / "addon"
    (addon / "wheels").mkdir(parents=True)
    (addon / "_deps.py").write_bytes((ROOT / "blender_addon" / "_deps.py").read_bytes())
    wheel = ws.get("3.11", "linux-x64")
    (addon / "wheels" / wheel.name).write_bytes(wheel.read_bytes())
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import _deps; z = _deps.ensure_zmq();"
        "print(json.dumps([z.__file__, z.__version__, _deps.ZMQ_SOURCE, z.zmq_version()]))"
    )
    env = dict(os.environ, CONJURE_BUNDLED_ZMQ="1", CONJURE_DEPS_DIR=str(tmp_path / "deps"))
    out = subprocess.run([sys.executable, "-c", code, str(addon)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    path, version, source, _libzmq = json.loads(out.stdout.strip().splitlines()[-1])
    assert path.startswith(str(tmp_path / "deps" / wheel.stem))
    assert version == common.PYZMQ_VERSION and source == "bundled:" + wheel.name
    # without the flag the host's own pyzmq wins (Blender 4.2+ / Debian's python3-zmq path)
    env.pop("CONJURE_BUNDLED_ZMQ")
    out = subprocess.run([sys.executable, "-c", code, str(addon)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1])[2] == "host"


def test_deps_reports_what_to_do_when_nothing_fits(tmp_path):
    addon = tmp_path / "addon"
    (addon / "wheels").mkdir(parents=True)
    (addon / "_deps.py").write_bytes((ROOT / "blender_addon" / "_deps.py").read_bytes())
    (addon / "wheels" / "pyzmq-26.4.0-cp39-cp39-win32.whl").write_bytes(b"")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import _deps; _deps.ensure_zmq(force_bundled=True)"
    out = subprocess.run([sys.executable, "-c", code, str(addon)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, CONJURE_DEPS_DIR=str(tmp_path / "deps")))
    assert out.returncode != 0
    assert "MissingDependency" in out.stderr and "no bundled wheel fits" in out.stderr


# -- manifest, bl_info, versions -----------------------------------------------------------------

def test_manifest_renders_to_equal_toml():
    data = package.manifest_template()
    data["version"] = "1.2.3"
    data["wheels"] = ["./wheels/a-1-cp311-cp311-win_amd64.whl"]
    data["platforms"] = ["windows-x64", "linux-x64", "macos-arm64", "macos-x64"]
    data["tagline"] = 'Quotes "and" unicode — fine'
    assert tomllib.loads(package.render_manifest(data)) == data


def test_legacy_init_stamps_the_version():
    src = 'bl_info = {\n    "name": "Conjure",\n    "version": (0, 0, 1),\n    "blender": (3, 4, 0),\n}\n'
    out = package.legacy_init_source(src, "2.10.3")
    assert '"version": (2, 10, 3)' in out and '"blender": (3, 4, 0)' in out
    with pytest.raises(common.BuildError, match="bl_info"):
        package.legacy_init_source("bl_info = {}\n", "1.0.0")


def test_project_facts_come_from_pyproject_and_protocol():
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert common.project_version() == tomllib.load(f)["project"]["version"]
    version, major = common.protocol_version()
    assert version.split(".")[0] == str(major)


def test_unknown_platform_is_a_clear_error(tmp_path):
    with pytest.raises(common.BuildError, match="unknown platform.*linux-x64"):
        package.build(tmp_path, ["amiga-68k"], backend_wheel=False)


def test_check_manifest_catches_bad_fields():
    raw = (b'schema_version = "1.0.0"\nid = "conjure"\nversion = "1.0"\nname = "C"\ntagline = "t"\n'
           b'maintainer = "m"\ntype = "add-on"\nlicense = ["SPDX:MIT"]\n'
           b'wheels = ["./wheels/pyzmq-26.4.0-cp311-cp311-win_amd64.whl"]\nplatforms = ["windows-x64"]\n'
           b'[permissions]\nnetwork = "why"\n')
    rows = {c.name: c for c in checks.check_manifest("t", raw, [], "1.0.0")}
    assert not rows["manifest required keys"].ok and "blender_version_min" in rows["manifest required keys"].detail
    assert not rows["manifest version == pyproject, semver"].ok
    assert not rows["permissions network + files with reasons"].ok
    assert not rows["every listed wheel present (and none unlisted)"].ok
    assert not rows["Blender reads python_versions 3.11 + 3.13"].ok
