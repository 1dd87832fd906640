"""DreamFusion's learned environment background (``backend/pipeline/background.py``) and the fine
stage's random background augmentation."""

from __future__ import annotations

import pytest
import torch

from backend.gaussians.cameras import orbit_cameras
from backend.pipeline.background import (
    EnvironmentBackground,
    composite_backgrounds,
    ray_directions,
    view_backgrounds,
)
from backend.pipeline.coarse import run_coarse_stage
from backend.pipeline.presets import CoarseConfig, get_preset


def _cams(az, el, res=9):
    n = len(az)
    return orbit_cameras(torch.tensor(az, dtype=torch.float32), torch.tensor(el, dtype=torch.float32),
                         torch.full((n,), 3.0), torch.full((n,), 50.0), res)


def test_the_centre_ray_points_from_the_camera_to_the_origin_and_corners_spread_by_the_fov():
    cams = _cams([0.0, 90.0, 200.0], [0.0, 30.0, -10.0])
    d = ray_directions(cams)
    assert d.shape == (3, 9, 9, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, 9, 9), atol=1e-5)
    to_origin = torch.nn.functional.normalize(-cams.camera_centers(), dim=-1)
    assert torch.allclose(d[:, 4, 4], to_origin, atol=1e-5)  # pixel (4, 4) is the centre of a 9 × 9 image
    # the top row looks further up (world +Z) than the bottom row
    assert bool((d[:, 0, 4, 2] > d[:, 8, 4, 2]).all())
    # opposite corner pixels of a 50° fov: each 8/9 of the half diagonal out, tan = tan(25°)·√2·8/9
    half = torch.atan(torch.tan(torch.deg2rad(torch.tensor(25.0))) * 2 ** 0.5 * 8 / 9)
    cos = (d[:, 0, 0] * d[:, 8, 8]).sum(-1)
    assert torch.allclose(cos, torch.cos(2 * half).expand(3), atol=1e-4)


def test_environment_background_depends_on_the_ray_direction_and_learns_a_colour():
    env = EnvironmentBackground(height=4, width=8, init=0.5)
    front, back = _cams([0.0], [0.0]), _cams([180.0], [0.0])
    assert torch.allclose(env(front), torch.full((1, 3, 9, 9), 0.5), atol=1e-6)
    opt = torch.optim.Adam(env.parameters(), lr=0.1)
    target = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    for _ in range(150):  # the front view's background becomes red; the view from behind keeps most of its grey
        opt.zero_grad()
        (env(front) - target).square().mean().backward()
        opt.step()
    assert torch.allclose(env(front).mean(dim=(2, 3)), target.view(1, 3), atol=0.05)
    assert (env(back).mean(dim=(2, 3)) - 0.5).abs().max() < 0.2
    with pytest.raises(ValueError, match="at least 1"):
        EnvironmentBackground(height=0)


def test_composite_puts_the_background_only_where_the_object_is_not():
    prem = torch.zeros(2, 3, 4, 4)
    alpha = torch.zeros(2, 1, 4, 4)
    prem[:, :, 1:3, 1:3] = 0.3
    alpha[:, :, 1:3, 1:3] = 1.0
    env = torch.full((2, 3, 4, 4), 0.8)
    img, bg = composite_backgrounds(prem, alpha, env, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
                                    torch.tensor([True, False]))
    assert torch.allclose(img[:, :, 1:3, 1:3], torch.full((2, 3, 2, 2), 0.3))
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # the random colour
    assert torch.allclose(img[1, :, 0, 0], torch.full((3,), 0.8))  # the learned environment
    assert bg.shape == (2, 3, 4, 4)


def test_coarse_stage_with_a_learned_background_optimises_it_and_the_gaussians():
    """A photometric loss toward a blue backdrop: the learned background turns blue (it, not the
    Gaussians, explains the backdrop), and the stage runs end to end with shading."""
    from backend.pipeline.presets import ShadingConfig

    cfg = CoarseConfig(steps=20, batch_size=2, num_points=150, render_resolution=12, render_resolution_end=12,
                       preview_every=0, densify_from=2.0, renderer="torch", background="learned",
                       random_bg_prob=0.0, lr_background=0.2)
    seen = []

    def loss(images, cams, bgs, ratio):
        seen.append(bgs.detach().clone())
        assert bgs.shape == (len(cams), 3)
        return (images[:, 2] - 1.0).square().mean() + images[:, :2].square().mean()

    res = run_coarse_stage(loss, cfg, generator=torch.Generator().manual_seed(0), shading=ShadingConfig(coarse=True))
    assert len(res.gaussians) > 0
    first, last = seen[0].mean(0), seen[-1].mean(0)
    assert first[2] == pytest.approx(0.5, abs=0.05) and last[2] > 0.8 and last[0] < 0.3
    with pytest.raises(ValueError, match="coarse.background"):
        run_coarse_stage(loss, CoarseConfig(steps=1, background="sky"))
    with pytest.raises(ValueError, match="coarse.background"):
        get_preset("cpu", {"coarse.background": "sky"})


def test_fine_view_backgrounds_mix_random_colours_with_the_grey():
    g = torch.Generator().manual_seed(0)
    plain = view_backgrounds(6, 1.0, 0.0, g, "cpu")
    assert torch.equal(plain, torch.ones(6, 3))
    mixed = view_backgrounds(400, 1.0, 0.5, g, "cpu")
    random_rows = (mixed != 1.0).any(dim=1).float().mean()
    assert 0.4 < float(random_rows) < 0.6
