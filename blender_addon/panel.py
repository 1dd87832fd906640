"""View3D sidebar tab "Conjure": prompt, settings, Generate/Cancel, progress, errors, history."""

import textwrap
import time

import bpy
from bpy.props import FloatProperty

from .preferences import get_prefs
from .properties import ADVANCED_OVERRIDES
from .runtime import RUNTIME

HAS_PROGRESS = "progress" in bpy.types.UILayout.bl_rna.functions.keys()  # Blender 4.0+

_STATE_ICONS = {
    "done": "CHECKMARK",
    "failed": "ERROR",
    "cancelled": "CANCEL",
    "interrupted": "UNLINKED",
    "lost": "UNLINKED",
    "running": "SORTTIME",
    "queued": "TIME",
    "submitting": "TIME",
}


def _wrap(layout, text, context, icon="NONE", alert=False):
    """Draw ``text`` as wrapped label lines fitting the region width."""
    width = context.region.width if context.region else 300
    scale = context.preferences.system.ui_scale
    chars = max(16, int((width - 60 * scale) / (6.5 * scale)))
    col = layout.column(align=True)
    col.alert = alert
    lines = textwrap.wrap(text, chars) or [""]
    for i, line in enumerate(lines):
        col.label(text=line, icon=icon if i == 0 else "BLANK1")
    return col


def _progress_value(self):
    job = RUNTIME.current_job()
    return 100.0 * float(job.fraction) if job is not None else 0.0


def draw_backend_row(layout, context):
    """Status icon + text and the Start/Stop/Check buttons (panel and preferences)."""
    prefs = get_prefs(context)
    icon, text = RUNTIME.backend_status()
    box = layout.box()
    row = box.row(align=True)
    row.alert = icon == "ERROR"
    row.label(text=text, icon=icon)
    row = box.row(align=True)
    if prefs.mode == "LOCAL":
        row.operator("conjure.start_backend", text="Start", icon="PLAY")
        row.operator("conjure.stop_backend", text="Stop", icon="PAUSE")
    else:
        row.operator("conjure.start_backend", text="Connect", icon="LINKED")
    row.operator("conjure.backend_status", text="Status", icon="FILE_REFRESH")


class CONJURE_PT_main(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Conjure"
    bl_label = "Conjure"
    bl_idname = "CONJURE_PT_main"

    def draw_header(self, context):
        self.layout.label(text="", icon="OUTLINER_OB_MESH")

    def draw(self, context):
        layout = self.layout
        settings = context.scene.conjure
        client = RUNTIME.client
        self._draw_connection(layout, context, client)

        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(settings, "prompt", text="")
        col.separator()
        col.label(text="Avoid")
        col.prop(settings, "negative_prompt", text="")

        layout.separator(factor=0.5)
        split = layout.split(factor=0.3, align=True)
        split.label(text="Seed")
        row = split.row(align=True)
        sub = row.row(align=True)
        sub.enabled = not settings.random_seed
        sub.prop(settings, "seed", text="")
        row.prop(settings, "random_seed", text="", icon="FILE_REFRESH", toggle=True)
        split = layout.split(factor=0.3, align=True)
        split.label(text="Preset")
        split.prop(settings, "preset", text="")

        job = RUNTIME.current_job()
        running = job is not None and not job.finished
        pending = getattr(RUNTIME, "pending_request", None) is not None
        layout.separator(factor=0.5)
        row = layout.row(align=True)
        row.scale_y = 1.6
        if running or pending:
            row.operator("conjure.generate", text="Generate", icon="ADD")
            row.operator("conjure.cancel", text="Cancel", icon="CANCEL")
        else:
            row.operator("conjure.generate", text="Generate", icon="PLAY")
        row = layout.row(align=True)
        row.operator("conjure.texture_selected", text="Texture Selected", icon="TEXTURE")
        if job is not None:
            self._draw_job(layout, context, job)
        elif pending:
            layout.label(text="Waiting for the backend to start…", icon="SORTTIME")

    def _draw_connection(self, layout, context, client):
        prefs = get_prefs(context)
        err = RUNTIME.error or (client.error if client is not None and client.state != "connected" else None)
        if err is None:
            icon, text = RUNTIME.backend_status()
            if icon == "ERROR":
                box = layout.box()
                _wrap(box, text, context, icon="ERROR", alert=True)
                box.operator("conjure.start_backend", text="Start Backend", icon="PLAY")
            else:
                row = layout.row()
                row.active = icon == "LINKED"
                row.label(text=text, icon=icon)
            return
        box = layout.box()
        _wrap(box, err.message, context, icon="ERROR", alert=True)
        row = box.row(align=True)
        if err.action == "start_backend" or err.code in ("backend_unreachable", "no_backend"):
            if prefs.mode == "LOCAL":
                row.operator("conjure.start_backend", text="Start Backend", icon="PLAY")
            else:
                row.operator("conjure.start_backend", text="Reconnect", icon="LINKED")
            row.operator("screen.userpref_show", text="", icon="PREFERENCES")
        else:
            row.operator("conjure.backend_status", text="Retry", icon="FILE_REFRESH")
        row.operator("conjure.dismiss", text="", icon="X")

    def _draw_job(self, layout, context, job):
        box = layout.box()
        head = box.row()
        head.label(text=job.prompt or job.job_id[:8], icon=_STATE_ICONS.get(job.state, "INFO"))
        if job.finished:
            head.operator("conjure.dismiss", text="", icon="X", emboss=False)
        if job.state in ("running", "queued", "submitting"):
            line = job.status_line()
            if HAS_PROGRESS:
                box.progress(factor=job.fraction, type="BAR", text=line)
            else:  # Blender < 4.0: a read-only percentage slider under the status line
                box.label(text=line)
                box.prop(context.window_manager, "conjure_progress", text="", slider=True)
            if job.message and not job.message.startswith("step "):
                box.label(text=job.message, icon="INFO")
        elif job.state == "done":
            box.label(text=job.status_line())
            if job.imported_object:
                box.label(text=job.imported_object, icon="OBJECT_DATA")
        else:
            err = job.error
            _wrap(box, err.message if err else job.state, context, icon="ERROR", alert=True)
            row = box.row(align=True)
            row.operator("conjure.generate", text="Try Again", icon="FILE_REFRESH")
            if err is not None and err.code in ("interrupted", "backend_unreachable"):
                row.operator("conjure.start_backend", text="Start Backend", icon="PLAY")


class CONJURE_PT_advanced(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Conjure"
    bl_label = "Advanced"
    bl_parent_id = "CONJURE_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings = context.scene.conjure
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        for prop, _key, label in ADVANCED_OVERRIDES:
            row = col.row(heading=label)
            row.prop(settings, "use_" + prop, text="")
            sub = row.row()
            sub.active = getattr(settings, "use_" + prop)
            sub.prop(settings, prop, text="")
        col.prop(settings, "extra_overrides")


class CONJURE_PT_history(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Conjure"
    bl_label = "History"
    bl_parent_id = "CONJURE_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw_header_preset(self, context):
        self.layout.operator("conjure.refresh_history", text="", icon="FILE_REFRESH", emboss=False)

    def draw(self, context):
        layout = self.layout
        client = RUNTIME.client
        if client is None:
            layout.label(text="Not connected", icon="UNLINKED")
            return
        if client.history is None:
            if client.state == "connected" and (client.history_at is None or time.monotonic() - client.history_at > 5):
                client.history_at = time.monotonic()
                client.list_jobs()
            layout.label(text="Loading…", icon="SORTTIME")
            return
        if not client.history:
            layout.label(text="No jobs yet")
            return
        col = layout.column(align=True)
        for item in client.history[:12]:
            job_id = item.get("job_id", "")
            params = item.get("params") or {}
            prompt = item.get("prompt") or params.get("prompt") or job_id[:8]
            state = item.get("state", "")
            row = col.row(align=True)
            row.label(text=prompt, icon=_STATE_ICONS.get(state, "QUESTION"))
            if state == "done":
                op = row.operator("conjure.reimport", text="", icon="IMPORT")
                op.job_id = job_id
                op.prompt = prompt
            op = row.operator("conjure.use_prompt", text="", icon="PASTEDOWN")
            op.prompt = prompt if prompt != job_id[:8] else ""
            seed = item.get("seed", params.get("seed"))
            op.seed = "" if seed is None else str(seed)


classes = (CONJURE_PT_main, CONJURE_PT_advanced, CONJURE_PT_history)


def register():
    bpy.types.WindowManager.conjure_progress = FloatProperty(
        name="Progress", subtype="PERCENTAGE", min=0.0, max=100.0, precision=0, get=_progress_value)
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
    del bpy.types.WindowManager.conjure_progress
