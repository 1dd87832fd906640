"""MeshPayload -> Blender data: mesh, image, material, object. Bulk ``foreach_set`` only: no
``as_pointer()``, no writes into Blender's memory, public API only.

Coordinates arrive in Blender's frame (metres, +Z up, front facing -Y), so positions are
copied as they are. Faces are (F, 3) uint32 counter-clockwise triangles; UVs are per corner
(F*3, 2) float32 with the origin bottom-left, which is exactly Blender's loop UV layout
(loop ``3*f + k`` is corner ``k`` of face ``f``). Textures are (H, W, 4) uint8 RGBA with row 0
at the top; Blender stores pixel rows bottom-up, so rows are flipped on the way in.

Building is split into short stages (``mesh_build_stages``) so the add-on's timer pump can
spread a preview over several ticks and keep every tick short. Nothing here touches sockets.
"""

import bpy
import numpy as np

__all__ = [
    "PROP_JOB_ID",
    "PROP_PREVIEW",
    "build_mesh",
    "mesh_build_stages",
    "make_image",
    "make_material",
    "import_result",
    "import_result_stages",
    "PreviewSlot",
    "remove_object",
    "object_name_for_prompt",
]

PROP_JOB_ID = "conjure_job_id"
PROP_PREVIEW = "conjure_preview"
UV_NAME = "UVMap"
COLOR_NAME = "Col"
_MAX_NAME = 56  # Blender names are 63 bytes; leave room for ".001" suffixes


def object_name_for_prompt(prompt):
    """A readable object name from a prompt: whitespace collapsed, cut at a word near 56 chars."""
    name = " ".join(str(prompt).split()) or "Conjure"
    if len(name.encode("utf-8")) > _MAX_NAME:
        cut = name.encode("utf-8")[:_MAX_NAME].decode("utf-8", "ignore")
        name = cut.rsplit(" ", 1)[0] if " " in cut[20:] else cut
    return name


_LOOP_TOTAL_WRITABLE = not bpy.types.MeshPolygon.bl_rna.properties["loop_total"].is_readonly


def _check_payload(payload, n, f, faces):
    """Cheap guards (Blender does not range-check ``foreach_set`` indices)."""
    if f and (int(faces.max()) >= n or int(faces.min()) < 0):
        raise ValueError("mesh face indices out of range 0..%d" % (n - 1))
    if payload.uvs is not None and np.shape(payload.uvs) != (3 * f, 2):
        raise ValueError("per-corner UVs must have shape (%d, 2), got %s" % (3 * f, np.shape(payload.uvs)))
    if payload.colors is not None and np.shape(payload.colors) != (n, 4):
        raise ValueError("vertex colours must have shape (%d, 4), got %s" % (n, np.shape(payload.colors)))


def _sent_edges(payload, n, faces):
    """The payload's (edges (E,2) int32, corner_edges (3F,) int32), or None to let Blender build them.

    Range checks cover every index (Blender does not check them); agreement with the faces is
    checked on an evenly spaced sample of up to 2048 corners (the full check would cost ~10 ms
    for 200k triangles on the main thread), and any disagreement falls back to ``calc_edges``.
    """
    edges, corner_edges = getattr(payload, "edges", None), getattr(payload, "corner_edges", None)
    if edges is None or corner_edges is None:
        return None
    edges = np.ascontiguousarray(edges).reshape(-1, 2)
    corner_edges = np.ascontiguousarray(corner_edges).reshape(-1)
    if len(corner_edges) != faces.size or (edges.size and int(edges.max()) >= n):
        return None
    if any(a.dtype.kind == "i" and a.size and int(a.min()) < 0 for a in (edges, corner_edges)):
        return None
    if corner_edges.size and int(corner_edges.max()) >= len(edges):
        return None
    if faces.size:
        pick = np.unique(np.linspace(0, faces.size - 1, min(faces.size, 2048)).astype(np.int64))
        here = faces.reshape(-1)[pick].astype(np.int64)
        nxt = faces.reshape(-1)[pick - pick % 3 + (pick % 3 + 1) % 3].astype(np.int64)
        got = edges[corner_edges[pick]].astype(np.int64)
        if not np.all(((got[:, 0] == here) & (got[:, 1] == nxt)) | ((got[:, 0] == nxt) & (got[:, 1] == here))):
            return None
    return _int32(edges), _int32(corner_edges)


def _int32(a):
    """``a`` as int32 without a copy when it is (u)int32 (indices here are < 2**31)."""
    return a.view(np.int32) if a.dtype in (np.uint32, np.int32) else a.astype(np.int32)


def _set_edges(mesh, edges, corner_edges):
    """Add the sent edges and each corner's edge (Blender 4.0+ attributes, else the 3.x wrappers)."""
    mesh.edges.add(len(edges))
    attrs = mesh.attributes
    edge_verts, corner_edge = attrs.get(".edge_verts"), attrs.get(".corner_edge")
    if edge_verts is not None and corner_edge is not None and edge_verts.data_type == "INT32_2D":
        edge_verts.data.foreach_set("value", edges.ravel())
        corner_edge.data.foreach_set("value", corner_edges)
    else:
        mesh.edges.foreach_set("vertices", edges.ravel())
        mesh.loops.foreach_set("edge_index", corner_edges)


def mesh_build_stages(mesh, payload):
    """Fill an EMPTY ``bpy.types.Mesh`` from ``payload`` in stages; a generator.

    Each ``next()`` runs one bulk stage (vertices, corners, faces, UVs, colours, edges —
    the backend's ``edges``/``corner_edges`` when the payload has them, else Blender's
    ``calc_edges`` — and shading) and yields its name, so a caller with a time budget can stop between
    stages. The mesh is consistent only after the generator is exhausted; keep it unlinked
    from any object until then.
    """
    pos = np.ascontiguousarray(payload.positions, dtype=np.float32).reshape(-1, 3)
    faces = np.ascontiguousarray(payload.faces).reshape(-1, 3)
    n, f = len(pos), len(faces)
    _check_payload(payload, n, f, faces)
    mesh.vertices.add(n)
    # Blender 3.5+ stores positions, corner vertices and UVs as generic attributes whose
    # ``foreach_set`` is a plain copy (10-100x faster than the MeshVertex/MeshLoop wrappers).
    attrs = mesh.attributes
    position = attrs.get("position")
    if position is not None and position.data_type == "FLOAT_VECTOR":
        position.data.foreach_set("vector", pos.ravel())
    else:
        mesh.vertices.foreach_set("co", pos.ravel())
    yield "vertices"
    corners = faces.astype(np.int32, copy=False).ravel()
    mesh.loops.add(3 * f)
    corner_vert = attrs.get(".corner_vert")
    if corner_vert is not None and corner_vert.data_type == "INT":
        corner_vert.data.foreach_set("value", corners)
    else:
        mesh.loops.foreach_set("vertex_index", corners)
    yield "corners"
    mesh.polygons.add(f)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * f, 3, dtype=np.int32))
    if _LOOP_TOTAL_WRITABLE:  # Blender < 4.0; later versions derive it from the next face's start
        mesh.polygons.foreach_set("loop_total", np.full(f, 3, dtype=np.int32))
    yield "faces"
    if payload.uvs is not None:
        uv = mesh.uv_layers.new(name=UV_NAME)
        flat = np.ascontiguousarray(payload.uvs, dtype=np.float32).ravel()
        uv_attr = attrs.get(uv.name)
        if uv_attr is not None and uv_attr.data_type == "FLOAT2" and uv_attr.domain == "CORNER":
            uv_attr.data.foreach_set("vector", flat)
        else:
            uv.data.foreach_set("uv", flat)
        yield "uvs"
    if payload.colors is not None:
        attr = mesh.color_attributes.new(COLOR_NAME, "BYTE_COLOR", "POINT")
        rgba = np.ascontiguousarray(payload.colors).reshape(-1, 4).astype(np.float32) / 255.0
        attr.data.foreach_set("color_srgb", rgba.ravel())  # sRGB values as sent (Blender 3.4+)
        yield "colors"
    sent = _sent_edges(payload, n, faces)
    if sent is not None:
        _set_edges(mesh, *sent)
        mesh.update()
    else:
        mesh.update(calc_edges=True)
    yield "edges"
    if hasattr(mesh, "shade_smooth"):  # 4.1+: drops the sharp_face attribute
        mesh.shade_smooth()
    else:
        mesh.polygons.foreach_set("use_smooth", np.ones(f, dtype=bool))
    yield "smooth"


def build_mesh(name, payload):
    """A new ``bpy.types.Mesh`` named ``name`` built from ``payload`` in one go."""
    mesh = bpy.data.meshes.new(name)
    for _ in mesh_build_stages(mesh, payload):
        pass
    return mesh


def _texture_rgba_float(payload):
    """(H, W, 4) uint8 top-row-first -> flat float32 bottom-row-first, as ``Image.pixels`` wants."""
    tex = np.asarray(payload.texture_rgba)
    if tex.ndim == 3 and tex.shape[2] == 3:
        tex = np.concatenate([tex, np.full(tex.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return (tex[::-1].astype(np.float32) * (1.0 / 255.0)).ravel(), tex.shape[1], tex.shape[0]


def encode_png(rgba, level=1):
    """(H, W, 4) uint8 RGBA, row 0 at the top -> PNG bytes (stdlib zlib; fast, lossless)."""
    import struct
    import zlib

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    h, w = rgba.shape[:2]
    raw = np.empty((h, 1 + 4 * w), np.uint8)
    raw[:, 0] = 0  # filter "none" on every row
    raw[:, 1:] = rgba.reshape(h, 4 * w)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


def _packed_png_image(name, data):
    img = bpy.data.images.new(name, 8, 8)
    img.pack(data=data, data_len=len(data))
    img.source = "FILE"
    return img


def make_image(name, payload, *, pack=True, image=None):
    """The payload's texture as a ``bpy.types.Image`` (or None when it has none).

    PNG bytes are packed into the .blend as they are (Blender decodes them lazily). A raw
    RGBA8 texture to keep (``pack=True``) is encoded to PNG here (zlib level 1, far faster than
    ``pixels`` + ``Image.pack()``) and packed the same way; a preview texture (``pack=False``)
    is written with ``pixels.foreach_set``, reusing ``image`` in place when it has the same size.
    """
    if payload.texture_png is not None:
        return _packed_png_image(name, bytes(payload.texture_png))
    if payload.texture_rgba is None:
        return None
    tex = np.asarray(payload.texture_rgba)
    if pack and tex.ndim == 3 and tex.shape[2] == 4:
        return _packed_png_image(name, encode_png(tex))
    pixels, w, h = _texture_rgba_float(payload)
    if image is not None and tuple(image.size) == (w, h) and image.source == "GENERATED":
        img = image
    else:
        img = bpy.data.images.new(name, w, h, alpha=True)
    img.pixels.foreach_set(pixels)
    img.update()
    if pack:
        img.pack()
    return img


def _principled(nodes):
    for node in nodes:
        if node.type == "BSDF_PRINCIPLED":
            return node
    return None


def make_material(name, *, image=None, vertex_colors=False):
    """A Principled BSDF material: base colour from ``image`` or else from the ``Col`` attribute."""
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # before 5.0 new materials start without nodes
        mat.use_nodes = True
    wire_material(mat, image=image, vertex_colors=vertex_colors)
    return mat


def wire_material(mat, *, image=None, vertex_colors=False):
    """(Re)wire ``mat``'s base colour to ``image`` or to the vertex colours; keeps the BSDF."""
    nt = mat.node_tree
    nodes, links = nt.nodes, nt.links
    bsdf = _principled(nodes)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None) or nodes.new(
            "ShaderNodeOutputMaterial"
        )
        links.new(bsdf.outputs[0], out.inputs["Surface"])
    for node in [n for n in nodes if n.name in ("Conjure Texture", "Conjure Colors")]:
        nodes.remove(node)
    bsdf.inputs["Roughness"].default_value = 0.6
    base = bsdf.inputs["Base Color"]
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.name = tex.label = "Conjure Texture"
        tex.image = image
        tex.location = (bsdf.location.x - 320, bsdf.location.y)
        links.new(tex.outputs["Color"], base)
    elif vertex_colors:
        col = nodes.new("ShaderNodeVertexColor")
        col.name = col.label = "Conjure Colors"
        col.layer_name = COLOR_NAME
        col.location = (bsdf.location.x - 320, bsdf.location.y)
        links.new(col.outputs["Color"], base)
    return mat


def _free_if_orphan(idblock, collection):
    if idblock is not None and idblock.users == 0:
        collection.remove(idblock)


def remove_object(obj):
    """Delete ``obj`` and its mesh, materials and images when nothing else uses them."""
    mesh = obj.data
    mats = [m for m in getattr(mesh, "materials", []) if m is not None] if mesh else []
    bpy.data.objects.remove(obj, do_unlink=True)
    if isinstance(mesh, bpy.types.Mesh):
        _free_if_orphan(mesh, bpy.data.meshes)
    for mat in mats:
        images = _material_images(mat)
        _free_if_orphan(mat, bpy.data.materials)
        for img in images:
            _free_if_orphan(img, bpy.data.images)


def _material_images(mat):
    if mat is None or mat.node_tree is None:
        return []
    return [n.image for n in mat.node_tree.nodes if n.type == "TEX_IMAGE" and n.image is not None]


def _place(obj, *, collection, location, select):
    collection.objects.link(obj)
    if location is not None:
        obj.location = tuple(location)
    if select:
        view_layer = bpy.context.view_layer
        for other in list(view_layer.objects.selected):
            if other is not None:
                other.select_set(False)
        if obj.name in view_layer.objects:
            obj.select_set(True)
            view_layer.objects.active = obj


def default_collection():
    """The active collection (where Add > Mesh would put things), else the scene's root."""
    coll = getattr(bpy.context, "collection", None)
    if coll is None:
        coll = bpy.context.scene.collection
    return coll


def default_location():
    """The 3D cursor's location (a tuple in world metres)."""
    return tuple(bpy.context.scene.cursor.location)


def import_result(payload, *, name, location=None, collection=None, props=None, replace=None,
                  select=True, pack=True):
    """Create the final object from ``payload``; returns the ``bpy.types.Object``.

    Args:
        payload: a validated MeshPayload.
        name: object/mesh/material name (see ``object_name_for_prompt``).
        location: world position (metres); default the 3D cursor.
        collection: where to link it; default the active collection.
        props: custom properties to store on the object (str/int/float values).
        replace: the job's ``PreviewSlot`` (or a preview object), deleted with its data once
            the new object exists.
        select: make the new object the only selected one and the active one.
        pack: pack a raw RGBA texture into the .blend (PNG textures are always packed).
    """
    stages = import_result_stages(payload, name=name, location=location, collection=collection, props=props,
                                  replace=replace, select=select, pack=pack)
    for _ in stages:
        pass
    return stages.obj


class import_result_stages:  # used like a generator function
    """``import_result`` one stage per ``next()``; the object is ``.obj`` once exhausted."""

    def __init__(self, payload, *, name, location=None, collection=None, props=None, replace=None,
                 select=True, pack=True):
        self.obj = None
        self._gen = self._run(payload, name, location, collection, props, replace, select, pack)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self):
        self._gen.close()

    def _run(self, payload, name, location, collection, props, replace, select, pack):
        if collection is None:
            collection = default_collection()
        if location is None:
            location = default_location()
        png_future = None
        tex = payload.texture_rgba
        if pack and payload.texture_png is None and tex is not None and np.ndim(tex) == 3 and np.shape(tex)[2] == 4:
            # encode the PNG on a worker thread (zlib releases the GIL) while the mesh is built
            import concurrent.futures

            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conjure-png")
            png_future = pool.submit(encode_png, np.array(tex, dtype=np.uint8))
            pool.shutdown(wait=False)
        mesh = bpy.data.meshes.new(name)
        try:
            yield from mesh_build_stages(mesh, payload)
        except BaseException:
            bpy.data.meshes.remove(mesh)
            raise
        if png_future is not None:
            import concurrent.futures

            while True:  # short waits, so a timer pump's tick stays short
                try:
                    data = png_future.result(timeout=0.002)
                    break
                except concurrent.futures.TimeoutError:
                    yield "texture_wait"
            image = _packed_png_image(name, data)
        else:
            image = make_image(name, payload, pack=pack)
        yield "texture"
        mat = make_material(name, image=image, vertex_colors=image is None and payload.colors is not None)
        mesh.materials.append(mat)
        if isinstance(replace, PreviewSlot):
            replace.remove()
        elif replace is not None:
            try:
                remove_object(replace)
            except ReferenceError:
                pass
        obj = bpy.data.objects.new(name, mesh)
        for key, value in (props or {}).items():
            obj[key] = value
        _place(obj, collection=collection, location=location, select=select)
        self.obj = obj
        yield "object"


class PreviewSlot:
    """The one preview object of a job, updated in place as preview meshes arrive.

    Each update builds a fresh mesh off-scene (in stages, see ``stages``), then swaps it into
    the object and deletes the mesh it replaced; a raw RGBA texture of unchanged size is
    rewritten in the same image. Only one object, one material and at most one image ever
    exist per job, so previews leave nothing behind.
    """

    def __init__(self, job_id, name, *, location=None, collection=None):
        self.job_id = job_id
        self.name = name
        self.location = tuple(location) if location is not None else default_location()
        self.collection_name = (collection or default_collection()).name
        self._obj_name = None
        self.updates = 0

    # -- lookup that survives undo/file reloads (names, checked by a tag) --------------------
    def object(self):
        """The preview object if it still exists, else None."""
        if self._obj_name is None:
            return None
        obj = bpy.data.objects.get(self._obj_name)
        if obj is None or obj.get(PROP_PREVIEW) != self.job_id:
            return None
        return obj

    def _collection(self):
        coll = bpy.data.collections.get(self.collection_name)
        if coll is None or self.collection_name == bpy.context.scene.collection.name:
            coll = bpy.context.scene.collection
        return coll

    def update(self, payload):
        """Apply one preview in one go (for headless use and benchmarks)."""
        for _ in self.stages(payload):
            pass

    def stages(self, payload):
        """A generator applying ``payload`` as the new preview, one short stage per ``next()``."""
        mesh = bpy.data.meshes.new(self.name + " (preview)")
        try:
            yield from mesh_build_stages(mesh, payload)
        except BaseException:
            bpy.data.meshes.remove(mesh)
            raise
        obj = self.object()
        mat = None
        if obj is not None and obj.data is not None and len(obj.data.materials):
            mat = obj.data.materials[0]
        old_images = _material_images(mat)
        image = None
        reuse = old_images[0] if old_images else None
        if payload.texture_png is not None or payload.texture_rgba is not None:
            image = make_image(self.name + " (preview)", payload, pack=False, image=reuse)
            yield "texture"
        if mat is None:
            mat = make_material(self.name + " (preview)", image=image,
                                vertex_colors=image is None and payload.colors is not None)
        elif image is not reuse:
            wire_material(mat, image=image, vertex_colors=image is None and payload.colors is not None)
        for img in old_images:
            if img is not image:
                _free_if_orphan(img, bpy.data.images)
        mesh.materials.append(mat)
        if obj is None:
            obj = bpy.data.objects.new(self.name + " (preview)", mesh)
            obj[PROP_PREVIEW] = self.job_id
            obj[PROP_JOB_ID] = self.job_id
            _place(obj, collection=self._collection(), location=self.location, select=False)
            self._obj_name = obj.name
        else:
            old = obj.data
            obj.data = mesh
            _free_if_orphan(old, bpy.data.meshes)
        self.updates += 1
        yield "swap"

    def remove(self):
        """Delete the preview object and its data (after cancel, error or the final import)."""
        obj = self.object()
        if obj is not None:
            remove_object(obj)
        self._obj_name = None
