"""Operators: generate, cancel, start/stop/check the backend, job history and re-import.

With a UI the Generate operator only sends the request and returns; the timer pump brings
previews and the result. In background mode (``blender -b``), where timers never run, it
blocks and pumps the socket itself (through ``api.generate``), like a script would.
"""

import bpy
from bpy.props import StringProperty

from . import importer, texture_ops
from .client import ConjureError
from .prefs_access import get_prefs
from .properties import SEED_MAX, settings_to_request
from .runtime import RUNTIME


def _report_error(op, err):
    op.report({"ERROR"}, err.message)
    RUNTIME.error = err
    RUNTIME.mark_dirty()
    return {"CANCELLED"}


def _submit_or_start_backend(op, context, prefs, request, location):
    """Submit ``request`` (placed at ``location``); with no backend and auto-start on, start one and
    keep the request pending (sent when it answers). Returns ``(job, waiting)``: the job, or None
    after reporting an error; ``waiting`` is True when the request waits for the backend."""
    try:
        RUNTIME.ensure_client(prefs)
    except ConjureError as e:
        if e.action == "start_backend" and prefs.mode == "LOCAL" and prefs.auto_start:
            try:
                RUNTIME.start_backend(prefs)
            except ConjureError as e2:
                _report_error(op, e2)
                return None, False
            # the client connects as soon as the backend wrote its connection file
            RUNTIME.pending_request = (request, location, importer.default_collection().name)
            op.report({"INFO"}, "Conjure: starting the backend; the job is sent when it answers")
            return None, True
        _report_error(op, e)
        return None, False
    try:
        return RUNTIME.submit(request, location=location, collection=context.collection), False
    except ConjureError as e:
        _report_error(op, e)
        return None, False


class CONJURE_OT_generate(bpy.types.Operator):
    """Generate a textured mesh from the prompt; previews appear at the 3D cursor while it runs"""

    bl_idname = "conjure.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return context.scene is not None and hasattr(context.scene, "conjure")

    def execute(self, context):
        prefs = get_prefs(context)
        settings = context.scene.conjure
        try:
            request = settings_to_request(settings, prefs.default_preset, RUNTIME.vocabulary(),
                                          strict=RUNTIME.strict_overrides())
        except ConjureError as e:
            return _report_error(self, e)
        if bpy.app.background:
            from . import api

            try:
                obj = api.generate(**request)
            except ConjureError as e:
                return _report_error(self, e)
            self.report({"INFO"}, "Conjure: created %s" % obj.name)
            return {"FINISHED"}
        location = tuple(context.scene.cursor.location)
        job, waiting = _submit_or_start_backend(self, context, prefs, request, location)
        if job is None:
            return {"FINISHED"} if waiting else {"CANCELLED"}
        RUNTIME.error = None
        self.report({"INFO"}, "Conjure: generating '%s' (seed %s)" % (job.prompt, request["seed"]))
        return {"FINISHED"}


class CONJURE_OT_cancel(bpy.types.Operator):
    """Cancel the running generation"""

    bl_idname = "conjure.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    job_id: StringProperty(default="", options={"SKIP_SAVE"})

    def execute(self, context):
        RUNTIME.pending_request = None
        RUNTIME.cancel(self.job_id or None)
        return {"FINISHED"}


class CONJURE_OT_start_backend(bpy.types.Operator):
    """Start the local backend process with the interpreter set in the preferences"""

    bl_idname = "conjure.start_backend"
    bl_label = "Start Backend"

    def execute(self, context):
        prefs = get_prefs(context)
        try:
            if prefs.mode == "LOCAL":
                RUNTIME.start_backend(prefs)
            else:
                RUNTIME.drop_client()
                RUNTIME.ensure_client(prefs)
        except ConjureError as e:
            return _report_error(self, e)
        return {"FINISHED"}


class CONJURE_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend that Blender started (running jobs are interrupted)"""

    bl_idname = "conjure.stop_backend"
    bl_label = "Stop Backend"

    @classmethod
    def poll(cls, context):
        return RUNTIME.backend is not None

    def execute(self, context):
        RUNTIME.drop_client()
        RUNTIME.stop_backend()
        return {"FINISHED"}


class CONJURE_OT_backend_status(bpy.types.Operator):
    """Check the connection to the backend now (reconnects if it was lost)"""

    bl_idname = "conjure.backend_status"
    bl_label = "Check Backend"

    def execute(self, context):
        prefs = get_prefs(context)
        try:
            client = RUNTIME.ensure_client(prefs)
            if client.state != "connected":
                client.reconnect()
        except ConjureError as e:
            return _report_error(self, e)
        self.report({"INFO"}, "Conjure: " + RUNTIME.status().text)
        return {"FINISHED"}


class CONJURE_OT_refresh_history(bpy.types.Operator):
    """Ask the backend for its recent jobs"""

    bl_idname = "conjure.refresh_history"
    bl_label = "Refresh History"

    def execute(self, context):
        try:
            RUNTIME.ensure_client(get_prefs(context)).list_jobs()
        except ConjureError as e:
            return _report_error(self, e)
        return {"FINISHED"}


class CONJURE_OT_reimport(bpy.types.Operator):
    """Bring this job's result into the scene again, at the 3D cursor"""

    bl_idname = "conjure.reimport"
    bl_label = "Re-import"

    job_id: StringProperty(default="", options={"SKIP_SAVE"})
    prompt: StringProperty(default="", options={"SKIP_SAVE"})

    def execute(self, context):
        if not self.job_id:
            return {"CANCELLED"}
        try:
            RUNTIME.reimport(self.job_id, params={"prompt": self.prompt} if self.prompt else None)
        except ConjureError as e:
            return _report_error(self, e)
        return {"FINISHED"}


class CONJURE_OT_resubmit(bpy.types.Operator):
    """Submit the failed job again with the same settings and seed (as a new job)"""

    bl_idname = "conjure.resubmit"
    bl_label = "Resubmit"

    def execute(self, context):
        try:
            job = RUNTIME.resubmit(collection=context.collection)
        except ConjureError as e:
            return _report_error(self, e)
        RUNTIME.error = None
        self.report({"INFO"}, "Conjure: generating '%s' again" % job.prompt)
        return {"FINISHED"}


class CONJURE_OT_delete_job(bpy.types.Operator):
    """Delete this job and its files from the backend (objects already in the scene stay)"""

    bl_idname = "conjure.delete_job"
    bl_label = "Delete Job"

    job_id: StringProperty(default="", options={"SKIP_SAVE"})

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        if not self.job_id:
            return {"CANCELLED"}
        try:
            RUNTIME.ensure_client(get_prefs(context)).delete_job(self.job_id)
        except ConjureError as e:
            return _report_error(self, e)
        RUNTIME.mark_dirty()
        return {"FINISHED"}


class CONJURE_OT_use_prompt(bpy.types.Operator):
    """Copy this job's prompt and seed into the panel"""

    bl_idname = "conjure.use_prompt"
    bl_label = "Use Settings"

    prompt: StringProperty(default="", options={"SKIP_SAVE"})
    seed: StringProperty(default="", options={"SKIP_SAVE"})

    def execute(self, context):
        s = context.scene.conjure
        s.prompt = self.prompt
        if self.seed.isdigit():
            if int(self.seed) > SEED_MAX:
                self.report({"WARNING"}, "Seed %s is above the panel's limit %d; a random seed is used"
                            % (self.seed, SEED_MAX))
                s.random_seed = True
            else:
                s.seed = int(self.seed)
                s.random_seed = False
        return {"FINISHED"}


class CONJURE_OT_dismiss(bpy.types.Operator):
    """Hide this message"""

    bl_idname = "conjure.dismiss"
    bl_label = "Dismiss"

    def execute(self, context):
        RUNTIME.error = None
        if RUNTIME.client is not None:
            RUNTIME.client.notice = None
        job = RUNTIME.current_job()
        if job is not None and job.finished:
            RUNTIME.current_job_id = None
        RUNTIME.mark_dirty()
        return {"FINISHED"}


class CONJURE_OT_texture_selected(bpy.types.Operator):
    """Texture the active mesh object from the prompt (its topology, modifiers, UV maps and materials stay)"""

    bl_idname = "conjure.texture_selected"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER"}

    object_name: StringProperty(default="", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return context.scene is not None and hasattr(context.scene, "conjure") and obj is not None \
            and obj.type == "MESH"

    def execute(self, context):
        prefs = get_prefs(context)
        obj = bpy.data.objects.get(self.object_name) if self.object_name else context.active_object
        try:
            request = settings_to_request(context.scene.conjure, prefs.default_preset, RUNTIME.vocabulary(),
                                          strict=RUNTIME.strict_overrides())
            if bpy.app.background:
                from . import api

                api.texture(obj, **request)
                self.report({"INFO"}, "Conjure: textured %s" % obj.name)
                return {"FINISHED"}
            request = texture_ops.texture_request(obj, request)
        except ConjureError as e:
            return _report_error(self, e)
        job, waiting = _submit_or_start_backend(self, context, prefs, request, (0.0, 0.0, 0.0))
        if job is None:
            if waiting:
                return {"FINISHED"}
            texture_ops.TEXTURE_JOBS.pop(request["job_id"], None)
            return {"CANCELLED"}
        RUNTIME.error = None
        self.report({"INFO"}, "Conjure: texturing '%s' with '%s'" % (obj.name, request["prompt"]))
        return {"FINISHED"}


classes = (
    CONJURE_OT_texture_selected,
    CONJURE_OT_generate,
    CONJURE_OT_cancel,
    CONJURE_OT_start_backend,
    CONJURE_OT_stop_backend,
    CONJURE_OT_backend_status,
    CONJURE_OT_refresh_history,
    CONJURE_OT_reimport,
    CONJURE_OT_resubmit,
    CONJURE_OT_delete_job,
    CONJURE_OT_use_prompt,
    CONJURE_OT_dismiss,
)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
