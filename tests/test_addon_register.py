"""Register/unregister the add-on three times with bpy 5.0.1: no errors, nothing left behind
(classes, scene/window-manager properties, handlers, timers, sockets); pure helpers."""

from __future__ import annotations

import pytest

from tests.addon_support import body_main, have_bpy, run_body

pytestmark = pytest.mark.skipif(not have_bpy(), reason="bpy 5.0.1 not installed")


def _snapshot(bpy):
    from blender_addon import runtime

    return {
        "classes": sorted(n for n in dir(bpy.types) if n.startswith("CONJURE_")),
        "scene_prop": hasattr(bpy.types.Scene, "conjure"),
        "wm_prop": hasattr(bpy.types.WindowManager, "conjure_progress"),
        "load_post": sum(1 for h in bpy.app.handlers.load_post if "conjure" in repr(h).lower()
                         or getattr(h, "__module__", "").startswith("blender_addon")),
        "timer": bpy.app.timers.is_registered(runtime.pump),
        "client": runtime.RUNTIME.client is not None,
        "atexit": runtime._atexit_registered,
        "addon": "blender_addon" in bpy.context.preferences.addons,
    }


def _body_cycles(args):
    import importlib
    import os
    import tempfile
    import time

    import bpy

    addon_utils = importlib.import_module("addon_utils")
    from protocol import ConnectionInfo, write_connection_file

    before_handlers = len(bpy.app.handlers.load_post)
    conn = write_connection_file(os.path.join(tempfile.mkdtemp(), "c.json"),
                                 ConnectionInfo("tcp", "127.0.0.1", 9, b"k" * 32, "1.0"))
    cycles = []
    for _ in range(3):
        addon_utils.enable("blender_addon", default_set=True, handle_error=None)
        from blender_addon import api, runtime

        api.connect(str(conn))  # a socket towards nobody: disabling must not hang on it
        runtime.RUNTIME.process(0.01)
        on = _snapshot(bpy)
        t0 = time.perf_counter()
        addon_utils.disable("blender_addon", default_set=True, handle_error=None)
        off_seconds = time.perf_counter() - t0
        off = _snapshot(bpy)
        cycles.append({"on": on, "off": off, "off_seconds": off_seconds})
    # direct register()/unregister() (how build checks and scripts may do it) as well
    import blender_addon

    blender_addon.register()
    mid = _snapshot(bpy)
    blender_addon.unregister()
    end = _snapshot(bpy)
    return {"cycles": cycles, "mid": mid, "end": end,
            "handlers_delta": len(bpy.app.handlers.load_post) - before_handlers}


def test_register_unregister_three_times_leaves_nothing():
    r = run_body(__file__, "cycles")
    for c in r["cycles"]:
        on, off = c["on"], c["off"]
        assert "CONJURE_PT_main" in on["classes"] and "CONJURE_OT_generate" in on["classes"]
        assert on["scene_prop"] and on["wm_prop"] and on["load_post"] == 1 and on["timer"] and on["client"]
        assert on["atexit"] and on["addon"]
        assert off == {"classes": [], "scene_prop": False, "wm_prop": False, "load_post": 0, "timer": False,
                       "client": False, "atexit": False, "addon": False}
        assert c["off_seconds"] < 1.0, "closing sockets must not wait (linger 0)"
    assert r["mid"]["classes"] and r["end"]["classes"] == [] and not r["end"]["timer"]
    assert r["handlers_delta"] == 0


def _body_helpers(args):
    import bpy

    from blender_addon import properties
    from blender_addon.client import ConjureError, parse_address

    bpy.utils.register_class(properties.ConjureSettings)
    bpy.types.Scene.conjure = bpy.props.PointerProperty(type=properties.ConjureSettings)
    s = bpy.context.scene.conjure
    out = {}
    try:
        properties.settings_to_request(s)
    except ConjureError as e:
        out["empty"] = e.code
        out["empty_msg"] = e.message
    try:  # a closed-vocabulary model (the bundled prior): the hint is a prompt it can make
        properties.settings_to_request(s, vocabulary=["a", "green", "cone", "front"])
    except ConjureError as e:
        out["empty_vocab_msg"] = e.message
    out["examples"] = list(properties.example_prompts(["red", "blue", "torus", "pyramid", "a"]))
    s.prompt = "  a   wooden\tchair "
    s.random_seed = False
    s.seed = 5
    s.use_steps = True
    s.steps = 300
    s.use_texture_resolution = True
    s.texture_resolution = "2048"
    s.guidance_scale = 7.5  # not enabled: must not be sent
    s.extra_overrides = "fine.steps=200; coarse.renderer=torch; guidance.fp16=false"
    s.object_size = 2.5
    out["req"] = properties.settings_to_request(s, "draft")
    for text in ("coarse.steps=abc", "coarse.step=5", "coarse.steps=1000000000"):
        s.extra_overrides = text
        try:
            properties.settings_to_request(s)
        except ConjureError as e:
            out.setdefault("extra_errors", []).append(e.message)
    s.extra_overrides = ""
    s.random_seed = True
    out["random_seed"] = properties.settings_to_request(s)["seed"]
    out["shown_seed"] = s.seed
    out["addr"] = parse_address("tcp://10.0.0.2:5600", "ab" * 16).url
    try:
        parse_address("10.0.0.2", "ab")
    except ConjureError as e:
        out["bad_addr"] = e.code
    try:
        properties.parse_extra_overrides("oops")
    except ConjureError as e:
        out["bad_extra"] = e.code
    from blender_addon import importer

    out["names"] = [importer.object_name_for_prompt("x " * 80), importer.object_name_for_prompt("   ")]
    return out


def test_settings_become_request_with_override_table():
    r = run_body(__file__, "helpers")
    assert r["empty"] == "invalid_params"
    assert "a red cube" in r["empty_msg"]  # an example every model can make
    assert "'a green cone'" in r["empty_vocab_msg"] and r["examples"][:2] == ["a red torus", "a blue pyramid"]
    assert r["req"] == {"prompt": "a wooden chair", "negative_prompt": "", "seed": 5, "preset": "draft",
                        "overrides": {"coarse.steps": 300, "fine.texture_resolution": 2048, "fine.steps": 200,
                                      "coarse.renderer": "torch", "guidance.fp16": False, "object_size": 2.5}}
    # the shared parser's messages (protocol.params), not a raw int() error or a list of every key
    assert r["extra_errors"][0] == "coarse.steps must be a whole number, got 'abc'", r["extra_errors"]
    assert "did you mean coarse.steps" in r["extra_errors"][1] and len(r["extra_errors"][1]) < 200
    assert "between" in r["extra_errors"][2]
    assert r["random_seed"] == r["shown_seed"]
    assert r["addr"] == "tcp://10.0.0.2:5600" and r["bad_addr"] == "bad_address" and r["bad_extra"] == "invalid_params"
    assert len(r["names"][0].encode()) <= 56 and r["names"][1] == "Conjure"


def _body_nonblocking(args):
    import time

    from blender_addon.client import Client
    from protocol import ConnectionInfo

    # a DEALER towards a port nobody listens on: the pipe fills to its high-water mark, then
    # sends report EAGAIN and stay queued; nothing blocks, and closing is immediate (linger 0)
    client = Client(ConnectionInfo("tcp", "127.0.0.1", 9, b"k" * 32, "1.0"))
    t0 = time.perf_counter()
    for _ in range(3000):
        client._send("ping", {"token": "x"})
    send_s = time.perf_counter() - t0
    queued = client.flush()
    t0 = time.perf_counter()
    client.close()
    close_s = time.perf_counter() - t0
    return {"send_s": send_s, "eagain": client.stats["eagain"], "queued": queued, "close_s": close_s,
            "sent": client.stats["sent"], "state": client.state}


def test_sends_never_block_and_close_is_immediate():
    r = run_body(__file__, "nonblocking")
    assert r["eagain"] > 0 and r["queued"] > 0 and r["sent"] >= 1000
    assert r["send_s"] < 5.0 and r["close_s"] < 0.5 and r["state"] == "closed"


def _body_checked_off_thread(args):
    import threading
    import time

    import numpy as np
    import zmq

    from backend.mesh.topology import with_edges
    from blender_addon import client as client_mod
    from protocol import ConnectionInfo, Session, new_job_id
    from protocol.mesh import MeshPayload, encode_mesh

    key = b"k" * 32
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    server = Session(key, routing=True)
    client = client_mod.Client(ConnectionInfo("tcp", "127.0.0.1", port, key, "1.0"))
    routing_id = None
    deadline = time.monotonic() + 10
    while routing_id is None and time.monotonic() < deadline:
        client.poll(0.01)
        if router.poll(10):
            routing_id, hello = server.recv(router)
    job = client_mod.JobState(new_job_id(), {"prompt": "x"})
    job.state = "running"
    client.jobs[job.job_id] = job
    threads = []
    real_check = client_mod._check_message

    def spy(session, frames):
        threads.append(threading.current_thread().name)
        return real_check(session, frames)

    client_mod._check_message = spy
    n = 40_000  # a ~2 MB preview with edges
    rng = np.random.default_rng(0)
    mesh = with_edges(MeshPayload(positions=rng.random((n, 3), np.float32),
                                  faces=rng.integers(0, n, (2 * n, 3)).astype(np.uint32)))
    meta, bufs = encode_mesh(mesh)
    server.send(router, "preview_mesh", {"stage": "coarse", "step": 3, "mesh": meta}, bufs, job_id=job.job_id,
                seq=1, routing_id=routing_id)
    server.send(router, "progress", {"stage": "coarse", "step": 4, "total": 10, "fraction": 0.4,
                                     "elapsed": 1.0}, job_id=job.job_id, seq=2, routing_id=routing_id)
    order, longest = [], 0.0
    deadline = time.monotonic() + 10
    while (job.preview_mesh is None or job.step != 4) and time.monotonic() < deadline:
        t = time.perf_counter()
        client.poll(0.004)
        longest = max(longest, time.perf_counter() - t)
        if job.preview_mesh is not None and "preview" not in order:
            order.append("preview")
        if job.step == 4 and "progress" not in order:
            order.append("progress")
    got = job.preview_mesh
    client.close()
    router.close(0)
    return {"order": order, "threads": sorted(set(threads)), "faces": 0 if got is None else len(got.faces),
            "edges_equal": got is not None and bool(np.array_equal(got.edges, mesh.edges)),
            "state": client.state}


def test_received_messages_are_checked_on_the_helper_thread_and_applied_in_order():
    r = run_body(__file__, "checked_off_thread")
    assert r["threads"] and all(t.startswith("conjure-check") for t in r["threads"]), r["threads"]
    assert r["order"] == ["preview", "progress"] and r["faces"] == 80_000 and r["edges_equal"]


if __name__ == "__main__":
    body_main(globals())
