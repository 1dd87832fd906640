"""Whole pipeline on the CPU with a tiny random latent model: coarse → fine → GLB via run_job."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from backend.mesh.export import split_seams
from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent
from protocol.params import GenerationParams
from tests.glb_check import check_glb_structure


@pytest.mark.slow
def test_run_job_coarse_then_fine_writes_textured_glb(tmp_path, tiny_models):
    from backend.pipeline.run import run_job
    model = tiny_models["latent"]
    out = tmp_path / "job"
    out.mkdir()
    overrides = {
        "guidance.model": str(model), "guidance.fp16": False,
        "coarse.steps": 6, "coarse.num_points": 400, "coarse.render_resolution": 32,
        "coarse.render_resolution_end": 32, "coarse.preview_every": 0, "coarse.mesh_grid": 32,
        "coarse.mesh_faces": 2000,
        "fine.steps": 3, "fine.render_resolution": 32, "fine.texture_resolution": 64,
        "fine.grid_resolution": 40, "fine.face_budget": 1500,
    }
    events = []
    ctx = JobContext(out_dir=out, emit=events.append)
    result = run_job(GenerationParams(prompt="a red ball", seed=7, preset="cpu", overrides=overrides), ctx)

    stages = [e.stage for e in events if isinstance(e, ProgressEvent)]
    assert stages.index("coarse") < stages.index("fine") < stages.index("export")
    assert any(isinstance(e, PreviewEvent) and e.stage == "fine" for e in events)
    mesh = result.mesh
    assert mesh.uvs is not None and mesh.texture_rgba is not None
    assert mesh.uvs.min() >= 0 and mesh.uvs.max() <= 1
    assert set(result.files) >= {"glb", "obj", "mtl", "png"}
    assert (out / "coarse.glb").exists()  # the job folder keeps both stages' meshes
    check_glb_structure(out / "coarse.glb")
    check_glb_structure(result.files["glb"])
    source, _, _ = split_seams(np.asarray(mesh.faces, np.int64), mesh.uvs)
    geom = list(trimesh.load(result.files["glb"], process=False).geometry.values())[0]
    assert len(geom.vertices) == len(source)
    assert len(geom.faces) == len(mesh.faces)
    uv = np.asarray(geom.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    assert geom.visual.material.baseColorTexture.size == (64, 64)
    # object_size: the largest dimension is preset.object_size (1 m), converted to Y up in the file
    ext = geom.vertices.max(0) - geom.vertices.min(0)
    assert ext.max() == pytest.approx(1.0, rel=1e-3)
