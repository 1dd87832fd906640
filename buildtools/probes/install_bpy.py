"""Install the extension zip into bpy 5.0.1 (a fresh interpreter) and probe it.

    python install_bpy.py ZIP EXTENSION_ID      (BLENDER_USER_RESOURCES names a fresh user folder)

Prints one JSON line after ``RESULT:`` (see ``addon_probe.py``).
"""

import importlib.machinery
import os
import site
import sys

zip_path, ext_id = sys.argv[1], sys.argv[2]
user = os.environ["BLENDER_USER_RESOURCES"]
res: dict = {}

# This interpreter's own site-packages may hold a pyzmq (bpy is pip-installed beside it); Blender's
# Python has none. Hide the host copy so `import zmq` must come from the wheels the extension
# system installed under BLENDER_USER_RESOURCES.
_host = {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}


class _HideHostZmq:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "zmq":
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            name, [p for p in sys.path if os.path.realpath(p) not in _host])
        if spec is None:
            raise ModuleNotFoundError("No module named 'zmq' outside the host site-packages", name=name)
        return spec


sys.meta_path.insert(0, _HideHostZmq)

import bpy  # noqa: E402 - after the finder, so nothing bpy imports can pick up the host's zmq
from addon_probe import probe  # noqa: E402 - this script's own folder is sys.path[0]

r = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
res["install"] = sorted(r)
mod_name = "bl_ext.user_default." + ext_id
res["enabled"] = mod_name in bpy.context.preferences.addons
probe(mod_name, user, res)
os._exit(0)  # skip bpy's atexit (quicker, and no stray output)
