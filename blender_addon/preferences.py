"""The add-on's preferences UI: how to reach a backend, the default preset, debug details.

Defaults and plain access (``get_prefs``, the connection-file path) live in ``prefs_access.py``;
this module only declares the properties (from ``prefs_access.DEFAULTS``) and draws them.
"""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from . import choices, panel
from .prefs_access import ADDON_ID, DEFAULTS, default_connection_file

D = DEFAULTS


class ConjurePreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    mode: EnumProperty(name="Backend", default=D["mode"], items=(
        ("LOCAL", "Start Local Backend", "Blender starts and stops a backend process on this machine"),
        ("CONNECT", "Connect to Backend", "Use a backend that is already running (here or on another machine)"),
    ))
    python_path: StringProperty(
        name="Python", subtype="FILE_PATH", default=D["python_path"],
        description="Interpreter that has the Conjure backend installed (torch, diffusers, ...)")
    data_dir: StringProperty(
        name="Data Folder", subtype="DIR_PATH", default=D["data_dir"],
        description="Where the backend keeps job folders and results (empty: the backend's default)")
    device: EnumProperty(name="Device", default=D["device"], items=(
        ("auto", "Auto", "The GPU if there is one, else the CPU"),
        ("cuda", "GPU (CUDA)", "Use the NVIDIA GPU"),
        ("cpu", "CPU", "Hide GPUs from the backend (slow; use the CPU preset)"),
    ))
    backend_args: StringProperty(
        name="Extra Arguments", default=D["backend_args"],
        description="More arguments for 'python -m backend serve' (for experts and tests)")
    connect_with: EnumProperty(name="Connect With", default=D["connect_with"], items=(
        ("FILE", "Connection File", "The JSON file the backend wrote when it started"),
        ("ADDRESS", "Address and Key", "Type the address and the signing key"),
    ))
    connection_file: StringProperty(
        name="Connection File", subtype="FILE_PATH", default=D["connection_file"],
        description="The backend's connection file (empty: the default location)")
    address: StringProperty(name="Address", default=D["address"],
                            description="tcp://host:port of the backend")
    key: StringProperty(name="Key", subtype="PASSWORD", default=D["key"],
                        description="The backend's signing key (hex), from its connection file")
    default_preset: EnumProperty(name="Default Preset", items=choices.preset_items, default=0,
                                  description="The preset Generate uses when the panel says Default")
    auto_start: BoolProperty(name="Start Automatically", default=D["auto_start"],
                             description="Start the local backend when Generate finds none answering")
    show_previews: BoolProperty(name="Live Previews", default=D["show_previews"],
                                description="Show intermediate meshes while a job runs")
    show_debug: BoolProperty(name="Debug Details", default=D["show_debug"],
                             description="Show the pipeline's own progress messages (losses, Gaussian counts)")
    timeout: FloatProperty(name="Headless Timeout", default=D["timeout"], min=10.0, subtype="TIME_ABSOLUTE",
                           unit="TIME_ABSOLUTE",
                           description="How long a blocking (background-mode) generation may take")

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.prop(self, "mode", expand=True)
        col = layout.column()
        if self.mode == "LOCAL":
            col.prop(self, "python_path")
            col.prop(self, "data_dir")
            col.prop(self, "device")
            col.prop(self, "auto_start")
            col.prop(self, "backend_args")
        else:
            col.prop(self, "connect_with")
            if self.connect_with == "FILE":
                col.prop(self, "connection_file")
                if not self.connection_file:
                    col.label(text="Default: " + default_connection_file(self), icon="INFO")
            else:
                col.prop(self, "address")
                col.prop(self, "key")
        layout.separator()
        col = layout.column()
        col.prop(self, "default_preset")
        col.prop(self, "show_previews")
        col.prop(self, "show_debug")
        col.prop(self, "timeout")
        layout.separator()
        panel.draw_backend_row(layout, context)
        layout.label(text="Conjure " + addon_version_text(), icon="INFO")


def addon_version_text():
    """'0.1.0 (protocol 1.0)' from the build's stamp, or 'development (protocol 1.0)' in the repo."""
    try:
        from . import _build_info

        return "%s (protocol %s)" % (_build_info.VERSION, _build_info.PROTOCOL_VERSION)
    except ImportError:  # running from the repository, not from a built zip
        from .protocol import PROTOCOL_VERSION

        return "development (protocol %s)" % PROTOCOL_VERSION


classes = (ConjurePreferences,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
