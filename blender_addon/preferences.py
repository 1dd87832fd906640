"""Add-on preferences: how to reach a backend, and the default preset."""

import os

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from .properties import PRESETS

ADDON_ID = __package__


class ConjurePreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    mode: EnumProperty(name="Backend", default="LOCAL", items=(
        ("LOCAL", "Start Local Backend", "Blender starts and stops a backend process on this machine"),
        ("CONNECT", "Connect to Backend", "Use a backend that is already running (here or on another machine)"),
    ))
    python_path: StringProperty(
        name="Python", subtype="FILE_PATH", default="python3",
        description="Interpreter that has the Conjure backend installed (torch, diffusers, ...)")
    data_dir: StringProperty(
        name="Data Folder", subtype="DIR_PATH", default="",
        description="Where the backend keeps job folders and results (empty: the backend's default)")
    device: EnumProperty(name="Device", default="auto", items=(
        ("auto", "Auto", "The GPU if there is one, else the CPU"),
        ("cuda", "GPU (CUDA)", "Use the NVIDIA GPU"),
        ("cpu", "CPU", "Hide GPUs from the backend (slow; use the CPU preset)"),
    ))
    backend_args: StringProperty(
        name="Extra Arguments", default="",
        description="More arguments for 'python -m backend serve' (for experts and tests)")
    connect_with: EnumProperty(name="Connect With", default="FILE", items=(
        ("FILE", "Connection File", "The JSON file the backend wrote when it started"),
        ("ADDRESS", "Address and Key", "Type the address and the signing key"),
    ))
    connection_file: StringProperty(
        name="Connection File", subtype="FILE_PATH", default="",
        description="The backend's connection file (empty: the default location)")
    address: StringProperty(name="Address", default="tcp://127.0.0.1:5555",
                            description="tcp://host:port of the backend")
    key: StringProperty(name="Key", subtype="PASSWORD", default="",
                        description="The backend's signing key (hex), from its connection file")
    default_preset: EnumProperty(name="Default Preset", items=PRESETS, default="auto")
    auto_start: BoolProperty(name="Start Automatically", default=True,
                             description="Start the local backend when Generate finds none answering")
    show_previews: BoolProperty(name="Live Previews", default=True,
                                description="Show intermediate meshes while a job runs")
    timeout: FloatProperty(name="Headless Timeout", default=3600.0, min=10.0, subtype="TIME_ABSOLUTE",
                           unit="TIME_ABSOLUTE",
                           description="How long a blocking (background-mode) generation may take")

    def draw(self, context):
        from . import panel

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


class _Defaults:
    """Preferences as plain values when the add-on was registered without addon_utils."""

    mode = "LOCAL"
    python_path = "python3"
    data_dir = ""
    device = "auto"
    backend_args = ""
    connect_with = "FILE"
    connection_file = ""
    address = "tcp://127.0.0.1:5555"
    key = ""
    default_preset = "auto"
    auto_start = True
    show_previews = True
    timeout = 3600.0


_DEFAULTS = _Defaults()


def get_prefs(context=None):
    """This add-on's preferences (or defaults when it is not enabled through addon_utils)."""
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


classes = (ConjurePreferences,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
