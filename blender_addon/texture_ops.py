"""Texture Selected: paint the active mesh object from the prompt, on the object's own topology.

Upload (main thread, ``build_upload``):
    The object's mesh is triangulated with ``loop_triangles`` and sent in world scale (the object's
    world matrix applied; winding flipped for a mirroring matrix) with per-corner UVs from its
    active UV map and its base colour (the Principled Base Color of the material most faces use, else its
    viewport colour; linear → sRGB). When that Base Color comes straight from an Image Texture
    (e.g. an earlier Conjure texture), the image is sent as the start texture with the UV map it
    reads (its UV Map node's, else the render UV map), so texturing again continues from it (the
    backend uses it when it keeps those UVs). Which mesh is sent:

    * the **evaluated** mesh (modifiers applied) when the modifiers keep the topology (same vertex,
      loop and face counts as the object's own mesh, e.g. deform-only stacks), so what is
      textured is what the user sees;
    * the object's **own (base) mesh** when the modifiers change the topology (Subdivision
      Surface, Mirror, Array, Bevel, …). The texture then lives on the cage and the modifiers
      carry the ``Conjure`` UV map through, like any other UV map.

    For each triangle corner the upload remembers its mesh loop (``MeshLoopTriangle.loops``).

Result (main thread, staged in the pump, ``TextureResultStages``):
    The backend sends the same triangles back with per-corner UVs and a texture. Corner UVs are
    written to their loops in a UV map named ``Conjure`` (created, or overwritten when it
    exists), so quads and n-gons, modifiers, other UV maps and materials all stay. A new
    material (``Conjure <prompt>``: Image Texture through a UV Map node reading ``Conjure`` into
    the Principled BSDF) is added in a new slot and given to every face; the old materials stay
    in their slots and the faces' previous slot numbers are kept in the face attribute
    ``conjure_previous_material``. The pump's ``undo_push`` makes it one undo step.

Previews:
    shown on a temporary copy (``TexturePreviewSlot``: the preview meshes at the uploaded world
    positions) while the object itself is hidden; the copy is removed and the object shown again
    at the end, whether the job finished, failed or was cancelled.
"""

import bpy
import numpy as np

from . import importer
from .client import ConjureError
from .protocol.mesh import MeshPayload

UV_MAP_NAME = "Conjure"
PREVIOUS_MATERIAL_ATTR = "conjure_previous_material"
PROP_TEXTURE_JOB = "conjure_texture_job_id"

#: job id -> TextureTarget for texture jobs submitted from this Blender session
TEXTURE_JOBS = {}


class TextureTarget:
    """What is needed to map a texture job's result back onto the object.

    object_name: the user's object; mesh_name: its mesh datablock at submit time;
    tri_loops: (T*3,) int64 mesh loop of each uploaded triangle corner (row 3t + k);
    n_loops / n_polys: the mesh's loop and face counts at submit time (checked at the end);
    evaluated: True when the evaluated mesh was sent (modifiers keep the topology).
    """

    def __init__(self, object_name, mesh_name, tri_loops, n_loops, n_polys, evaluated, prompt):
        self.job_id = ""
        self.object_name = object_name
        self.mesh_name = mesh_name
        self.tri_loops = tri_loops
        self.n_loops = n_loops
        self.n_polys = n_polys
        self.evaluated = evaluated
        self.prompt = prompt
        self.was_hidden = None  # hide state before the previews hid it


def _linear_to_srgb(c):
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)


def main_material(obj):
    """The material most of the object's faces use (None without materials)."""
    mats = list(getattr(obj.data, "materials", []))
    if not mats:
        return None
    idx = np.empty(len(obj.data.polygons), np.int32)
    obj.data.polygons.foreach_get("material_index", idx)
    counts = np.bincount(np.clip(idx, 0, len(mats) - 1), minlength=len(mats)) if len(idx) else np.ones(1)
    for slot in np.argsort(-counts, kind="stable"):
        if mats[int(slot)] is not None:
            return mats[int(slot)]
    return None


def object_base_color(obj):
    """The object's colour as sRGB [r, g, b] in 0..1, or None (the backend then starts from grey).

    The main material's (:func:`main_material`) Principled Base Color when it is not driven by a
    texture, else the material's viewport colour; None without materials.
    """
    mat = main_material(obj)
    if mat is None:
        return None
    rgb = None
    if mat.node_tree is not None:
        bsdf = importer._principled(mat.node_tree.nodes)
        if bsdf is not None:
            base = bsdf.inputs["Base Color"]
            if base.is_linked:
                return None
            rgb = list(base.default_value)[:3]
    if rgb is None:
        rgb = list(mat.diffuse_color)[:3]
    return [float(c) for c in _linear_to_srgb(rgb)]


#: Largest side of an existing base-colour image that is sent as the start texture.
MAX_START_TEXTURE_SIDE = 4096


def base_color_image(obj):
    """(image, UV map name or None) when the main material's Base Color comes straight from an
    Image Texture node (through a UV Map node, or the default UV map), else None."""
    mat = main_material(obj)
    if mat is None or mat.node_tree is None:
        return None
    bsdf = importer._principled(mat.node_tree.nodes)
    if bsdf is None or not bsdf.inputs["Base Color"].is_linked:
        return None
    node = bsdf.inputs["Base Color"].links[0].from_node
    if node.type != "TEX_IMAGE" or node.image is None:
        return None
    w, h = node.image.size
    if not (0 < w <= MAX_START_TEXTURE_SIDE and 0 < h <= MAX_START_TEXTURE_SIDE):
        return None
    uv_name = None
    vec = node.inputs["Vector"]
    if vec.is_linked:
        src = vec.links[0].from_node
        if src.type != "UVMAP":
            return None  # generated / object coordinates: not a UV texture
        uv_name = src.uv_map or None
    return node.image, uv_name


def image_rgba8(image):
    """(H, W, 4) uint8 of ``image``, row 0 at the top (Blender stores rows bottom-up)."""
    w, h = image.size
    px = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(px)
    return np.ascontiguousarray((np.clip(px.reshape(h, w, 4)[::-1], 0, 1) * 255 + 0.5).astype(np.uint8))


def _topology_kept(base, evaluated):
    return (len(base.vertices) == len(evaluated.vertices) and len(base.loops) == len(evaluated.loops)
            and len(base.polygons) == len(evaluated.polygons))


def build_upload(obj, depsgraph=None):
    """(MeshPayload in world scale, TextureTarget, base colour or None) for the mesh object ``obj``.

    Raises ``ConjureError('bad_object')`` for a non-mesh object or a mesh without faces.
    """
    if obj is None or obj.type != "MESH":
        raise ConjureError("bad_object", "Select a mesh object to texture.")
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    base = obj.data
    if len(base.polygons) == 0:
        raise ConjureError("bad_object", "'%s' has no faces to texture." % obj.name)
    eval_obj = obj.evaluated_get(depsgraph)
    evaluated = eval_obj.to_mesh()
    try:
        use_eval = evaluated is not None and _topology_kept(base, evaluated)
        src = evaluated if use_eval else base
        src.calc_loop_triangles()
        n_tri = len(src.loop_triangles)
        tri_verts = np.empty(n_tri * 3, np.int32)
        tri_loops = np.empty(n_tri * 3, np.int32)
        src.loop_triangles.foreach_get("vertices", tri_verts)
        src.loop_triangles.foreach_get("loops", tri_loops)
        co = np.empty(len(src.vertices) * 3, np.float32)
        src.vertices.foreach_get("co", co)
        uvs = None
        start = base_color_image(obj)  # an image texture already on the object: start from it
        layer = src.uv_layers.active
        if start is not None:
            layer = src.uv_layers.get(start[1]) if start[1] else next(
                (u for u in src.uv_layers if u.active_render), layer)
            if layer is None:
                start = None
                layer = src.uv_layers.active
        if layer is not None and len(layer.data) == len(src.loops):
            loop_uv = np.empty(len(src.loops) * 2, np.float32)
            layer.data.foreach_get("uv", loop_uv)
            uvs = loop_uv.reshape(-1, 2)[tri_loops]
    finally:
        eval_obj.to_mesh_clear()
    m = np.array(obj.matrix_world, np.float64)
    world = (co.reshape(-1, 3).astype(np.float64) @ m[:3, :3].T + m[:3, 3]).astype(np.float32)
    faces = tri_verts.reshape(-1, 3)
    corner_loops = tri_loops.reshape(-1, 3)
    if np.linalg.det(m[:3, :3]) < 0:  # a mirroring transform turns the winding inside out
        faces = faces[:, [0, 2, 1]]
        corner_loops = corner_loops[:, [0, 2, 1]]
        if uvs is not None:
            uvs = uvs.reshape(-1, 3, 2)[:, [0, 2, 1]].reshape(-1, 2)
    texture = image_rgba8(start[0]) if start is not None and uvs is not None else None
    payload = MeshPayload(positions=np.ascontiguousarray(world), faces=np.ascontiguousarray(faces, np.uint32),
                          uvs=None if uvs is None else np.ascontiguousarray(uvs, np.float32), texture_rgba=texture)
    target = TextureTarget(obj.name, base.name, corner_loops.reshape(-1).astype(np.int64), len(base.loops),
                           len(base.polygons), use_eval, "")
    return payload, target, None if texture is not None else object_base_color(obj)


def texture_request(obj, request, depsgraph=None):
    """``request`` (kwargs of ``Client.submit``) extended with the object's mesh; registers the target."""
    from .protocol import new_job_id

    payload, target, color = build_upload(obj, depsgraph)
    target.prompt = request.get("prompt", "")
    job_id = target.job_id = new_job_id()
    TEXTURE_JOBS[job_id] = target
    return dict(request, mesh=payload, base_color=color, job_id=job_id)


def loop_uvs(target, corner_uvs):
    """(L, 2) float32 UV per mesh loop from per-corner UVs, and how many loops got conflicting UVs.

    A loop shared by several triangles of an n-gon takes the UV of its last corner; when the
    backend re-unwrapped the mesh, two triangles of one face may land in different charts, so
    loops whose corners disagree by more than 1e-5 are counted.
    """
    corner_uvs = np.asarray(corner_uvs, np.float32).reshape(-1, 2)
    if len(corner_uvs) != len(target.tri_loops):
        raise ConjureError("bad_result", "the result has %d corners, the upload had %d"
                           % (len(corner_uvs), len(target.tri_loops)))
    out = np.zeros((target.n_loops, 2), np.float32)
    out[target.tri_loops] = corner_uvs
    conflicts = int((np.abs(out[target.tri_loops] - corner_uvs).max(axis=1) > 1e-5).sum()) if len(corner_uvs) else 0
    return out, conflicts


def _texture_material(name, image):
    """Principled BSDF whose Base Color is ``image`` sampled through the ``Conjure`` UV map."""
    mat = importer.make_material(name, image=image)
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    tex = next(n for n in nodes if n.type == "TEX_IMAGE")
    uv = nodes.new("ShaderNodeUVMap")
    uv.name = uv.label = "Conjure UV"
    uv.uv_map = UV_MAP_NAME
    uv.location = (tex.location.x - 220, tex.location.y)
    links.new(uv.outputs["UV"], tex.inputs["Vector"])
    return mat


def apply_texture_stages(obj, target, payload, done):
    """Generator: write the ``Conjure`` UV map, the image and a new material onto ``obj`` in three
    short stages ('uv', 'image', 'material'); fills ``done`` (uv_conflicts, material, image, slot)."""
    me = obj.data
    if len(me.loops) != target.n_loops or len(me.polygons) != target.n_polys:
        raise ConjureError("topology_changed", "'%s' was edited while it was being textured (it had %d faces, "
                           "now %d); texture it again." % (obj.name, target.n_polys, len(me.polygons)))
    uv, conflicts = loop_uvs(target, payload.uvs)
    layer = me.uv_layers.get(UV_MAP_NAME)
    if layer is None:
        layer = me.uv_layers.new(name=UV_MAP_NAME, do_init=False)
        if layer is None:
            raise ConjureError("too_many_uv_maps", "'%s' already has the most UV maps Blender allows (8); "
                               "remove one and texture it again." % obj.name)
    layer.data.foreach_set("uv", uv.ravel())
    me.uv_layers.active = layer  # shown in the UV editor; the render UV map stays the user's
    done["uv_conflicts"] = conflicts
    yield "uv"
    name = "Conjure " + importer.object_name_for_prompt(target.prompt or "texture")
    image = importer.make_image(name, payload, pack=True)
    done["image"] = image.name if image else None
    yield "image"
    mat = _texture_material(name, image)
    # keep the faces' previous slots, then give every face the new material
    previous = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", previous)
    attr = me.attributes.get(PREVIOUS_MATERIAL_ATTR)
    if attr is None:
        attr = me.attributes.new(PREVIOUS_MATERIAL_ATTR, "INT", "FACE")
        attr.data.foreach_set("value", previous)
    me.materials.append(mat)
    slot = len(me.materials) - 1
    me.polygons.foreach_set("material_index", np.full(len(me.polygons), slot, np.int32))
    me.update()
    obj[PROP_TEXTURE_JOB] = target.job_id
    done.update(material=mat.name, slot=slot)
    yield "material"


def apply_texture(obj, target, payload):
    """All of :func:`apply_texture_stages` at once; returns what was done."""
    done = {}
    for _stage in apply_texture_stages(obj, target, payload, done):
        pass
    return done


class TexturePreviewSlot(importer.PreviewSlot):
    """Previews on a temporary copy at the uploaded world positions; the object is hidden meanwhile."""

    def __init__(self, job_id, target, collection=None):
        super().__init__(job_id, target.object_name + " (texturing)", location=(0.0, 0.0, 0.0),
                         collection=collection)
        self.target = target

    def stages(self, payload):
        yield from super().stages(payload)
        obj = bpy.data.objects.get(self.target.object_name)
        if obj is not None and self.target.was_hidden is None:
            self.target.was_hidden = obj.hide_get()
            obj.hide_set(True)

    def remove(self):
        super().remove()
        obj = bpy.data.objects.get(self.target.object_name)
        if obj is not None and self.target.was_hidden is not None:
            try:
                obj.hide_set(self.target.was_hidden)
            except RuntimeError:  # not in the view layer any more
                pass
        self.target.was_hidden = None


def preview_slot(job, collection=None):
    """A ``TexturePreviewSlot`` for a texture job submitted here, else None."""
    target = TEXTURE_JOBS.get(job.job_id)
    if target is None:
        return None
    obj = bpy.data.objects.get(target.object_name)
    coll = obj.users_collection[0] if obj is not None and obj.users_collection else collection
    return TexturePreviewSlot(job.job_id, target, coll)


class TextureResultStages:
    """The pump's result task for a texture job: apply, remove the preview copy; ``.obj`` after."""

    def __init__(self, runtime, job, payload):
        self.obj = None
        self._gen = self._run(runtime, job, payload)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self):
        self._gen.close()

    def _run(self, runtime, job, payload):
        target = TEXTURE_JOBS.get(job.job_id)
        slot = runtime.slots.get(job.job_id)
        try:
            obj = bpy.data.objects.get(target.object_name)
            if obj is None:
                raise ConjureError("object_gone", "the object '%s' was deleted while it was being textured"
                                   % target.object_name, job_id=job.job_id)
            yield "check"
            done = {}
            yield from apply_texture_stages(obj, target, payload, done)
            if done["uv_conflicts"]:
                job.message = ("%d face corners got two UVs (the backend re-unwrapped an n-gon across charts)"
                               % done["uv_conflicts"])
            yield "object"
        finally:
            if slot is not None:
                runtime.slots.pop(job.job_id, None)
                slot.remove()
            TEXTURE_JOBS.pop(job.job_id, None)
        self.obj = obj


def is_texture_job(job_id):
    return job_id in TEXTURE_JOBS
