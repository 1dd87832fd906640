"""Reference texture recovery: a known textured cube, target views by analytic ray casting.

The targets never touch the rasteriser: each pixel's ray (from the camera's OpenCV K and
world→camera matrix) is intersected with the box analytically (slab method) and coloured by a
known smooth colour field on the surface. Starting from a flat texture, the fine stage's
refinement loop (``backend.pipeline.fine.refine``) with an image loss must reach ≥ 25 dB PSNR
on held-out views. The same colour field baked directly (``bake_texture``) is checked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.gaussians.cameras import Cameras, orbit_cameras
from backend.mesh.bake import bake_texture
from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent
from backend.pipeline.fine import prepare_textured_mesh, refine
from backend.pipeline.presets import FineConfig

HALF = 0.6
RES = 64
TEX = 64


def colour_field(p: torch.Tensor) -> torch.Tensor:
    """(P, 3) world points → (P, 3) colours in [0.1, 0.9]: smooth, different per channel."""
    x, y, z = p.unbind(-1)
    return torch.stack([
        0.5 + 0.4 * torch.sin(3.0 * x + 2.0 * y),
        0.5 + 0.4 * torch.cos(2.0 * y - 3.0 * z + 0.5),
        0.5 + 0.4 * torch.sin(2.5 * z + 1.5 * x + 1.0),
    ], dim=-1)


def analytic_render(cams: Cameras, background: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast the axis-aligned box [-HALF, HALF]^3: (B, 3, H, W) images and (B, 1, H, W) masks."""
    B, H, W = len(cams), cams.height, cams.width
    ii, jj = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                            indexing="ij")
    images, masks = [], []
    for b in range(B):
        K = cams.Ks[b].double()
        R = cams.viewmats[b, :3, :3].double()
        t = cams.viewmats[b, :3, 3].double()
        origin = -(R.T @ t)
        d_cam = torch.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], torch.ones_like(ii)], -1)
        d = d_cam.reshape(-1, 3) @ R  # rows: R^T d_cam
        inv = 1.0 / d  # inf along axis-parallel rays: the slab test handles it
        t1 = (-HALF - origin) * inv
        t2 = (HALF - origin) * inv
        tmin = torch.minimum(t1, t2).max(-1).values
        tmax = torch.maximum(t1, t2).min(-1).values
        hit = (tmax >= tmin) & (tmax > 0)
        p = origin + tmin.unsqueeze(-1) * d
        col = colour_field(p.float()).clamp(0, 1)
        img = torch.where(hit.unsqueeze(-1), col, torch.full_like(col, background))
        images.append(img.reshape(H, W, 3).permute(2, 0, 1))
        masks.append(hit.reshape(1, H, W).float())
    return torch.stack(images), torch.stack(masks)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.expand_as(a) > 0
    mse = ((a - b)[m] ** 2).mean().item()
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


def _cube_mesh():
    box = trimesh.creation.box(extents=(2 * HALF,) * 3).subdivide().subdivide()
    return prepare_textured_mesh(box.vertices, box.faces, None, face_budget=10_000, texture_resolution=TEX,
                                 uv_padding=2, backend="torch")


TRAIN_AZ = [0, 45, 90, 135, 180, 225, 270, 315] * 2
TRAIN_EL = [30] * 8 + [-20] * 8
TEST_AZ = [20, 110, 200, 300]
TEST_EL = [10, 40, -10, 25]


def test_analytic_renderer_agrees_with_rasteriser_silhouette():
    mesh = _cube_mesh()
    cams = orbit_cameras(TEST_AZ, TEST_EL, width=RES)
    _, mask = analytic_render(cams)
    alpha = mesh.render(cams, backend="torch").alpha
    assert (mask != alpha).float().mean().item() < 0.005


def test_baked_texture_reproduces_colour_field():
    mesh = _cube_mesh()
    tex, cover = bake_texture(mesh.positions, mesh.faces, mesh.corner_uvs, colour_field, TEX, backend="torch")
    assert 0.3 < cover.float().mean().item() <= 1.0
    cams = orbit_cameras(TEST_AZ, TEST_EL, width=RES)
    target, mask = analytic_render(cams)
    img = mesh.render(cams, texture=tex, backend="torch").image
    assert psnr(img, target, mask) >= 28.0


@pytest.mark.slow
def test_refinement_recovers_known_texture_from_flat_start():
    torch.manual_seed(0)
    mesh = _cube_mesh()
    train = orbit_cameras(TRAIN_AZ, TRAIN_EL, width=RES)
    train_img, _ = analytic_render(train)
    test = orbit_cameras(TEST_AZ, TEST_EL, width=RES)
    test_img, test_mask = analytic_render(test)
    start = psnr(mesh.render(test, backend="torch").image, test_img, test_mask)

    batch = 4

    def camera_fn(step: int) -> Cameras:
        idx = torch.tensor([(step * batch + k) % len(TRAIN_AZ) for k in range(batch)])
        return Cameras(train.viewmats[idx], train.Ks[idx], RES, RES, train.azimuth_deg[idx],
                       train.elevation_deg[idx], train.distance[idx])

    lookup = {round(float(a), 3): i for i, a in enumerate(train.azimuth_deg * 1000 + train.elevation_deg)}

    def loss_fn(images, cams, backgrounds, step_ratio):
        idx = [lookup[round(float(a), 3)] for a in cams.azimuth_deg * 1000 + cams.elevation_deg]
        return ((images - train_img[idx]) ** 2).mean()

    events = []
    ctx = JobContext(out_dir=None, emit=events.append)
    steps = 80
    refine(mesh, loss_fn, camera_fn, FineConfig(steps=steps, lr=0.05, preview_every=40, rasterizer="torch"), ctx)
    end = psnr(mesh.render(test, backend="torch").image, test_img, test_mask)
    print(f"held-out PSNR: start {start:.2f} dB -> end {end:.2f} dB")
    assert start < 15.0
    assert end >= 25.0
    assert mesh.info["loss"][-1] < mesh.info["loss"][0] / 10
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [e.step for e in progress] == list(range(1, steps + 1))
    assert [e.step for e in previews] == [40, 80] and all(e.stage == "fine" for e in previews)
    payload = previews[-1].mesh
    assert payload.texture_rgba.shape == (TEX, TEX, 4) and payload.uvs.shape == (len(payload.faces) * 3, 2)
