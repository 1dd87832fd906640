"""GLB / OBJ export: container structure, reload in trimesh, Y-up conversion, Blender's importer."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trimesh

from backend.mesh.export import ExportError, export_mesh, split_seams
from protocol.mesh import MeshPayload
from tests.glb_check import GLBStructureError, check_glb_structure

REPO = Path(__file__).resolve().parents[1]


def _textured_box(seed: int = 0) -> MeshPayload:
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    box.vertices += np.array([0.1, 0.2, 0.3])
    rng = np.random.default_rng(seed)
    F = len(box.faces)
    # cube-map-ish UVs: each face gets its own island -> seams everywhere
    uvs = rng.uniform(0.05, 0.95, size=(F * 3, 2)).astype(np.float32)
    tex = rng.integers(0, 256, size=(8, 12, 4), dtype=np.uint8)
    tex[..., 3] = 255
    return MeshPayload(box.vertices.astype(np.float32), box.faces.astype(np.uint32), uvs=uvs, texture_rgba=tex)


def _glb_accessor(path: Path, gltf: dict, index: int) -> np.ndarray:
    data = path.read_bytes()
    json_len = struct.unpack_from("<I", data, 12)[0]
    bin_start = 12 + 8 + json_len + 8
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    dtype = {5126: np.float32, 5125: np.uint32}[acc["componentType"]]
    n = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
    off = bin_start + view["byteOffset"] + acc.get("byteOffset", 0)
    return np.frombuffer(data, dtype=dtype, count=acc["count"] * n, offset=off).reshape(acc["count"], n)


def test_textured_export_structure_and_trimesh_reload(tmp_path):
    mesh = _textured_box()
    files = export_mesh(mesh, tmp_path, "asset")
    assert set(files) == {"glb", "obj", "mtl", "png"}
    assert all(p.exists() for p in files.values())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    gltf = check_glb_structure(files["glb"])
    prim = gltf["meshes"][0]["primitives"][0]
    assert set(prim["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0"}
    pbr = gltf["materials"][0]["pbrMetallicRoughness"]
    assert pbr["baseColorTexture"]["index"] == 0
    assert pbr["metallicFactor"] == 0.0 and 0.5 <= pbr["roughnessFactor"] <= 1.0
    assert gltf["images"][0]["mimeType"] == "image/png" and "bufferView" in gltf["images"][0]

    source, new_faces, vert_uv = split_seams(mesh.faces.astype(np.int64), mesh.uvs)
    scene = trimesh.load(files["glb"], process=False)
    geom = list(scene.geometry.values())[0]
    assert len(geom.vertices) == len(source)
    assert len(geom.faces) == len(mesh.faces)
    uv = np.asarray(geom.visual.uv)
    assert uv.shape == (len(source), 2)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # trimesh flips v back to bottom-left origin: corners must carry the original per-corner UVs
    np.testing.assert_allclose(uv[np.asarray(geom.faces).reshape(-1)], mesh.uvs, atol=1e-6)
    img = np.asarray(geom.visual.material.baseColorTexture.convert("RGBA"))
    np.testing.assert_array_equal(img, mesh.texture_rgba)

    obj = trimesh.load(files["obj"], process=False)
    assert len(obj.faces) == len(mesh.faces)
    assert "map_Kd asset.png" in files["mtl"].read_text()


def test_y_up_conversion(tmp_path):
    mesh = _textured_box()
    files = export_mesh(mesh, tmp_path, "yup")
    gltf = check_glb_structure(files["glb"])
    prim = gltf["meshes"][0]["primitives"][0]
    pos = _glb_accessor(files["glb"], gltf, prim["attributes"]["POSITION"])
    idx = _glb_accessor(files["glb"], gltf, prim["indices"]).reshape(-1, 3)
    p = mesh.positions.astype(np.float64)
    expected = np.stack([p[:, 0], p[:, 2], -p[:, 1]], axis=1)
    # every exported face equals the original face, mapped (x, y, z) -> (x, z, -y)
    np.testing.assert_allclose(pos[idx], expected[mesh.faces.astype(np.int64)], atol=1e-6)
    # winding stays outward: signed volume positive in both frames
    tri = pos[idx].astype(np.float64)
    vol = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    assert vol == pytest.approx(1.0 * 2.0 * 3.0, rel=1e-5)
    assert gltf["accessors"][prim["attributes"]["POSITION"]]["max"][1] == pytest.approx(0.3 + 1.5, abs=1e-6)


def test_untextured_vertex_colours(tmp_path):
    ico = trimesh.creation.icosphere(subdivisions=1)
    colors = np.zeros((len(ico.vertices), 4), np.uint8)
    colors[:, 0] = 255
    colors[:, 1] = np.arange(len(ico.vertices)) % 256
    colors[:, 3] = 255
    mesh = MeshPayload(ico.vertices.astype(np.float32), ico.faces.astype(np.uint32), colors=colors)
    files = export_mesh(mesh, tmp_path, "draft")
    assert set(files) == {"glb"}
    gltf = check_glb_structure(files["glb"])
    prim = gltf["meshes"][0]["primitives"][0]
    assert "COLOR_0" in prim["attributes"] and "TEXCOORD_0" not in prim["attributes"]
    col = _glb_accessor(files["glb"], gltf, prim["attributes"]["COLOR_0"])
    assert col.shape == (len(ico.vertices), 4)
    np.testing.assert_allclose(col[:, 0], 1.0)
    np.testing.assert_allclose(col[40, 1], ((40 / 255 + 0.055) / 1.055) ** 2.4, rtol=1e-5)  # sRGB -> linear
    geom = list(trimesh.load(files["glb"], process=False).geometry.values())[0]
    assert len(geom.vertices) == len(ico.vertices)


def test_check_glb_structure_rejects_corruption(tmp_path):
    files = export_mesh(_textured_box(), tmp_path, "ok")
    good = files["glb"].read_bytes()

    def write(data: bytes) -> Path:
        p = tmp_path / "bad.glb"
        p.write_bytes(data)
        return p

    with pytest.raises(GLBStructureError, match="magic"):
        check_glb_structure(write(b"gltf" + good[4:]))
    with pytest.raises(GLBStructureError, match="version"):
        check_glb_structure(write(good[:4] + struct.pack("<I", 1) + good[8:]))
    with pytest.raises(GLBStructureError, match="file size"):
        check_glb_structure(write(good + b"\0\0\0\0"))
    with pytest.raises(GLBStructureError, match="file size"):
        check_glb_structure(write(good[:-4]))
    json_len = struct.unpack_from("<I", good, 12)[0]
    bad_len = good[:12] + struct.pack("<I", json_len + 2) + good[16:]
    with pytest.raises(GLBStructureError, match="multiple of 4|past the end"):
        check_glb_structure(write(bad_len))
    bad_type = good[:16] + b"BIN\0" + good[20:]
    with pytest.raises(GLBStructureError, match="JSON"):
        check_glb_structure(write(bad_type))


def test_bad_input_is_rejected_and_nothing_written(tmp_path):
    mesh = _textured_box()
    with pytest.raises(ExportError, match="name"):
        export_mesh(mesh, tmp_path, "../evil")
    bad = MeshPayload(mesh.positions, mesh.faces + 100, uvs=mesh.uvs, texture_rgba=mesh.texture_rgba)
    with pytest.raises(ExportError, match="out of range"):
        export_mesh(bad, tmp_path, "bad")
    bad = MeshPayload(mesh.positions, mesh.faces, uvs=mesh.uvs[:-3], texture_rgba=mesh.texture_rgba)
    with pytest.raises(ExportError, match="uvs"):
        export_mesh(bad, tmp_path, "bad")
    bad = MeshPayload(mesh.positions, mesh.faces, uvs=mesh.uvs, texture_png=b"not a png")
    with pytest.raises(ExportError, match="PNG"):
        export_mesh(bad, tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []


BLENDER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import bpy
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=sys.argv[1])
    objs = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    me = objs[0].data
    mat = me.materials[0] if me.materials else None
    images = [n.image.name for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"] if mat else []
    co = [list(objs[0].matrix_world @ v.co) for v in me.vertices]
    print("RESULT" + json.dumps({
        "n_objects": len(objs), "n_vertices": len(me.vertices), "n_faces": len(me.polygons),
        "uv_layers": len(me.uv_layers), "images": images,
        "image_size": list(bpy.data.images[images[0]].size) if images else None,
        "color_attributes": len(me.color_attributes),
        "min": [min(c[i] for c in co) for i in range(3)], "max": [max(c[i] for c in co) for i in range(3)],
    }))
    """
)


def _import_in_blender(glb: Path, tmp_path: Path) -> dict:
    pytest.importorskip("bpy")  # installed by the dev extras; the import runs in a subprocess
    script = tmp_path / "import_glb.py"
    script.write_text(BLENDER_SCRIPT)
    env = dict(os.environ)
    env["BLENDER_USER_RESOURCES"] = str(tmp_path / "blender_user")
    proc = subprocess.run([sys.executable, str(script), str(glb)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_blender_gltf_importer_loads_textured_and_draft(tmp_path):
    mesh = _textured_box()
    files = export_mesh(mesh, tmp_path, "asset")
    info = _import_in_blender(files["glb"], tmp_path)
    assert info["n_objects"] == 1 and info["n_faces"] == len(mesh.faces)
    assert info["uv_layers"] == 1
    assert info["images"] and info["image_size"] == [12, 8]
    # Blender converts glTF's Y up back to Z up: the bounding box matches the Blender-frame input
    np.testing.assert_allclose(info["min"], mesh.positions.min(axis=0), atol=1e-5)
    np.testing.assert_allclose(info["max"], mesh.positions.max(axis=0), atol=1e-5)

    ico = trimesh.creation.icosphere(subdivisions=1)
    colors = np.full((len(ico.vertices), 4), 255, np.uint8)
    colors[:, 2] = 0
    draft = MeshPayload(ico.vertices.astype(np.float32), ico.faces.astype(np.uint32), colors=colors)
    info = _import_in_blender(export_mesh(draft, tmp_path, "draft")["glb"], tmp_path)
    assert info["n_faces"] == len(ico.faces)
    assert info["color_attributes"] >= 1
