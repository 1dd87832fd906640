"""Install the legacy zip into Blender 3.4 and probe it; runs inside ``blender -b --python``.

    blender -b --factory-startup --python install_legacy.py -- ZIP MODULE
    (BLENDER_USER_SCRIPTS names a fresh user folder)

Prints one JSON line after ``RESULT:`` (see ``addon_probe.py``).
"""

import os
import sys

import bpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Blender does not add it for --python
from addon_probe import probe

argv = sys.argv[sys.argv.index("--") + 1:]
zip_path, module = argv[0], argv[1]
user = os.environ["BLENDER_USER_SCRIPTS"]
res: dict = {"blender": ".".join(map(str, bpy.app.version)), "python": sys.version.split()[0]}
try:
    r = bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True)
    res["install"] = sorted(r)
    r = bpy.ops.preferences.addon_enable(module=module)
    res["enable"] = sorted(r)
except Exception as e:  # reported in the result
    res["error"] = repr(e)
res["enabled"] = module in bpy.context.preferences.addons
probe(module, user, res)
