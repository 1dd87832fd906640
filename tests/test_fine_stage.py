"""Fine-stage pieces: clean-up, UV unwrap, bake from Gaussians, refinement loop, the stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.gaussians.cameras import orbit_cameras
from backend.mesh import rasterize_torch as rt
from backend.mesh.bake import dilate, gaussian_color_fn
from backend.mesh.cleanup import MeshCleanupError, clean_mesh, orient_faces
from backend.mesh.uv import unwrap
from backend.pipeline.events import Cancelled, JobContext, PreviewEvent, ProgressEvent
from backend.pipeline.fine import (
    normal_consistency,
    prepare_textured_mesh,
    refine,
    uniform_laplacian,
)
from backend.pipeline.presets import FineConfig


def _signed_volume(v, f):
    v = np.asarray(v, np.float64)
    return np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6.0


def test_cleanup_removes_floaters_fixes_winding_and_decimates():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    floater = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    floater.vertices += [0.0, 0.0, 0.95]
    mesh = trimesh.util.concatenate([sphere, floater])
    faces = mesh.faces.copy()
    rng = np.random.default_rng(0)
    flip = rng.random(len(faces)) < 0.3
    faces[flip] = faces[flip][:, ::-1]
    faces = faces[:, ::-1].copy()  # and everything inside-out
    # duplicate vertices (as a marching-cubes soup would have) and a degenerate face
    soup_v = mesh.vertices[faces.reshape(-1)]
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    soup_f = np.vstack([soup_f, [[0, 0, 1]]])
    clean = clean_mesh(soup_v, soup_f, face_budget=1000)
    assert clean.stats["faces_in"] == len(soup_f)
    assert len(clean.faces) <= 1000 and len(clean.faces) >= 900
    assert clean.stats["faces_components"] == len(sphere.faces)  # floater dropped
    tm = trimesh.Trimesh(clean.positions, clean.faces, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert _signed_volume(clean.positions, clean.faces) > 0.9 * (4 / 3 * np.pi * 0.8**3)
    assert np.linalg.norm(clean.positions, axis=1).max() < 0.81


def test_orient_faces_open_surface_and_errors():
    # open hemisphere (cup) with random flips: consistent, normals pointing away from the centre
    sphere = trimesh.creation.icosphere(subdivisions=3)
    keep = sphere.triangles_center[:, 2] < 0.2
    faces = sphere.faces[keep].copy()
    faces[::3] = faces[::3, ::-1]
    fixed = orient_faces(sphere.vertices, faces)
    tm = trimesh.Trimesh(sphere.vertices, fixed, process=False)
    assert tm.is_winding_consistent
    assert (np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center) > 0).mean() > 0.99
    with pytest.raises(MeshCleanupError, match="no faces"):
        clean_mesh(np.zeros((3, 3)), np.zeros((0, 3), np.int64))
    with pytest.raises(MeshCleanupError, match="NaN"):
        clean_mesh(np.full((3, 3), np.nan), np.array([[0, 1, 2]]))


def test_uv_unwrap_is_in_range_and_charts_do_not_overlap():
    mesh = trimesh.creation.icosphere(subdivisions=3)
    atlas = unwrap(mesh.vertices, mesh.faces, resolution=256, padding=2)
    assert atlas.corner_uvs.shape == (len(mesh.faces) * 3, 2)
    assert atlas.corner_uvs.min() >= 0.0 and atlas.corner_uvs.max() <= 1.0
    # vmapping ties every UV vertex to its original vertex, face order preserved
    np.testing.assert_array_equal(atlas.vmapping[atlas.uv_faces], mesh.faces)
    # non-overlap: rasterised coverage of the atlas ≈ the sum of the UV triangle areas
    uv = atlas.corner_uvs.reshape(-1, 3, 2).astype(np.float64)
    area = 0.5 * np.abs((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                        - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1])).sum()
    clip = torch.tensor(np.c_[atlas.corner_uvs * 2 - 1, np.zeros(len(atlas.corner_uvs)), np.ones(len(atlas.corner_uvs))],
                        dtype=torch.float32)
    tri = torch.arange(len(clip), dtype=torch.int32).reshape(-1, 3)
    covered = (rt.rasterize(clip, tri, (1024, 1024))[..., 3] > 0).float().mean().item()
    assert covered == pytest.approx(area, rel=0.05)
    assert 0.3 < area < 0.95


def _two_colour_gaussians(n: int = 3000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = dirs * 0.7
    colors = torch.where((means[:, 0] < 0).unsqueeze(-1), torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9]))
    quats = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)
    scales = torch.full((n, 3), 0.04)
    opacities = torch.full((n,), 0.8)
    return means, quats, scales, opacities, colors


def test_bake_from_gaussians_and_seam_dilation():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, gaussian_color_fn(*_two_colour_gaussians()),
                                 face_budget=5000, texture_resolution=64, backend="torch")
    tex = mesh.texture
    assert tex.shape == (64, 64, 3)
    assert 0.3 < mesh.info["atlas_coverage"] < 1.0
    # the texel surface points tell which side of x = 0 they are on: colours must follow
    from backend.mesh.bake import texel_surface_points

    pts, mask = texel_surface_points(mesh.positions, mesh.faces, mesh.corner_uvs, 64, backend="torch")
    left = mask & (pts[..., 0] < -0.15)
    right = mask & (pts[..., 0] > 0.15)
    assert tex[left][:, 0].mean() > 0.8 and tex[left][:, 2].mean() < 0.2
    assert tex[right][:, 2].mean() > 0.8 and tex[right][:, 0].mean() < 0.2
    # dilation: no texel keeps the zero fill; a ring next to a covered texel copies its colour
    assert tex.min() > 0.05
    t = torch.zeros(5, 5, 3)
    m = torch.zeros(5, 5, dtype=torch.bool)
    t[2, 2] = torch.tensor([0.2, 0.4, 0.6])
    m[2, 2] = True
    d = dilate(t, m, iterations=1)
    torch.testing.assert_close(d[1, 1], torch.tensor([0.2, 0.4, 0.6]))
    torch.testing.assert_close(d[0, 0], torch.tensor([0.2, 0.4, 0.6]))  # rest: mean colour fill


def test_refine_with_vertex_offsets_and_regularisers():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=32,
                                 backend="torch")
    cams = orbit_cameras([0.0, 120.0, 240.0], [15.0, 15.0, 15.0], width=32)
    target = torch.zeros(3, 3, 32, 32)
    target[:, 0] = 1.0  # red everywhere (the background stays white → the silhouette wants to grow)
    settings = FineConfig(steps=6, lr=0.1, vertex_offsets=True, lr_offsets=1e-2, offset_limit=0.03,
                          preview_every=0, rasterizer="torch")
    refine(mesh, lambda im, c, bg, r: ((im - target) ** 2).mean(), lambda s: cams, settings)
    assert mesh.offsets is not None and mesh.offsets.abs().max() > 0
    assert mesh.offsets.abs().max() <= 0.03 + 1e-6
    assert mesh.texture[..., 0].mean() > 0.55 and mesh.texture[..., 2].mean() < 0.45
    # regularisers: zero for a rigid translation / flat plane, positive for noise
    v = mesh.positions
    assert uniform_laplacian(torch.ones_like(v) * 0.3, mesh.faces).abs().max() < 1e-6
    from backend.pipeline.fine import face_adjacency

    adj = face_adjacency(mesh.faces)
    assert adj.shape[0] == len(mesh.faces) * 3 // 2
    noisy = v + 0.05 * torch.randn_like(v)
    assert normal_consistency(noisy, mesh.faces, adj) > normal_consistency(v, mesh.faces, adj)
    payload = mesh.to_payload()
    np.testing.assert_allclose(payload.positions, (mesh.positions + mesh.offsets).numpy(), atol=1e-6)
    small = mesh.to_payload(max_texture_side=16).texture_rgba  # previews: area-downsampled texture
    assert small.shape == (16, 16, 4)
    big = payload.texture_rgba[..., :3].astype(np.float64)
    np.testing.assert_allclose(small[..., :3], big.reshape(16, 2, 16, 2, 3).mean((1, 3)), atol=1.01)


def test_refine_cancels_between_steps():
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.6)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=16,
                                 backend="torch")
    cams = orbit_cameras([0.0], [0.0], width=16)
    events = []
    ctx = JobContext(out_dir=None, emit=events.append,
                     cancelled=lambda: sum(isinstance(e, ProgressEvent) for e in events) >= 2)
    with pytest.raises(Cancelled):
        refine(mesh, lambda im, c, bg, r: im.mean(), lambda s: cams, FineConfig(steps=10, preview_every=1), ctx)
    assert sum(isinstance(e, ProgressEvent) for e in events) == 2
    assert sum(isinstance(e, PreviewEvent) for e in events) == 2


def test_cleanup_fills_small_holes():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    faces = np.delete(sphere.faces, [10, 200], axis=0)  # two one-triangle holes
    assert not trimesh.Trimesh(sphere.vertices, faces, process=False).is_watertight
    clean = clean_mesh(sphere.vertices, faces)
    assert clean.stats["watertight"] and len(clean.faces) == len(sphere.faces)
    assert _signed_volume(clean.positions, clean.faces) > 0


def test_cleanup_splits_sheets_glued_along_an_edge_and_drops_a_stray_triangle():
    """What a quadric collapse now and then leaves: two closed boxes sharing one edge (four faces on it)
    and a stray triangle hanging off a box edge (three faces, two open edges). The clean mesh has two
    faces on every edge, keeps both boxes' volume, and drops the stray."""
    from backend.mesh.manifold import edge_face_counts, nonmanifold_edge_count, split_nonmanifold

    a = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b.vertices += [1.0, 1.0, 0.0]  # touches a along the vertical edge x = y = 0.5
    glued = trimesh.util.concatenate([a, b])
    glued.merge_vertices()
    assert nonmanifold_edge_count(glued.faces) == 1
    edge = np.flatnonzero(edge_face_counts(glued.faces)[1] == 4)
    assert len(edge) == 1
    # a stray triangle on an edge of box a (a new vertex out in the air)
    i, j = [int(np.flatnonzero((glued.vertices == v).all(1))[0]) for v in ([-0.5, -0.5, 0.5], [0.5, -0.5, 0.5])]
    vertices = np.vstack([glued.vertices, [[0.0, 0.0, 1.5]]])
    faces = np.vstack([glued.faces, [[i, j, len(vertices) - 1]]])
    assert nonmanifold_edge_count(faces) == 2

    positions, split_faces, n = split_nonmanifold(glued.vertices, glued.faces)
    assert n == 2 and len(positions) == len(glued.vertices) + 2
    assert np.abs(positions[: len(glued.vertices)] - glued.vertices).max() < 1e-3  # a hair, not a dent
    assert set(edge_face_counts(split_faces)[1].tolist()) == {2}
    assert len(split_faces) == len(glued.faces)
    # the stray ends as a component of its own, which clean_mesh's component filter drops
    stray_p, stray_f, stray_n = split_nonmanifold(vertices, faces)
    assert stray_n == 4 and not set(stray_f[-1].tolist()) & set(stray_f[:-1].ravel().tolist())
    assert set(edge_face_counts(stray_f[:-1])[1].tolist()) == {2}
    # faces of a manifold mesh come back untouched
    sphere = trimesh.creation.icosphere(subdivisions=2)
    same_p, same_f, none = split_nonmanifold(sphere.vertices, sphere.faces)
    assert none == 0 and np.array_equal(same_f, sphere.faces) and np.array_equal(same_p, sphere.vertices)

    clean = clean_mesh(vertices, faces, min_component_fraction=0.1)  # the stray: 1 face of 25 here, of ~5000 in a job
    assert clean.stats["nonmanifold_vertices_split"] == 2  # the glued edge's ends (trimesh drops the stray first)
    assert set(edge_face_counts(clean.faces)[1].tolist()) == {2}
    assert clean.stats["watertight"] and len(clean.faces) == len(glued.faces)  # the stray went
    assert _signed_volume(clean.positions, clean.faces) == pytest.approx(2.0, rel=1e-2)


def _extruded_profile(angles_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A strip: a polyline in the xz plane whose segments turn by ``angles_deg`` (unit segments),
    extruded one unit along y and split into two triangles per segment."""
    pts, heading = [np.zeros(2)], 0.0
    for turn in [0.0, *angles_deg]:
        heading += np.radians(turn)
        pts.append(pts[-1] + np.array([np.cos(heading), np.sin(heading)]))
    n = len(pts)
    verts = [(x, y, z) for y in (0.0, 1.0) for x, z in pts]
    faces = []
    for i in range(n - 1):
        a, b, c, d = i, i + 1, n + i, n + i + 1
        faces += [(a, b, d), (a, d, c)]
    return torch.tensor(verts, dtype=torch.float32), torch.tensor(faces, dtype=torch.int64)


def test_capped_normal_consistency_prefers_a_crease_to_a_rounded_edge():
    """The plain term rounds a 90° edge (three 30° bends cost less than one 90° bend); with a cap
    (a weak membrane) the single crease is the cheaper one, and a bend beyond the cap has no gradient."""
    from backend.pipeline.fine import face_adjacency

    sharp_v, sharp_f = _extruded_profile([90.0, 0.0, 0.0])
    round_v, round_f = _extruded_profile([30.0, 30.0, 30.0])
    adj_s, adj_r = face_adjacency(sharp_f), face_adjacency(round_f)
    assert len(adj_s) == len(adj_r)

    def cost(v, f, a, cap):
        return float(normal_consistency(v, f, a, cap=cap)) * len(a)  # summed over the pairs

    assert cost(sharp_v, sharp_f, adj_s, 0.0) > 2.0 * cost(round_v, round_f, adj_r, 0.0)  # plain: rounding wins
    assert cost(sharp_v, sharp_f, adj_s, 0.05) < 0.5 * cost(round_v, round_f, adj_r, 0.05)  # capped: the crease
    v = sharp_v.clone().requires_grad_(True)
    normal_consistency(v, sharp_f, adj_s, cap=0.05).backward()
    assert v.grad is not None and float(v.grad.abs().max()) == 0.0  # flat pairs and a capped crease: no pull
    noisy = sharp_v + 0.01 * torch.randn(sharp_v.shape, generator=torch.Generator().manual_seed(0))
    assert normal_consistency(noisy, sharp_f, adj_s, cap=0.05) > normal_consistency(sharp_v, sharp_f, adj_s, cap=0.05)
