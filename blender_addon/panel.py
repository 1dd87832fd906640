"""View3D sidebar tab "Conjure": prompt, settings, Generate/Cancel, progress, errors, history."""

import textwrap
import time

import bpy
from bpy.props import FloatProperty

from . import thumbnails
from .prefs_access import get_prefs
from .properties import ADVANCED_OVERRIDES, example_prompts, parse_extra_overrides, vocabulary_groups
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

#: Runtime status kinds (``runtime.STATUS_KINDS``) -> (icon, drawn as an alert).
STATUS_ICONS = {
    "not_connected": ("UNLINKED", False),
    "starting": ("SORTTIME", False),
    "connecting": ("SORTTIME", False),
    "connected": ("LINKED", False),
    "slow": ("SORTTIME", False),
    "start_failed": ("ERROR", True),
    "error": ("ERROR", True),
    "lost": ("ERROR", True),
    "incompatible": ("ERROR", True),
}


def status_icon(status):
    """(icon, alert) for a ``runtime.Status``."""
    return STATUS_ICONS.get(status.kind, ("QUESTION", False))


def _wrap(layout, text, context, icon="NONE", alert=False, active=True):
    """Draw ``text`` as wrapped label lines fitting the region width."""
    width = context.region.width if context.region else 300
    scale = context.preferences.system.ui_scale
    chars = max(16, int((width - 60 * scale) / (7.2 * scale)))  # conservative: a cut line loses words
    col = layout.column(align=True)
    col.alert = alert
    col.active = active
    lines = textwrap.wrap(text, chars) or [""]
    for i, line in enumerate(lines):
        col.label(text=line, icon=icon if i == 0 else "BLANK1")
    return col


def _progress_value(self):
    job = RUNTIME.current_job()
    return 100.0 * float(job.overall) if job is not None else 0.0


def _fmt_duration(seconds):
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return "%.0f s" % seconds
    if seconds < 3600:
        return "%d:%02d" % (seconds // 60, seconds % 60)
    return "%d h %02d min" % (seconds // 3600, (seconds % 3600) // 60)


def _fmt_date(stamp, now=None):
    """"Today 14:02", "Yesterday 09:15" or "29 Nov 14:02" (local time) from UNIX seconds."""
    t = time.localtime(stamp)
    today = time.localtime(now if now is not None else time.time())
    clock = time.strftime("%H:%M", t)
    if (t.tm_year, t.tm_yday) == (today.tm_year, today.tm_yday):
        return "Today " + clock
    yesterday = time.localtime((now if now is not None else time.time()) - 86400)
    if (t.tm_year, t.tm_yday) == (yesterday.tm_year, yesterday.tm_yday):
        return "Yesterday " + clock
    return time.strftime("%d %b ", t).lstrip("0") + clock


def draw_backend_row(layout, context):
    """Status icon + text and the Start/Stop/Check buttons (panel and preferences)."""
    prefs = get_prefs(context)
    status = RUNTIME.status()
    icon, alert = status_icon(status)
    box = layout.box()
    _wrap(box, status.text, context, icon=icon, alert=alert)
    if status.hint:
        _wrap(box, status.hint, context, icon="INFO")
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
        self._draw_connection(layout, context)
        if client is not None and client.notice is not None:
            box = layout.box()
            row = box.row()
            row.label(text="", icon="INFO")
            _wrap(row.column(), client.notice.message, context)
            row.operator("conjure.dismiss", text="", icon="X", emboss=False)

        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(settings, "prompt", text="")
        col.separator()
        col.label(text="Avoid")
        col.prop(settings, "negative_prompt", text="")
        vocabulary = RUNTIME.vocabulary()
        if vocabulary:
            self._draw_vocabulary(layout, context, vocabulary)

        layout.separator(factor=0.5)
        grid = layout.column(align=True)
        split = grid.split(factor=0.3, align=True)
        split.label(text="Seed")
        row = split.row(align=True)
        sub = row.row(align=True)
        sub.enabled = not settings.random_seed
        sub.prop(settings, "seed", text="")
        row.prop(settings, "random_seed", text="", icon="FILE_REFRESH", toggle=True)
        for prop, label in (("preset", "Preset"), ("model", "Model"), ("object_size", "Size")):
            split = grid.split(factor=0.3, align=True)
            split.label(text=label)
            split.prop(settings, prop, text="")

        job = RUNTIME.current_job()
        running = job is not None and not job.finished
        pending = RUNTIME.pending_request is not None
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
        if pending:
            box = layout.box()
            _wrap(box, "Waiting for the backend to start. The job is sent when it answers.", context,
                  icon="SORTTIME")
        elif job is not None:
            self._draw_job(layout, context, job)

    def _draw_vocabulary(self, layout, context, vocabulary):
        """A closed-vocabulary model (the bundled prior): what it can make, folded to one line."""
        settings = context.scene.conjure
        box = layout.box()
        row = box.row()
        row.prop(settings, "show_vocabulary", text="", emboss=False,
                 icon="TRIA_DOWN" if settings.show_vocabulary else "TRIA_RIGHT")
        row.label(text="The model knows only:")
        if settings.show_vocabulary:
            for title, words in vocabulary_groups(vocabulary):
                _wrap(box, "%s: %s" % (title, ", ".join(words)), context, active=False)
        _wrap(box, "Try: " + ", ".join("'%s'" % p for p in example_prompts(vocabulary)[:2]), context,
              active=False)

    def _draw_connection(self, layout, context):
        prefs = get_prefs(context)
        status = RUNTIME.status()
        icon, alert = status_icon(status)
        if not status.problem:
            col = layout.column(align=True)
            _wrap(col, status.text, context, icon=icon, active=status.kind in ("connected", "slow"))
            if status.hint:
                _wrap(col, status.hint, context, icon="BLANK1", active=False)
            return
        box = layout.box()
        _wrap(box, status.text, context, icon=icon, alert=alert)
        if status.hint:
            _wrap(box, status.hint, context, icon="INFO")
        row = box.row(align=True)
        if status.kind == "incompatible":
            row.operator("conjure.backend_status", text="Retry", icon="FILE_REFRESH")
        elif prefs.mode == "LOCAL":
            row.operator("conjure.start_backend", text="Start Backend", icon="PLAY")
        else:
            row.operator("conjure.start_backend", text="Reconnect", icon="LINKED")
        row.operator("screen.userpref_show", text="", icon="PREFERENCES")
        if RUNTIME.error is not None:
            row.operator("conjure.dismiss", text="", icon="X")

    def _draw_job(self, layout, context, job):
        box = layout.box()
        head = box.row()
        icon = "CANCEL" if job.cancel_requested and not job.finished else _STATE_ICONS.get(job.state, "INFO")
        head.label(text=job.prompt or job.job_id[:8], icon=icon)
        if job.finished:
            head.operator("conjure.dismiss", text="", icon="X", emboss=False)
        if not job.finished:
            lost = RUNTIME.client is not None and RUNTIME.client.state == "lost"
            if lost:  # no live-looking bar while nobody answers: the job's fate is unknown
                _wrap(box, "No news since %s: the backend is gone. The job is checked again when it comes "
                      "back." % job.status_line(), context, icon="UNLINKED")
            else:
                box.label(text=job.status_line())
            bar = box.column()
            bar.active = not lost
            if HAS_PROGRESS:
                bar.progress(factor=job.overall, type="BAR", text="%.0f %%" % (100.0 * job.overall))
            else:  # Blender < 4.0: a read-only percentage slider
                bar.prop(context.window_manager, "conjure_progress", text="", slider=True)
            times = job.time_line()
            if times and not lost:
                _wrap(box, times, context, active=False)
            if get_prefs(context).show_debug and job.message and not job.message.lower().startswith("warning:"):
                _wrap(box, job.message, context, icon="INFO", active=False)
        elif job.state == "done":
            box.label(text=job.status_line())
            info = job.result_info or {}
            ran = [x for x in (info.get("resolved_preset"), info.get("model"), info.get("device")) if x]
            seed = info.get("seed", (job.params or {}).get("seed"))
            if seed is not None:
                ran.append("seed %s" % seed)
            if ran:
                _wrap(box, " · ".join(str(x) for x in ran), context, active=False)
            if job.imported_object:
                box.label(text=job.imported_object, icon="OBJECT_DATA")
        elif job.state == "cancelled":
            box.label(text="Cancelled")
        else:
            err = job.error
            box.label(text="Failed" if job.state == "failed" else job.state.capitalize())
            _wrap(box, err.message if err else job.state, context, icon="ERROR", alert=True)
            row = box.row(align=True)
            row.operator("conjure.resubmit", text="Resubmit", icon="FILE_REFRESH")
            if err is not None and err.code in ("interrupted", "backend_unreachable") \
                    and get_prefs(context).mode == "LOCAL":
                row.operator("conjure.start_backend", text="Start Backend", icon="PLAY")
        for text in job.warnings:
            _wrap(box, "Warning: " + text, context, icon="ERROR")


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
        col = layout.column(align=True)
        for prop, _key, label in ADVANCED_OVERRIDES:
            split = col.split(factor=0.45, align=True)
            split.prop(settings, "use_" + prop, text=label)
            sub = split.row(align=True)
            sub.active = getattr(settings, "use_" + prop)
            sub.prop(settings, prop, text="")
        layout.label(text="Extra settings (key=value; …)")
        layout.prop(settings, "extra_overrides", text="")
        if settings.extra_overrides.strip():
            try:
                parse_extra_overrides(settings.extra_overrides, strict=RUNTIME.strict_overrides())
            except Exception as e:  # ConjureError: the shared parser's message
                _wrap(layout, getattr(e, "message", str(e)), context, icon="ERROR", alert=True)


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
        now = time.time()
        for item in client.history[:12]:
            self._draw_item(layout, client, item, now)

    @staticmethod
    def _draw_item(layout, client, item, now):
        job_id = item.get("job_id", "")
        params = item.get("params") or {}
        prompt = item.get("prompt") or params.get("prompt") or job_id[:8]
        state = item.get("state", "")
        row = layout.row(align=False)
        icon = thumbnails.icon_id(client, item)
        if icon:
            row.template_icon(icon_value=icon, scale=2.2)
        else:
            row.label(text="", icon=_STATE_ICONS.get(state, "QUESTION"))
        col = row.column(align=True)
        col.label(text=prompt)
        facts = []
        if isinstance(item.get("created"), (int, float)):
            facts.append(_fmt_date(item["created"], now))
        if state == "done" and isinstance(item.get("duration_s"), (int, float)):
            facts.append(_fmt_duration(item["duration_s"]))
        elif state != "done":
            facts.append(state)
        sub = col.row()
        sub.active = False
        sub.label(text=" · ".join(facts))
        buttons = col.row(align=True)
        if state == "done":
            op = buttons.operator("conjure.reimport", text="", icon="IMPORT")
            op.job_id = job_id
            op.prompt = prompt
        op = buttons.operator("conjure.use_prompt", text="", icon="PASTEDOWN")
        op.prompt = prompt if prompt != job_id[:8] else ""
        seed = item.get("seed", params.get("seed"))
        op.seed = "" if seed is None else str(seed)
        if state not in ("queued", "running"):
            buttons.operator("conjure.delete_job", text="", icon="TRASH").job_id = job_id


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
