"""Plain access to the add-on's preferences: ``get_prefs``, the connection-file path, the defaults.

``DEFAULTS`` is the one table of preference defaults: ``preferences.py`` builds its properties
from it, and ``get_prefs`` falls back to it when the add-on was registered without
``addon_utils`` (bpy as a module, tests). Nothing here draws UI, and nothing here imports the
runtime, the panel or the preferences UI (so ``runtime.py`` can import it without a circle).
"""

import os
from types import SimpleNamespace

import bpy

ADDON_ID = __package__

#: Preference name -> default value (the only copy; see the module docstring).
DEFAULTS = {
    "mode": "LOCAL",
    "python_path": "python3",
    "data_dir": "",
    "device": "auto",
    "backend_args": "",
    "connect_with": "FILE",
    "connection_file": "",
    "address": "tcp://127.0.0.1:5555",
    "key": "",
    "default_preset": "auto",
    "auto_start": True,
    "show_previews": True,
    "show_debug": False,
    "timeout": 3600.0,
}

_DEFAULTS = SimpleNamespace(**DEFAULTS)


def get_prefs(context=None):
    """This add-on's preferences (or ``DEFAULTS`` when it is not enabled through addon_utils)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    return _DEFAULTS


def default_connection_file(prefs):
    """Where the connection file is read from (and written to, for a local backend)."""
    if prefs.mode == "CONNECT" and prefs.connection_file:
        return bpy.path.abspath(prefs.connection_file)
    if prefs.mode == "LOCAL" and prefs.data_dir:
        return os.path.join(bpy.path.abspath(prefs.data_dir), "connection.json")
    from .protocol import default_connection_path

    return str(default_connection_path())
