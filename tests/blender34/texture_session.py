"""Texture Selected in a real Blender window (Debian's Blender 3.4 under xvfb-run).

Run by ``tests/test_texture_blender34.py`` as
``xvfb-run blender --factory-startup --enable-event-simulate --python texture_session.py`` with
``CONJURE_TEST_CONFIG`` naming a JSON file ``{"addon", "conn", "out", "overrides"}``.

On timers (the UI keeps running): enable the add-on and connect; give the start-up Cube (quads,
its UVMap) a Subdivision modifier and an "Old Paint" material and push an undo step; open the
sidebar on the Conjure tab; type a prompt and press **Texture Selected** through the panel's
operator; screenshot a live preview (the temporary copy) and the finished object (Solid
shading, Texture colour); check topology, modifier, UV maps and materials; then Undo once and check the texture
is gone in one step. Results go to ``out/result.json``, screenshots to ``out/*.png``.
"""

import json
import os
import sys
import time
import traceback

import addon_utils
import bpy

CFG = json.load(open(os.environ["CONJURE_TEST_CONFIG"]))
OUT = CFG["out"]
R = {"events": [], "errors": [], "screenshots": []}
T0 = time.monotonic()
bpy.context.preferences.view.show_splash = False


def log(*a):
    R["events"].append(["%.2f" % (time.monotonic() - T0)] + [str(x) for x in a])
    print("[texture_session %.2f]" % (time.monotonic() - T0), *a, flush=True)


def save():
    with open(os.path.join(OUT, "result.json.tmp"), "w") as f:
        json.dump(R, f, indent=1)
    os.replace(os.path.join(OUT, "result.json.tmp"), os.path.join(OUT, "result.json"))


mod = addon_utils.enable(CFG["addon"], default_set=True, handle_error=None)
pkg = mod.__name__
RUNTIME = sys.modules[pkg + ".runtime"].RUNTIME
panel = sys.modules[pkg + ".panel"]
prefs = bpy.context.preferences.addons[pkg].preferences
prefs.mode = "CONNECT"
prefs.connect_with = "FILE"
prefs.connection_file = CFG["conn"]
DRAWS = {"n": 0}
_orig_draw = panel.CONJURE_PT_main.draw


def counting_draw(self, context):
    DRAWS["n"] += 1
    _orig_draw(self, context)


panel.CONJURE_PT_main.draw = counting_draw


def window_area():
    win = bpy.context.window_manager.windows[0]
    area = next(a for a in win.screen.areas if a.type == "VIEW_3D")
    region = next(r for r in area.regions if r.type == "UI")
    return win, area, region


def shot(name):
    win, area, _region = window_area()
    path = os.path.join(OUT, name)
    with bpy.context.temp_override(window=win, area=area):
        bpy.ops.screen.screenshot(filepath=path)
    R["screenshots"].append(path)
    log("screenshot", path)


def click(win, x, y):
    win.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
    win.event_simulate(type="LEFTMOUSE", value="PRESS", x=x, y=y)
    win.event_simulate(type="LEFTMOUSE", value="RELEASE", x=x, y=y)


def in_window(op, **kw):
    win, area, region = window_area()
    with bpy.context.temp_override(window=win, area=area, region=region):
        return op(**kw)


def state(obj):
    me = obj.data
    return {"polys": len(me.polygons), "quads": sum(1 for p in me.polygons if p.loop_total == 4),
            "modifiers": [m.type for m in obj.modifiers], "uv_maps": [u.name for u in me.uv_layers],
            "materials": [m.name if m else None for m in me.materials], "hidden": obj.hide_get()}


def scenario():
    yield 1.0
    cube = bpy.data.objects["Cube"]
    cube.modifiers.new("Subdivision", "SUBSURF").levels = 1
    old = bpy.data.materials.new("Old Paint")
    old.diffuse_color = (0.8, 0.3, 0.1, 1.0)
    cube.data.materials.clear()
    cube.data.materials.append(old)
    bpy.context.view_layer.objects.active = cube
    cube.select_set(True)
    s = bpy.context.scene.conjure
    s.prompt = "a blue crate"
    s.random_seed = False
    s.seed = 5
    s.extra_overrides = CFG["overrides"]
    in_window(bpy.ops.ed.undo_push, message="test set-up")
    R["before"] = state(cube)
    win, area, region = window_area()
    area.spaces[0].show_region_ui = True
    area.tag_redraw()
    yield 1.0
    win, area, region = window_area()
    x, top = region.x + region.width - 9, region.y + region.height
    for dy in range(120, 420, 12):
        n = DRAWS["n"]
        click(win, x, top - dy)
        yield 0.4
        if DRAWS["n"] > n:
            R["tab_found"] = True
            break
    win.event_simulate(type="MOUSEMOVE", value="NOTHING", x=area.x + 100, y=area.y + 100)  # off the panel
    shading = area.spaces[0].shading
    shading.type, shading.color_type = "SOLID", "TEXTURE"  # textures show without EEVEE's shader compiles
    yield 1.0
    R["poll_in_panel"] = in_window(bpy.ops.conjure.texture_selected.poll)
    res = in_window(bpy.ops.conjure.texture_selected)
    log("texture_selected", res)
    R["operator"] = sorted(res)
    job_id = RUNTIME.current_job_id
    shot_taken = False
    t = time.monotonic()
    while time.monotonic() - t < 180:
        job = RUNTIME.client.jobs.get(job_id) if RUNTIME.client else None
        if job is not None and job.finished and not any(tk[0] == job_id for tk in RUNTIME.tasks):
            break
        if not shot_taken and RUNTIME.stats["previews_applied"] >= 1:
            R["preview_objects"] = sorted(o.name for o in bpy.data.objects)
            R["hidden_during"] = cube.hide_get()
            shot("texture_preview.png")
            shot_taken = True
        yield 0.1
    job = RUNTIME.client.jobs.get(job_id)
    R["job"] = {"state": job.state, "error": job.error.message if job.error else None,
                "imported": job.imported_object, "previews": RUNTIME.stats["previews_applied"]}
    yield 0.5
    cube = bpy.data.objects["Cube"]
    R["after"] = state(cube)
    R["objects_after"] = sorted(o.name for o in bpy.data.objects)
    yield 2.0
    shot("texture_done.png")
    # one undo step takes the texture away (and nothing before it)
    in_window(bpy.ops.ed.undo)
    yield 1.0
    R["after_undo"] = state(bpy.data.objects["Cube"])
    shot("texture_undone.png")
    yield 0.5


GEN = scenario()


def driver():
    try:
        return next(GEN)
    except StopIteration:
        pass
    except Exception:
        R["errors"].append(traceback.format_exc())
    R["total_s"] = time.monotonic() - T0
    R["done"] = True
    save()
    bpy.ops.wm.quit_blender()
    return None


bpy.app.timers.register(driver, first_interval=1.0)
