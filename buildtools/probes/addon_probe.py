"""The part both install probes share (imported by ``install_bpy.py`` and ``install_legacy.py``).

With the add-on enabled as ``mod_name`` (its user folder in ``user``), record its panels,
operators, build stamp and where zmq came from; disable it; print one JSON line after
``RESULT:`` for ``buildtools.checks`` to read. Runs inside Blender (or bpy), not in the build.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import bpy

PANEL_PREFIXES = ("CONJURE_PT", "VIEW3D_PT_conjure")


def _panels() -> list[str]:
    return sorted(n for n in dir(bpy.types) if n.startswith(PANEL_PREFIXES))


def probe(mod_name: str, user: str, res: dict) -> None:
    """Fill ``res`` with what the enabled add-on ``mod_name`` registered, disable it, print it."""
    mod = sys.modules.get(mod_name)
    res["module_file"] = getattr(mod, "__file__", None)
    res["panels"] = _panels()
    res["operators"] = sorted(dir(bpy.ops.conjure))
    try:
        res["build_version"] = importlib.import_module(mod_name + "._build_info").VERSION
    except Exception as e:  # reported in the result
        res["build_version"] = repr(e)
    try:
        deps = importlib.import_module(mod_name + "._deps")
        zmq = deps.ensure_zmq()
        res["zmq_file"] = zmq.__file__
        res["zmq_version"] = zmq.__version__
        res["zmq_source"] = deps.ZMQ_SOURCE
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.PAIR)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(0)
        res["zmq_socket"] = port > 0
    except Exception as e:  # reported in the result
        res["zmq_error"] = repr(e)
    res["zmq_under_user"] = bool(res.get("zmq_file")) and os.path.realpath(res["zmq_file"]).startswith(
        os.path.realpath(user) + os.sep)
    if res["zmq_under_user"]:
        res["zmq_rel"] = os.path.relpath(os.path.dirname(os.path.realpath(res["zmq_file"])),
                                         os.path.realpath(user))
    bpy.ops.preferences.addon_disable(module=mod_name)
    res["panels_after_disable"] = _panels()
    print("RESULT:" + json.dumps(res))
    sys.stdout.flush()
