"""Make ``import zmq`` work inside Blender.

Order:

1. the host Python's own pyzmq: Blender 4.2+ installs the wheels listed in the extension's
   ``blender_manifest.toml`` before it enables the add-on; Debian's Blender sees ``python3-zmq``;
2. the wheels bundled in the add-on's ``wheels/`` folder (legacy installs, Blender 3.4-4.1, whose
   Python has no pyzmq): the one wheel that fits this interpreter is unpacked once into a user
   folder (``<Blender user scripts>/conjure_deps/<wheel name>``, so per Blender version and per
   Python version) and put at the front of ``sys.path``.

``CONJURE_BUNDLED_ZMQ=1`` skips step 1 (tests use it to prove the bundled copy loads even where
the host has a pyzmq of its own). ``CONJURE_DEPS_DIR`` overrides the unpack folder.
``build.py`` decides which wheels are bundled; ``wheel_fits`` mirrors the rules Blender's
extension system applies to the same files.
"""

import os
import shutil
import sys
import sysconfig
import zipfile

_HERE = os.path.dirname(os.path.abspath(__file__))
WHEELS_DIR = os.path.join(_HERE, "wheels")
FORCE_ENV = "CONJURE_BUNDLED_ZMQ"
DEPS_DIR_ENV = "CONJURE_DEPS_DIR"

# Where ``zmq`` came from after ``ensure_zmq``: "host", "bundled:<wheel file>" or "" (not loaded).
ZMQ_SOURCE = ""


class MissingDependency(ImportError):
    """pyzmq is not importable and no bundled wheel fits this Python."""


def this_platform_tag():
    """The running interpreter's wheel platform tag, e.g. ``linux_x86_64``, ``macosx_11_0_arm64``,
    ``win_amd64``."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def _python_tag_versions(python_tag):
    """``cp311`` -> {(3, 11)}, ``py3`` -> {(3,)}, ``cp310.cp311`` -> both; unknown prefixes -> empty."""
    out = set()
    for tag in python_tag.split("."):
        if tag[:2] in ("cp", "py") and tag[2:].isdigit():
            digits = tag[2:]
            out.add((int(digits[0]), int(digits[1:])) if len(digits) > 1 else (int(digits),))
    return out


def wheel_fits(name, version_info=None, platform_tag=None):
    """True if the wheel file ``name`` can be imported by this interpreter.

    Args:
        name: a wheel file name, ``{dist}-{version}(-{build})?-{python}-{abi}-{platform}.whl``.
        version_info: (major, minor) of the interpreter; default ``sys.version_info``.
        platform_tag: default ``this_platform_tag()``.

    Python: an exact ``cpXY`` (or ``py3``) match, or a stable-ABI (``abi3``) wheel built for an
    older or equal minor version. Platform: ``any``; Linux takes any ``manylinux*``/``musllinux*``
    tag of the same architecture; macOS any ``macosx_*`` tag of the same architecture or
    ``universal2``; Windows the exact tag.
    """
    if not name.endswith(".whl"):
        return False
    parts = name[:-4].split("-")
    if not 5 <= len(parts) <= 6:
        return False
    python_tag, abi_tag, plat_tag = parts[-3:]
    current = tuple(version_info or sys.version_info)[:2]
    this = platform_tag or this_platform_tag()

    stable_abi = any(t == "abi3" for t in abi_tag.split("."))
    py_ok = False
    for v in _python_tag_versions(python_tag):
        if v == current or v == current[:1]:
            py_ok = True
        elif len(v) == 2 and stable_abi and v[0] == current[0] and v <= current:
            py_ok = True
    if not py_ok:
        return False

    plats = plat_tag.split(".")
    if "any" in plats or this in plats:
        return True
    if this.startswith("linux_"):
        arch = this.split("_", 1)[1]
        return any(p.startswith(("manylinux", "musllinux")) and p.endswith("_" + arch) for p in plats)
    if this.startswith("macosx_"):
        arch = this.rsplit("_", 1)[1]
        return any(p.startswith("macosx_") and (p.endswith("_" + arch) or p.endswith("_universal2"))
                   for p in plats)
    return False


def _rank(name):
    """Sort key: an exact ``cpXY`` wheel before a stable-ABI one, then by name."""
    parts = name[:-4].split("-")
    return (0 if "abi3" not in parts[-2] else 1, name)


def bundled_wheels(wheels_dir=None, version_info=None, platform_tag=None):
    """Names of the bundled wheels that fit this interpreter, best first."""
    wheels_dir = wheels_dir or WHEELS_DIR
    if not os.path.isdir(wheels_dir):
        return []
    names = [n for n in os.listdir(wheels_dir) if wheel_fits(n, version_info, platform_tag)]
    return sorted(names, key=_rank)


def deps_folder():
    """The folder bundled wheels are unpacked into (created on demand)."""
    base = os.environ.get(DEPS_DIR_ENV)
    if base:
        return base
    try:
        import bpy

        return bpy.utils.user_resource("SCRIPTS", path="conjure_deps", create=True)
    except Exception:  # not inside Blender
        return os.path.join(os.path.expanduser("~"), ".cache", "conjure", "deps")


def unpack_wheel(wheel_path, target):
    """Unpack ``wheel_path`` into ``target`` once; safe against a crash or a second Blender doing
    the same (unpacks beside it, then renames). Returns ``target``."""
    marker = os.path.join(target, ".complete")
    if os.path.exists(marker):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = "%s.tmp-%d" % (target, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel_path) as zf:
        for member in zf.namelist():  # a wheel never holds absolute or parent paths; refuse if one does
            if member.startswith(("/", "\\")) or ".." in member.replace("\\", "/").split("/"):
                raise MissingDependency("refusing to unpack %s: bad member %r" % (wheel_path, member))
        zf.extractall(tmp)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(os.path.basename(wheel_path))
    if os.path.exists(target):  # an interrupted unpack, or another process won the race
        if os.path.exists(marker):
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not os.path.exists(marker):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _forget_zmq(keep_under=None):
    """Drop ``zmq`` modules from ``sys.modules`` (all, or those not loaded from ``keep_under``)."""
    for key in [k for k in sys.modules if k == "zmq" or k.startswith("zmq.")]:
        path = getattr(sys.modules[key], "__file__", None) or ""
        if keep_under and os.path.abspath(path).startswith(os.path.abspath(keep_under) + os.sep):
            continue
        del sys.modules[key]


def ensure_zmq(force_bundled=None):
    """Import and return the ``zmq`` module, unpacking a bundled wheel if the host has none.

    Args:
        force_bundled: skip the host's pyzmq; default: the ``CONJURE_BUNDLED_ZMQ`` variable is "1".

    Raises ``MissingDependency`` with a message that says what to do.
    """
    global ZMQ_SOURCE
    if force_bundled is None:
        force_bundled = os.environ.get(FORCE_ENV, "") == "1"
    error = None
    if not force_bundled:
        try:
            import zmq

            ZMQ_SOURCE = ZMQ_SOURCE or "host"
            return zmq
        except ImportError as first:
            error = first
    wheels = bundled_wheels()
    for wheel in wheels:
        target = unpack_wheel(os.path.join(WHEELS_DIR, wheel), os.path.join(deps_folder(), wheel[:-4]))
        _forget_zmq(keep_under=target)
        if target in sys.path:
            sys.path.remove(target)
        sys.path.insert(0, target)
        import importlib

        importlib.invalidate_caches()
        try:
            import zmq

            ZMQ_SOURCE = "bundled:" + wheel
            return zmq
        except ImportError as e:
            error = e
            sys.path.remove(target)
            _forget_zmq()
    raise MissingDependency(
        "Conjure needs pyzmq, which this Blender's Python (%s, %s) cannot import (%s); %s. Install the "
        "Conjure zip built for your platform, or install pyzmq into Blender's Python."
        % (sys.version.split()[0], this_platform_tag(), error or "skipped: %s=1" % FORCE_ENV,
           "no bundled wheel fits" if not wheels else "the bundled wheel did not load")
    )
