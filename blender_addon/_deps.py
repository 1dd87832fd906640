"""Make ``import zmq`` work inside Blender.

Order: the host Python's own pyzmq (Blender 4.2+ extensions install the wheels listed in
``blender_manifest.toml``; Debian's Blender sees ``python3-zmq``), then the wheels bundled in
``blender_addon/wheels/`` (legacy installs, Blender 3.4-4.1), unpacked once into a user folder
keyed by the wheel's name and put on ``sys.path``. ``build.py`` owns the bundling.
"""

import os
import sys
import sysconfig
import zipfile

_HERE = os.path.dirname(os.path.abspath(__file__))
WHEELS_DIR = os.path.join(_HERE, "wheels")


class MissingDependency(ImportError):
    """pyzmq is not importable and no bundled wheel fits this Python."""


def _user_folder():
    base = os.environ.get("CONJURE_DEPS_DIR")
    if base:
        return base
    try:
        import bpy

        return bpy.utils.user_resource("SCRIPTS", path=os.path.join("conjure_deps"), create=True)
    except Exception:  # not inside Blender
        return os.path.join(os.path.expanduser("~"), ".cache", "conjure", "deps")


def _wheel_fits(name):
    """True if a wheel file name's python/abi/platform tags fit the running interpreter."""
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    ver = "cp%d%d" % sys.version_info[:2]
    if not any(t in (ver, "py3", "cp3") for t in py.split(".")):
        if not (abi.startswith("abi3") and py.startswith("cp3")):
            return False
    this = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    plats = plat.split(".")
    if "any" in plats:
        return True
    if this.startswith("linux"):
        arch = this.split("_", 1)[1]
        return any(("linux" in p) and p.endswith(arch) for p in plats)
    if this.startswith("macosx"):
        arch = this.rsplit("_", 1)[1]
        return any(p.startswith("macosx") and (p.endswith(arch) or p.endswith("universal2")) for p in plats)
    return any(p == this for p in plats)


def _bundled_wheels():
    if not os.path.isdir(WHEELS_DIR):
        return []
    return sorted(n for n in os.listdir(WHEELS_DIR) if n.endswith(".whl") and _wheel_fits(n))


def ensure_zmq():
    """Import and return the ``zmq`` module, unpacking a bundled wheel if the host has none.

    Raises ``MissingDependency`` with a message that says what to do.
    """
    try:
        import zmq

        return zmq
    except ImportError as first:
        error = first
    for wheel in _bundled_wheels():
        target = os.path.join(_user_folder(), wheel[:-4])
        marker = os.path.join(target, ".complete")
        if not os.path.exists(marker):
            os.makedirs(target, exist_ok=True)
            with zipfile.ZipFile(os.path.join(WHEELS_DIR, wheel)) as zf:
                zf.extractall(target)
            with open(marker, "w") as f:
                f.write(wheel)
        if target not in sys.path:
            sys.path.insert(0, target)
        try:
            import zmq

            return zmq
        except ImportError as e:
            error = e
            sys.path.remove(target)
    raise MissingDependency(
        "Conjure needs pyzmq, which this Blender's Python (%s) cannot import (%s). Install the "
        "Conjure extension zip built for your platform, or install pyzmq into Blender's Python."
        % (sys.version.split()[0], error)
    )
