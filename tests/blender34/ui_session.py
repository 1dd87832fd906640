"""Drive the Conjure add-on inside a real Blender window (Debian's Blender 3.4 under xvfb-run).

Run by ``tests/test_addon_blender34.py`` as
``xvfb-run blender --factory-startup --enable-event-simulate --python ui_session.py``
with ``CONJURE_TEST_CONFIG`` naming a JSON file::

    {"addon": "conjure", "conn": ".../connection.json", "out": "<folder for results and shots>",
     "handshake": "<folder>", "stream": {...overrides...}, "slow": {...}, "fast": {...}}

Everything happens in ``bpy.app.timers`` callbacks (the UI keeps running): enable the add-on,
open the sidebar on the Conjure tab (clicking it with simulated events), show the states a new
user meets before any backend runs (Connect mode without a connection file, a local backend that
fails to start, waiting for a local backend), then press Generate, watch previews stream while
recording the pump's tick times and the panel's redraws, take screenshots, ask the test (through
files in ``handshake``) to pause the backend (busy, not gone), kill and restart it, and measure how
fast the panel shows the loss and recovers; then Resubmit, Cancel, and History with thumbnails.
Every state gets a screenshot. Results go to ``out/result.json``.
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
HS = CFG["handshake"]
R = {"events": [], "errors": []}
T0 = time.monotonic()

bpy.context.preferences.view.show_splash = False  # read before the splash would open


def log(*a):
    R["events"].append(["%.2f" % (time.monotonic() - T0)] + [str(x) for x in a])
    print("[ui_session %.2f]" % (time.monotonic() - T0), *a, flush=True)


def save():
    with open(os.path.join(OUT, "result.json.tmp"), "w") as f:
        json.dump(R, f, indent=1)
    os.replace(os.path.join(OUT, "result.json.tmp"), os.path.join(OUT, "result.json"))


mod = addon_utils.enable(CFG["addon"], default_set=True, handle_error=None)
if mod is None:
    R["errors"].append("add-on {} did not enable (sys.path {}, env {})".format(
        CFG["addon"], sys.path, {k: v for k, v in os.environ.items() if "PYTHON" in k}))
    save()
    bpy.ops.wm.quit_blender()
pkg = mod.__name__
runtime = sys.modules[pkg + ".runtime"]
panel = sys.modules[pkg + ".panel"]
RUNTIME = runtime.RUNTIME
prefs = bpy.context.preferences.addons[pkg].preferences
prefs.mode = "CONNECT"
prefs.connect_with = "FILE"
prefs.connection_file = CFG["conn"]
R["addon_file"] = mod.__file__
R["has_progress_api"] = panel.HAS_PROGRESS

# count panel redraws (and what they showed) without touching the add-on's code
DRAWS = {"n": 0, "error_seen_at": None, "connected_seen_at": None, "kinds": set()}
_orig_draw = panel.CONJURE_PT_main.draw


def counting_draw(self, context):
    DRAWS["n"] += 1
    status = RUNTIME.status()
    now = time.monotonic()
    DRAWS["kinds"].add(status.kind)
    if status.problem and DRAWS["error_seen_at"] is None:
        DRAWS["error_seen_at"] = now
    if status.kind == "connected":
        DRAWS["connected_seen_at"] = now
    _orig_draw(self, context)


panel.CONJURE_PT_main.draw = counting_draw

# show the Advanced and History sub-panels open (they start folded) so the screenshots hold them
for cls in (panel.CONJURE_PT_advanced, panel.CONJURE_PT_history):
    bpy.utils.unregister_class(cls)
    cls.bl_options = set()
    bpy.utils.register_class(cls)


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
    R.setdefault("screenshots", []).append(path)
    log("screenshot", path)


def scroll_sidebar(down):
    """Scroll the sidebar (to show the History sub-panel below the fold), or back to the top."""
    win, area, region = window_area()
    with bpy.context.temp_override(window=win, area=area, region=region):
        for _ in range(40):
            if down:
                bpy.ops.view2d.scroll_down(deltay=40)
            else:
                bpy.ops.view2d.scroll_up(deltay=40)
    region.tag_redraw()


def click(win, x, y):
    win.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
    win.event_simulate(type="LEFTMOUSE", value="PRESS", x=x, y=y)
    win.event_simulate(type="LEFTMOUSE", value="RELEASE", x=x, y=y)


def wait_file(name):
    return os.path.exists(os.path.join(HS, name))


def touch(name):
    open(os.path.join(HS, name), "w").close()
    log("handshake", name, "pump ticks so far", RUNTIME.stats["ticks"])


def operator(idname, **kw):
    """Run ``conjure.<idname>`` as the panel's button would; an operator that reports an error
    (which Python sees as RuntimeError) is logged, as the user would see it in the status bar."""
    win, area, region = window_area()
    with bpy.context.temp_override(window=win, area=area, region=region):
        try:
            return getattr(bpy.ops.conjure, idname)(**kw)
        except RuntimeError as e:
            log("operator", idname, "reported", e)
            return {"CANCELLED"}


def scenario():
    """A generator: each ``yield x`` waits x seconds (the timer's interval)."""
    yield 1.0
    win, area, region = window_area()
    area.spaces[0].show_region_ui = True
    area.tag_redraw()
    yield 1.0
    # open the Conjure tab: click down the tab column until our panel draws
    win, area, region = window_area()
    x = region.x + region.width - 9
    top = region.y + region.height
    found = False
    for dy in range(120, 420, 12):
        n = DRAWS["n"]
        click(win, x, top - dy)
        yield 0.4
        if DRAWS["n"] > n:
            found = True
            log("conjure tab at", x, top - dy)
            break
    R["tab_found"] = found
    # rest the mouse in the viewport, away from the sidebar (no tooltips over the panel)
    win.event_simulate(type="MOUSEMOVE", value="NOTHING", x=max(5, region.x - 400), y=region.y + 300)
    # software OpenGL compiles shaders during the first redraws and the loop crawls meanwhile:
    # wait until the UI loop runs at >= 20 Hz before measuring anything
    t = time.monotonic()
    while time.monotonic() - t < 120:
        t1 = time.monotonic()
        for _ in range(10):
            yield 0.0
        if time.monotonic() - t1 < 0.5:
            break
    R["warmup_s"] = time.monotonic() - t
    log("warm after", R["warmup_s"])

    s = bpy.context.scene.conjure
    # --- 0. before any backend runs --------------------------------------------------------------
    # Connect mode, no connection file: the panel says how to start one
    prefs.connection_file = os.path.join(HS, "no-such-connection.json")
    operator("backend_status")
    yield 1.0
    R["no_file"] = list(RUNTIME.status())
    shot("blender34_no_connection_file.png")
    operator("dismiss")
    # a local backend that fails to start: its log's last meaningful line and what to do
    prefs.mode = "LOCAL"
    prefs.python_path = CFG["python"]
    prefs.data_dir = os.path.join(HS, "local")
    prefs.device = "cpu"
    prefs.backend_args = "--no-such-flag"
    operator("start_backend")
    t = time.monotonic()
    while RUNTIME.status().kind != "start_failed" and time.monotonic() - t < 60:
        yield 0.2
    st = RUNTIME.status()
    R["start_failed"] = [st.kind, st.text, st.hint]
    yield 0.5
    shot("blender34_start_failed.png")
    RUNTIME.stop_backend()
    # Generate with no backend: the local one starts, the job waits for it
    prefs.backend_args = "--pipeline tests.fake_pipeline:run_job"
    os.environ["PYTHONPATH"] = CFG["repo"]  # for the child only: the fake pipeline lives in the repo
    s.prompt = "a red cube"
    s.extra_overrides = CFG["fast"]
    operator("generate")
    R["pending"] = RUNTIME.pending_request is not None
    yield 1.0
    shot("blender34_waiting.png")
    t = time.monotonic()
    while (RUNTIME.current_job() is None or RUNTIME.current_job().imported_object is None) \
            and time.monotonic() - t < 120:
        yield 0.2
    job0 = RUNTIME.current_job()
    R["job0"] = {"state": job0.state if job0 else None, "object": job0.imported_object if job0 else None}
    RUNTIME.drop_client()
    RUNTIME.stop_backend()
    prefs.mode = "CONNECT"
    prefs.connection_file = CFG["conn"]

    s.prompt = "a glowing crystal orb"
    s.random_seed = False
    s.seed = 1234
    s.extra_overrides = CFG["stream"] + "; test.warning=the model does not know the words glowing, crystal, orb"
    bpy.context.scene.cursor.location = (1.0, -1.0, 0.5)
    # wait for the connection (the client connects on first use; Check Backend makes it now)
    operator("backend_status")
    t = time.monotonic()
    while RUNTIME.client is None or RUNTIME.client.state != "connected":
        if time.monotonic() - t > 20:
            R["errors"].append(f"never connected: {RUNTIME.status()}")
            return
        yield 0.1
    s.preset = "draft"  # the menu lists the backend's presets once connected
    R["header"] = RUNTIME.status().text
    yield 0.5
    shot("blender34_ready.png")
    s.show_vocabulary = False  # folded to one line from here on, so the job box stays in view

    # --- 1. a job whose previews stream while the UI redraws -----------------------------
    RUNTIME.tick_seconds.clear()
    RUNTIME.tick_cpu_seconds.clear()
    gaps0 = len(LOOP["gaps"])
    draws0 = DRAWS["n"]
    res = operator("generate")
    job = RUNTIME.current_job()
    log("generate", res, job.job_id if job else None, "pump ticks so far", RUNTIME.stats["ticks"])
    took_progress_shot = False
    t = time.monotonic()
    while job.imported_object is None:
        if time.monotonic() - t > 90:
            R["errors"].append(f"job 1 did not finish: {job.status_line()}")
            break
        if job.state == "running" and job.stage == "coarse":
            R["progress_line"] = [job.status_line(), job.time_line(), job.overall]  # the last one seen
        if not took_progress_shot and RUNTIME.stats["previews_applied"] >= 1 and job.state == "running" \
                and job.step >= 10:
            shot("blender34_progress.png")
            took_progress_shot = True
        yield 0.05
    ticks = sorted(RUNTIME.tick_seconds)
    cpu = sorted(RUNTIME.tick_cpu_seconds)
    gaps = sorted(g[1] for g in LOOP["gaps"][gaps0:]) or [0.0]
    n = len(ticks)
    R["job1"] = {
        "state": job.state, "object": job.imported_object, "previews_received": job.previews_received,
        "previews_applied": RUNTIME.stats["previews_applied"], "draws": DRAWS["n"] - draws0,
        "ticks": n, "tick_p50_ms": ticks[n // 2] * 1e3 if n else None,
        "tick_p99_ms": ticks[min(n - 1, int(0.99 * n))] * 1e3 if n else None,
        "tick_max_ms": ticks[-1] * 1e3 if n else None, "seconds": time.monotonic() - t,
        "tick_cpu_p99_ms": cpu[min(n - 1, int(0.99 * n))] * 1e3 if n else None,
        "loop_gap_median_s": gaps[len(gaps) // 2], "loop_gap_p90_s": gaps[int(0.9 * len(gaps))],
    }
    obj = bpy.data.objects.get(job.imported_object or "")
    if obj is not None:
        R["job1"].update({
            "location": list(obj.location), "faces": len(obj.data.polygons),
            "selected": obj.select_get(), "active": bpy.context.view_layer.objects.active == obj,
            "prop_job": obj.get("conjure_job_id"), "prop_seed": obj.get("conjure_seed"),
            "prop_warnings": list(obj.get("conjure_warnings") or []), "prop_preset": obj.get("conjure_preset"),
            "prop_model": obj.get("conjure_model"), "prop_device": obj.get("conjure_device"),
            "min_z": min(v.co.z for v in obj.data.vertices),
            "objects": sorted(o.name for o in bpy.data.objects),
            "meshes": len(bpy.data.meshes),
        })
    R["job1"]["warnings_shown"] = list(job.warnings)
    yield 0.5
    shot("blender34_done.png")

    # --- 1b. a busy backend (its process paused, connection open): "busy", never "lost" -----------
    touch("stop")
    while not wait_file("stopped"):
        yield 0.02
    DRAWS["kinds"] = set()
    t = time.monotonic()
    while time.monotonic() - t < 5.0:
        yield 0.1
        if RUNTIME.status().kind == "slow" and "busy_shot" not in R:
            R["busy_shot"] = True
            yield 0.3
            shot("blender34_busy.png")
    R["busy_kinds"] = sorted(DRAWS["kinds"])
    touch("cont")
    while not wait_file("continued"):
        yield 0.02
    t = time.monotonic()
    while RUNTIME.status().kind != "connected" and time.monotonic() - t < 10:
        yield 0.1

    # --- 2. backend killed mid-job: the panel shows it within 3 s, then recovers -------------
    s.prompt = "a slow stone tower"
    s.extra_overrides = CFG["slow"]
    operator("generate")
    job2 = RUNTIME.current_job()
    t = time.monotonic()
    while job2.state != "running" and time.monotonic() - t < 20:
        yield 0.05
    touch("kill")
    while not wait_file("killed"):
        yield 0.02
    t_kill = time.monotonic()
    DRAWS["error_seen_at"] = None
    while DRAWS["error_seen_at"] is None and time.monotonic() - t_kill < 30:
        yield 0.05
    R["loss_shown_s"] = (DRAWS["error_seen_at"] - t_kill) if DRAWS["error_seen_at"] else None
    R["loss_status"] = list(RUNTIME.status())
    c = RUNTIME.client
    R["loss_debug"] = {"tcp_connected": c.tcp_connected, "monitor": c._monitor is not None, "state": c.state,
                       "trace": [list(t) for t in c.trace if t[0] not in ("pong", "progress")][-12:]}
    yield 0.3
    shot("blender34_lost.png")
    touch("restart")
    while not wait_file("restarted"):
        yield 0.05
    t_back = time.monotonic()
    DRAWS["connected_seen_at"] = None
    while (DRAWS["connected_seen_at"] is None or not job2.finished) and time.monotonic() - t_back < 20:
        yield 0.05
    R["recovered_s"] = (DRAWS["connected_seen_at"] - t_back) if DRAWS["connected_seen_at"] else None
    R["job2"] = {"state": job2.state, "error": job2.error.code if job2.error else None,
                 "message": job2.error.message if job2.error else None}
    yield 0.3
    shot("blender34_interrupted.png")
    # Resubmit: the same settings (made short here), a new job id
    RUNTIME.requests[job2.job_id]["overrides"] = dict(RUNTIME.requests[job2.job_id]["overrides"],
                                                      **{"test.steps": 6, "test.step_seconds": 0.02})
    operator("resubmit")
    job2b = RUNTIME.current_job()
    t = time.monotonic()
    while job2b.imported_object is None and not (job2b.finished and job2b.state != "done") \
            and time.monotonic() - t < 60:
        yield 0.1
    R["resubmit"] = {"new_id": job2b.job_id != job2.job_id, "state": job2b.state, "object": job2b.imported_object,
                     "seed": job2b.params.get("seed")}

    # --- 2b. cancel: "Cancelling…" then "Cancelled", neutral ----------------------------------------
    s.prompt = "a blue torus"
    s.extra_overrides = CFG["slow"]
    operator("generate")
    job_c = RUNTIME.current_job()
    t = time.monotonic()
    while job_c.state != "running" and time.monotonic() - t < 20:
        yield 0.05
    operator("cancel")
    R["cancel_lines"] = [job_c.status_line()]
    yield 0.05
    shot("blender34_cancelling.png")
    t = time.monotonic()
    while not job_c.finished and time.monotonic() - t < 20:
        yield 0.05
    R["cancel_lines"].append(job_c.status_line())
    R["cancel_state"] = job_c.state
    yield 0.5
    shot("blender34_cancelled.png")

    # --- 3. and it works again ---------------------------------------------------------------
    s.prompt = "a small wooden stool"
    s.extra_overrides = CFG["fast"]
    bpy.context.scene.cursor.location = (-1.5, 0.0, 0.0)
    operator("generate")
    job3 = RUNTIME.current_job()
    t = time.monotonic()
    while job3.imported_object is None and time.monotonic() - t < 60:
        if job3.finished and job3.state != "done":
            break
        yield 0.05
    R["job3"] = {"state": job3.state, "object": job3.imported_object,
                 "error": job3.error.message if job3.error else None}
    # history panel: open it and let it load
    bpy.ops.conjure.refresh_history()
    t = time.monotonic()

    def job3_listed():  # the reply to this refresh, not a list the panel fetched before job 3 ended
        return any(h.get("job_id") == job3.job_id and h.get("state") == "done"
                   for h in RUNTIME.client.history or [])

    asked = t
    while not job3_listed() and time.monotonic() - t < 20:
        yield 0.1
        if time.monotonic() - asked > 5:  # ask again if the reply is slow or predates the job's end
            bpy.ops.conjure.refresh_history()
            asked = time.monotonic()
    R["job3_listed"] = job3_listed()
    thumbs = sys.modules[pkg + ".thumbnails"]
    t = time.monotonic()
    while time.monotonic() - t < 45:  # the panel fetches the thumbnails as it draws them (slow UI loop)
        hist = RUNTIME.client.history or []
        if hist and all(thumbs.loaded(h["job_id"]) for h in hist if h.get("thumbnail")):
            break
        yield 0.2
    hist = RUNTIME.client.history or []
    R["history"] = [(h.get("prompt"), h.get("state")) for h in hist]
    R["history_items"] = [{k: h.get(k) for k in ("prompt", "created", "duration_s", "thumbnail")} for h in hist]
    R["thumbs_loaded"] = sum(1 for h in hist if thumbs.loaded(h["job_id"]))
    yield 1.0
    shot("blender34_final.png")
    scroll_sidebar(True)
    yield 1.0
    shot("blender34_history.png")
    scroll_sidebar(False)
    # delete the cancelled job from the history
    victim = next((h["job_id"] for h in hist if h.get("state") == "cancelled"), None)
    if victim:
        RUNTIME.client.delete_job(victim)
        t = time.monotonic()
        while any(h["job_id"] == victim for h in RUNTIME.client.history or []) and time.monotonic() - t < 10:
            yield 0.1
        R["deleted"] = not any(h["job_id"] == victim for h in RUNTIME.client.history or [])
    R["objects_end"] = sorted(o.name for o in bpy.data.objects)


GEN = scenario()
LOOP = {"last": None, "gaps": []}


def loop_probe():
    """Records the UI loop's iteration gaps (a stalled loop shows up here, not in pump ticks)."""
    now = time.monotonic()
    if LOOP["last"] is not None:
        LOOP["gaps"].append((round(now - T0, 2), round(now - LOOP["last"], 3)))
    LOOP["last"] = now
    return 0.0 if not R.get("done") else None


bpy.app.timers.register(loop_probe, first_interval=1.0)


def driver():
    try:
        delay = next(GEN)
        return delay
    except StopIteration:
        pass
    except Exception:
        R["errors"].append(traceback.format_exc())
    R["total_s"] = time.monotonic() - T0
    R["loop_stalls"] = [g for g in LOOP["gaps"] if g[1] > 0.2]
    R["done"] = True
    save()
    bpy.ops.wm.quit_blender()
    return None


bpy.app.timers.register(driver, first_interval=1.0)
