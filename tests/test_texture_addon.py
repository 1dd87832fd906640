"""Texture Selected with bpy 5.0.1 and a real backend process (fast test pipeline's run_texture):
the user's object keeps its topology (quads, n-gons), modifiers, UV maps and materials, and gains
a ``Conjure`` UV map and material; the preview copy is removed; errors are clear."""

from __future__ import annotations

import pytest

from tests.addon_support import backend_process, body_main, enable_addon, have_bpy, run_body

pytestmark = pytest.mark.skipif(not have_bpy(), reason="bpy 5.0.1 not installed")

FAST = {"test.steps": 3, "test.step_seconds": 0.02, "test.preview_every": 1}


backend = pytest.fixture(backend_process)


def _snapshot(obj):
    import numpy as np

    me = obj.data
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    sizes = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_total", sizes)
    loops = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", loops)
    uv = {}
    for layer in me.uv_layers:
        a = np.empty(len(me.loops) * 2, np.float32)
        layer.data.foreach_get("uv", a)
        uv[layer.name] = a.tolist()
    return {"co": co.tolist(), "sizes": sizes.tolist(), "loops": loops.tolist(), "uv": uv,
            "modifiers": [(m.name, m.type) for m in obj.modifiers],
            "materials": [m.name if m else None for m in me.materials],
            "hidden": obj.hide_get()}


def _body_texture(args):
    import numpy as np

    bpy = enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    conn = args["conn"]
    # a quad cube with its default UVMap, a Subdivision modifier, a red material, rotated and scaled
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(1.0, 2.0, 0.5), rotation=(0.0, 0.0, 0.5))
    cube = bpy.context.active_object
    cube.name = "Crate"
    cube.scale = (1.0, 2.0, 0.5)
    cube.modifiers.new("Subdivision", "SUBSURF").levels = 2
    old = bpy.data.materials.new("Old Red")
    old.diffuse_color = (0.8, 0.05, 0.05, 1.0)
    cube.data.materials.append(old)
    before = _snapshot(cube)
    previews = []
    obj = api.texture(cube, "a green crate", seed=3, preset="cpu", overrides=args["fast"], connection=conn,
                      previews=True)
    out = {"same_object": obj == cube, "before": before, "after": _snapshot(cube),
           "previews_applied": RUNTIME.stats["previews_applied"], "previews": previews,
           "objects": sorted(o.name for o in bpy.data.objects),
           "old_in_file": "Old Red" in bpy.data.materials}
    me = cube.data
    idx = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", idx)
    prev = np.empty(len(me.polygons), np.int32)
    me.attributes["conjure_previous_material"].data.foreach_get("value", prev)
    mat = me.materials[-1]
    nodes = {n.type: n for n in mat.node_tree.nodes}
    out["material_index"] = sorted(set(idx.tolist()))
    out["previous_index"] = sorted(set(prev.tolist()))
    out["uv_node"] = nodes["UVMAP"].uv_map
    img = nodes["TEX_IMAGE"].image
    out["image"] = [img.size[0], img.size[1], img.packed_file is not None]
    px = np.empty(img.size[0] * img.size[1] * 4, np.float32)
    img.pixels.foreach_get(px)
    out["image_mean"] = px.reshape(-1, 4).mean(0).tolist()
    out["active_uv"] = me.uv_layers.active.name
    out["render_uv"] = next(layer.name for layer in me.uv_layers if layer.active_render)
    # the base mesh was uploaded (Subdivision changes the topology): 6 quads → 12 triangles; the
    # test pipeline's planar UVs follow the world x, y of each loop's vertex
    w = np.array(cube.matrix_world)
    co = np.array(out["after"]["co"], np.float64).reshape(-1, 3) @ w[:3, :3].T + w[:3, 3]
    lo, hi = co.min(0), co.max(0)
    expect = (co[:, :2] - lo[:2]) / (hi[:2] - lo[:2])
    got = np.array(out["after"]["uv"]["Conjure"]).reshape(-1, 2)
    out["uv_error"] = float(np.abs(got - expect[np.array(out["after"]["loops"])]).max())

    # texturing again starts from the texture now on the object, through the UV map it reads
    from blender_addon import texture_ops

    again, _target, color = texture_ops.build_upload(cube)
    out["again"] = {"texture": list(again.texture_rgba.shape), "color": color,
                    "texel": again.texture_rgba[0, 0].tolist(),
                    "uvs_match": bool(np.abs(again.uvs - got[_target.tri_loops]).max() < 1e-6)}

    # n-gon caps, no modifiers (the evaluated mesh is sent), through the operator (blocks headless)
    bpy.ops.mesh.primitive_cylinder_add(vertices=12, end_fill_type="NGON", location=(-3, 0, 0))
    cyl = bpy.context.active_object
    cyl_before = _snapshot(cyl)
    s = bpy.context.scene.conjure
    s.prompt = "a red can"
    s.preset = "cpu"
    s.random_seed = False
    s.extra_overrides = "; ".join(f"{k}={v}" for k, v in args["fast"].items())
    res = bpy.ops.conjure.texture_selected()
    out["op"] = sorted(res)
    out["cyl_before"], out["cyl_after"] = cyl_before, _snapshot(cyl)
    # errors: not a mesh, a mesh without faces
    errors = []
    empty = bpy.data.objects.new("Empty", None)
    bpy.context.scene.collection.objects.link(empty)
    verts = bpy.data.meshes.new("points")
    verts.from_pydata([(0, 0, 0), (1, 0, 0)], [], [])
    points = bpy.data.objects.new("Points", verts)
    bpy.context.scene.collection.objects.link(points)
    for target in (empty, points):
        try:
            api.texture(target, "a red can", preset="cpu", overrides=args["fast"], connection=conn)
            errors.append(None)
        except api.ConjureError as e:
            errors.append([e.code, e.message])
    out["errors"] = errors
    # a texture job that times out is cancelled: the preview copy goes, the object shows again
    import time

    slow = dict(args["fast"], **{"test.steps": 400, "test.step_seconds": 0.05})
    shown_before = RUNTIME.stats["previews_applied"]
    try:
        api.texture(cyl, "a slow can", preset="cpu", overrides=slow, connection=conn, timeout=2.0, previews=True)
        out["timeout"] = None
    except api.ConjureError as e:
        out["timeout"] = e.code
        job = RUNTIME.client.jobs[e.job_id]
        deadline = time.monotonic() + 10
        while (job.state != "cancelled" or e.job_id in RUNTIME.slots) and time.monotonic() < deadline:
            RUNTIME.process(0.05, timeout_ms=20)
        out["after_cancel"] = {"state": job.state, "hidden": cyl.hide_get(),
                               "previews": RUNTIME.stats["previews_applied"] - shown_before,
                               "objects": sorted(o.name for o in bpy.data.objects),
                               "uv_maps": [u.name for u in cyl.data.uv_layers]}
    api.disconnect()
    return out


def test_texture_selected_keeps_topology_modifiers_uv_maps_and_materials(backend):
    r = run_body(__file__, "texture", {"conn": str(backend.conn), "fast": FAST}, timeout=180)
    b, a = r["before"], r["after"]
    assert r["same_object"]
    assert a["co"] == b["co"], "no vertex of the user's mesh moves"
    assert a["sizes"] == b["sizes"] == [4] * 6 and a["loops"] == b["loops"], "quads stay quads"
    assert a["modifiers"] == b["modifiers"] == [["Subdivision", "SUBSURF"]]
    assert list(a["uv"]) == ["UVMap", "Conjure"] and a["uv"]["UVMap"] == b["uv"]["UVMap"]
    assert a["materials"][0] == "Old Red" and a["materials"][1].startswith("Conjure") and r["old_in_file"]
    assert r["material_index"] == [1] and r["previous_index"] == [0]
    assert r["uv_node"] == "Conjure" and r["image"][2] and r["image"][:2] == [16, 16]
    g = r["image_mean"]
    assert g[1] > g[0] + 0.3 and g[1] > g[2] + 0.3, g  # the test pipeline paints 'green' green
    assert r["uv_error"] < 1e-5, "corner UVs map back to the right loops"
    assert r["active_uv"] == "Conjure" and r["render_uv"] == "UVMap"
    assert r["previews_applied"] >= 1 and not a["hidden"]
    assert r["objects"] == ["Crate"], "the preview copy is removed"
    ag = r["again"]
    assert ag["texture"] == [16, 16, 4] and ag["color"] is None and ag["uvs_match"], ag
    assert ag["texel"][1] > ag["texel"][0] + 60, ag  # the green texture comes back as the start
    cb, ca = r["cyl_before"], r["cyl_after"]
    assert r["op"] == ["FINISHED"]
    assert ca["sizes"] == cb["sizes"] and max(cb["sizes"]) == 12, "n-gon caps stay"
    assert ca["co"] == cb["co"] and list(ca["uv"]) == ["UVMap", "Conjure"]
    assert r["errors"][0][0] == "bad_object" and "mesh object" in r["errors"][0][1]
    assert r["errors"][1][0] == "bad_object" and "no faces" in r["errors"][1][1]
    assert r["timeout"] == "timeout"
    ac = r["after_cancel"]
    assert ac["previews"] >= 1 and ac["state"] == "cancelled" and not ac["hidden"], ac
    assert not any("(texturing)" in name for name in ac["objects"]), ac["objects"]
    assert ac["uv_maps"] == ["UVMap", "Conjure"]  # the earlier texture stays; nothing half-applied


def _body_big(args):
    import time

    import numpy as np

    bpy = enable_addon()
    from blender_addon import api

    bpy.ops.mesh.primitive_grid_add(x_subdivisions=317, y_subdivisions=317, size=4.0)  # 100k quads
    grid = bpy.context.active_object
    t0 = time.monotonic()
    obj = api.texture(grid, "a red floor", preset="cpu", overrides=args["fast"], connection=args["conn"])
    seconds = time.monotonic() - t0
    me = obj.data
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["Conjure"].data.foreach_get("uv", uv)
    api.disconnect()
    return {"triangles": sum(p.loop_total - 2 for p in me.polygons), "seconds": seconds,
            "uv_range": [float(uv.min()), float(uv.max())], "uv_maps": [u.name for u in me.uv_layers]}


def test_texture_selected_uploads_a_200k_triangle_object_in_pieces(backend):
    r = run_body(__file__, "big", {"conn": str(backend.conn), "fast": FAST}, timeout=180)
    assert r["triangles"] >= 200_000 and r["uv_maps"] == ["UVMap", "Conjure"]
    assert r["uv_range"][0] >= 0.0 and r["uv_range"][1] <= 1.0 and r["uv_range"][1] > 0.9
    print(f"200k-triangle object textured (test pipeline) in {r['seconds']:.1f} s")


if __name__ == "__main__":
    body_main(globals())
