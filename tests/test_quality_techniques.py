"""Issue 12's pipeline techniques: DreamFusion shading, DreamTime schedule, StableDreamer x0 form,
the fine stage's own timestep range, the texel TV prior, the Gaussian regularisers and Magic3D's
vertex offsets."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from backend.gaussians.cameras import orbit_cameras
from backend.gaussians.model import GaussianModel
from backend.pipeline.coarse import binary_entropy, run_coarse_stage
from backend.pipeline.fine import prepare_textured_mesh, refine, texture_tv
from backend.pipeline.presets import CoarseConfig, FineConfig, GuidanceConfig, ShadingConfig, get_preset
from backend.pipeline.shading import (
    ALBEDO,
    LIT,
    TEXTURELESS,
    ShadingDraw,
    apply_shading,
    depth_normals,
    face_normals_image,
    normal_smoothness,
    sample_shading,
)
from backend.schedule import dreamtime_prior, dreamtime_timestep
from protocol.errors import ProtocolError


def _sphere_mesh(res=32):
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    return prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=res,
                                 backend="torch")


def test_mesh_face_normals_face_the_camera_and_shading_scales_the_albedo_gradient():
    mesh = _sphere_mesh()
    cams = orbit_cameras([0.0], [0.0], 3.0, 40.0, width=32)
    tex = torch.full_like(mesh.texture, 0.5).requires_grad_(True)
    out = mesh.render(cams, background=1.0, backend="torch", texture=tex)
    n = face_normals_image(mesh.positions, mesh.faces, out.rast, cams)
    centre = n[0, :, 16, 16]
    assert centre[1] < -0.9  # camera at -Y: the visible normal points at it
    light_up = ShadingDraw(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([LIT]))
    bg = torch.ones(1, 3)
    lit = apply_shading(out.image, out.alpha, bg, n, light_up, 0.2, 0.8)
    top, bottom = lit[0, 0, 10, 16], lit[0, 0, 22, 16]
    assert top > bottom + 0.1  # lit from above: the upper half is brighter
    assert float(lit[0, 0, 0, 0].detach()) == pytest.approx(1.0)  # the background is never shaded
    # the albedo gradient is scaled by the shade (DreamFusion: colour becomes albedo)
    g_lit = torch.autograd.grad(lit.sum(), tex, retain_graph=True)[0]
    alb = apply_shading(out.image, out.alpha, bg, n, ShadingDraw(light_up.lights, torch.tensor([ALBEDO])), 0.2, 0.8)
    g_alb = torch.autograd.grad(alb.sum(), tex, retain_graph=True)[0]
    assert g_alb.sum() > 0 and g_lit.sum() < 0.9 * g_alb.sum()
    tl = apply_shading(out.image, out.alpha, bg, n, ShadingDraw(light_up.lights, torch.tensor([TEXTURELESS])), 0.2, 0.8)
    assert float(tl[0, :, 10, 16].std()) < 1e-6 and float(tl[0, 0, 10, 16]) > 0.3  # white albedo: grey shade only
    assert torch.autograd.grad(tl.sum(), tex)[0].abs().sum() == 0  # shading only: no albedo gradient


def test_depth_normals_of_gaussians_follow_the_surface_and_move_the_means():
    gen = torch.Generator().manual_seed(0)
    m = GaussianModel.init_random(2500, 0.6, "shell", 0.04, 0.9, gen, "cpu")
    cams = orbit_cameras([0.0, 90.0], [0.0, 30.0], 3.0, 49.0, width=48)
    out = m.render(cams, torch.ones(3), backend="torch")
    n = depth_normals(out.depth, out.alpha, cams)
    assert torch.allclose(n.norm(dim=1)[out.alpha[:, 0] > 0.5], torch.ones(1), atol=1e-4)
    assert n[0, 1, 24, 24] < -0.8  # front view: normal towards -Y
    rows = torch.nonzero(out.alpha[0, 0, :, 24] > 0.5).squeeze(1)
    top, bottom = int(rows.min()) + 3, int(rows.max()) - 3
    assert float(n[0, 2, top, 24]) > 0.3 and float(n[0, 2, bottom, 24]) < -0.3  # upper part tilts up, lower down
    assert n[1, 0, 24, 24] > 0.5  # right view (camera at +X)
    draw = ShadingDraw(torch.tensor([[0.0, -1.0, 0.0], [0.0, -1.0, 0.0]]), torch.tensor([LIT, LIT]))
    img = apply_shading(out.image, out.alpha, torch.ones(2, 3), n, draw, 0.3, 0.7)
    img.sum().backward()
    assert m.params["means"].grad is not None and m.params["means"].grad.abs().sum() > 0


def test_sample_shading_modes_and_lights_follow_the_config():
    cams = orbit_cameras(torch.linspace(-180, 180, 400), torch.full((400,), 20.0), width=8)
    cfg = ShadingConfig(albedo_prob=0.25, textureless_prob=0.25, light_elevation_range=(30.0, 60.0),
                        light_azimuth_spread=10.0)
    d = sample_shading(cams, cfg, torch.Generator().manual_seed(0))
    frac = [(d.modes == k).float().mean().item() for k in (LIT, ALBEDO, TEXTURELESS)]
    assert abs(frac[0] - 0.5) < 0.08 and abs(frac[1] - 0.25) < 0.08 and abs(frac[2] - 0.25) < 0.08
    el = torch.rad2deg(torch.asin(d.lights[:, 2]))
    assert el.min() >= 29.9 and el.max() <= 60.1
    eye = cams.camera_centers()
    horiz = torch.nn.functional.normalize(eye[:, :2], dim=-1)
    lh = torch.nn.functional.normalize(d.lights[:, :2], dim=-1)
    assert torch.rad2deg(torch.acos((horiz * lh).sum(-1).clamp(-1, 1))).max() < 10.5  # within the spread


def test_world_frame_lights_stay_near_their_direction_whatever_the_camera():
    cams = orbit_cameras(torch.linspace(-180, 180, 400), torch.full((400,), 20.0), width=8)
    cfg = ShadingConfig(light_frame="world", world_light_azimuth=38.0, world_light_elevation=55.0,
                        world_light_jitter=0.1)
    lights = sample_shading(cams, cfg, torch.Generator().manual_seed(0)).lights
    want = orbit_cameras(torch.tensor([38.0]), torch.tensor([55.0]), width=8).camera_centers()[0]
    want = want / want.norm()
    angle = torch.rad2deg(torch.acos((lights @ want).clamp(-1, 1)))
    assert torch.allclose(lights.norm(dim=-1), torch.ones(400), atol=1e-5)
    assert angle.max() < 25.0 and angle.mean() < 12.0  # a cone around the world direction...
    back, front = lights[:200], lights[200:]  # ...for cameras behind the object as well as in front
    assert abs(back.mean(0) @ want - front.mean(0) @ want) < 0.05
    with pytest.raises(ValueError, match="light_frame"):
        sample_shading(cams, ShadingConfig(light_frame="sun"), None)


def test_dreamtime_schedule_is_monotone_and_time_prioritised():
    ts = [dreamtime_timestep(r / 99, 0.02, 0.98) for r in range(100)]
    assert all(a >= b for a, b in zip(ts, ts[1:]))  # never increases
    assert ts[0] > 0.95 and ts[-1] < 0.05
    # the run spends its steps in proportion to the prior: most of them in [m2, m1] = [0.5, 0.8]
    mid = sum(0.5 <= t <= 0.8 for t in ts) / len(ts)
    high = sum(t > 0.8 for t in ts) / len(ts)
    assert mid > 0.4 and mid > high
    assert dreamtime_prior(0.65, 0.8, 0.5, 0.3, 0.1) == 1.0
    assert dreamtime_prior(0.2, 0.8, 0.5, 0.3, 0.1) == pytest.approx(math.exp(-0.09 / 0.02))
    assert dreamtime_timestep(0.5, 0.3, 0.3) == 0.3


def test_progressive_views_grow_from_the_front_view_to_the_full_ranges():
    """threestudio's progressive views: the coarse cameras start at the front view and their ranges grow
    linearly to the full ones at ``progressive_views_until``; 0 leaves the full ranges from the start."""
    from backend.pipeline.coarse import progressive_camera_ranges

    config = CoarseConfig(elevation_range=(-10.0, 80.0), progressive_views_until=0.4, progressive_views_elevation=20.0)
    assert progressive_camera_ranges(config, 0.0) == ((0.0, 0.0), (20.0, 20.0))
    azimuth, elevation = progressive_camera_ranges(config, 0.2)
    assert azimuth == pytest.approx((-90.0, 90.0)) and elevation == pytest.approx((5.0, 50.0))
    for ratio in (0.4, 0.7, 1.0):
        assert progressive_camera_ranges(config, ratio) == ((-180.0, 180.0), (-10.0, 80.0))
    off = CoarseConfig(elevation_range=(-10.0, 80.0))
    assert progressive_camera_ranges(off, 0.0) == ((-180.0, 180.0), (-10.0, 80.0))
    # the coarse stage's own cameras follow them: the first step's views are all the front view
    seen = []
    cfg = CoarseConfig(steps=8, batch_size=4, num_points=100, render_resolution=16, render_resolution_end=16,
                       preview_every=0, densify_from=2.0, renderer="torch", progressive_views_until=0.5,
                       progressive_views_elevation=20.0)

    def record(images, cams, bg, ratio):
        seen.append((cams.azimuth_deg.detach().clone(), cams.elevation_deg.detach().clone()))
        return images.sum() * 0.0

    run_coarse_stage(record, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[0][0], torch.zeros(4)) and torch.allclose(seen[0][1], torch.full((4,), 20.0))
    assert all(a.abs().max() <= 180.0 * min((k / 7) / 0.5, 1.0) + 1e-4 for k, (a, _) in enumerate(seen))
    assert max(float(a.abs().max()) for a, _ in seen[4:]) > 90.0


def test_stratified_azimuth_puts_one_camera_in_each_arc_and_keeps_the_generator_in_step():
    from backend.gaussians.cameras import sample_cameras

    def azimuths(cams) -> torch.Tensor:
        centres = cams.camera_centers()
        return torch.rad2deg(torch.atan2(centres[:, 0], -centres[:, 1]))  # x = sin(az), y = -cos(az)

    plain_arcs, plain_after = set(), []
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        a = azimuths(sample_cameras(4, 16, g, stratified_azimuth=True)) % 360.0
        # each camera in its own quarter of the circle, whatever the draw
        assert sorted(int(x // 90.0) for x in a) == [0, 1, 2, 3]
        after = torch.rand(1, generator=g)
        g2 = torch.Generator().manual_seed(seed)
        plain = azimuths(sample_cameras(4, 16, g2)) % 360.0
        plain_arcs.add(len({int(x // 90.0) for x in plain}))
        plain_after.append(bool(torch.equal(after, torch.rand(1, generator=g2))))
    assert min(plain_arcs) < 4  # uniform draws do bunch: the test can tell the two apart
    assert all(plain_after)  # the same number of draws either way: later randomness is unchanged


@pytest.fixture(scope="module")
def tiny_pixel(tmp_path_factory):
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tq") / "pixel", latent=False)


def test_dreamtime_sampling_and_x0_form_in_the_guidance(tiny_pixel):
    from backend.guidance import load_guidance

    g = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0, t_sampling="dreamtime",
                                     sds_form="x0"), "cpu")
    g.set_prompt("a red cube")
    ts = []
    for r in (0.0, 0.5, 1.0):
        images = torch.rand(2, 3, 32, 32, requires_grad=True)
        torch.manual_seed(1)
        g.sds_loss(images, torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0]), r).backward()
        ts.append(int(g.last["t"].max()))
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert ts[0] > ts[1] > ts[2]
    # x0 form: d loss / d image = 2 * x0_weight * (z - x0_hat) / B with x0_hat clamped to [-1, 1]:
    # so the gradient is bounded by 2 * 2 / B per element whatever the noise prediction
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    g.sds_loss(images, torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0]), 0.0).backward()
    assert images.grad.abs().max() <= 2.0 + 1e-5
    fine_g = g.with_config(t_max=0.5, t_max_end=0.5, cfg_scale=2.0)
    assert fine_g.config.cfg_scale == 2.0 and g.config.cfg_scale == 5.0 and fine_g.unet is g.unet
    assert fine_g.timestep_range(0.0)[1] <= 500


def test_texture_tv_prior_removes_speckle():
    mesh = _sphere_mesh(res=32)
    gen = torch.Generator().manual_seed(0)
    mesh.texture = (0.5 + 0.3 * (torch.rand(32, 32, 3, generator=gen) - 0.5)).clamp(0, 1)
    before = texture_tv(mesh.texture)
    assert texture_tv(torch.full((8, 8, 3), 0.3)) == 0
    cams = orbit_cameras([0.0], [0.0], width=16)
    refine(mesh, lambda im, c, bg, r: 0.0 * im.sum(), lambda s: cams,
           FineConfig(steps=20, lr=0.01, tv_weight=10.0, preview_every=0, rasterizer="torch"))
    assert texture_tv(mesh.texture) < 0.5 * before


def test_gaussian_regularisers_entropy_and_scale_limit():
    assert float(binary_entropy(torch.tensor([0.5]))) == pytest.approx(math.log(2), rel=1e-4)
    assert binary_entropy(torch.tensor([0.0, 1.0])) < 1e-2
    cfg = CoarseConfig(steps=6, batch_size=1, num_points=200, render_resolution=16, render_resolution_end=16,
                       preview_every=0, densify_from=2.0, opacity_entropy_weight=1.0, max_scale=0.02,
                       init_scale=0.05, renderer="torch")
    res = run_coarse_stage(lambda im, c, bg, r: (im - 0.5).square().mean(), cfg, generator=torch.Generator().manual_seed(0),
                           shading=ShadingConfig(coarse=True))
    assert res.gaussians.activated().scales.max() <= 0.02 + 1e-6


_THREE_VIEWS = orbit_cameras(torch.tensor([0.0, 120.0, 240.0]), torch.full((3,), 20.0), width=24)


def _regulariser_alone(measure, make_start, steps: int, **config) -> tuple[float, float]:
    """``measure`` of the Gaussians ``make_start()`` returns, before and after ``steps`` coarse steps whose
    only loss is the regulariser ``config`` turns on (the SDS stand-in is zero)."""
    cfg = CoarseConfig(steps=steps, batch_size=2, render_resolution=24, render_resolution_end=24, preview_every=0,
                       densify_from=2.0, renderer="torch", **config)
    start = make_start()
    before = measure(start)
    res = run_coarse_stage(lambda im, c, bg, r: im.sum() * 0.0, cfg, generator=torch.Generator().manual_seed(0),
                           init=start)
    return before, measure(res.gaussians)


def test_alpha_entropy_makes_the_rendered_silhouette_crisp():
    """threestudio's ``lambda_opaque``: with no other loss, the entropy of the rendered alpha alone drives
    half-covered pixels to empty or full, so a haze becomes a solid with a clean silhouette."""
    def mean_alpha_entropy(model) -> float:
        with torch.no_grad():
            return float(binary_entropy(model.render(_THREE_VIEWS, torch.zeros(3)).alpha))

    def haze() -> GaussianModel:
        return GaussianModel.init_random(300, 0.5, "sphere", 0.06, 0.15, torch.Generator().manual_seed(1))

    before, after = _regulariser_alone(mean_alpha_entropy, haze, 60, alpha_entropy_weight=10.0, lr_opacities=0.1)
    assert after < 0.7 * before, (before, after)  # measured: 0.073 -> 0.037
    before, unchanged = _regulariser_alone(mean_alpha_entropy, haze, 60, alpha_entropy_weight=0.0, lr_opacities=0.1)
    assert unchanged == pytest.approx(before, rel=1e-3)


def test_z_variance_pulls_a_haze_into_one_surface_per_ray():
    """HiFA's z-variance: with no other loss, the spread of depths behind each opaque pixel shrinks."""
    from backend.pipeline.coarse import z_variance

    def mean_z_variance(model) -> float:
        with torch.no_grad():
            return float(z_variance(model.render(_THREE_VIEWS, torch.zeros(3), depth_variance=True)))

    def haze() -> GaussianModel:
        return GaussianModel.init_random(300, 0.5, "sphere", 0.06, 0.3, torch.Generator().manual_seed(1))

    before, after = _regulariser_alone(mean_z_variance, haze, 60, z_variance_weight=100.0, lr_opacities=0.1)
    assert after < 0.7 * before, (before, after)
    before, unchanged = _regulariser_alone(mean_z_variance, haze, 60, z_variance_weight=0.0, lr_opacities=0.1)
    assert unchanged == pytest.approx(before, rel=1e-3)


@pytest.mark.parametrize("term", ["alpha_entropy", "normal_smooth", "z_variance"])
def test_a_late_regulariser_starts_late_and_ramps_in(term):
    import backend.pipeline.coarse as coarse

    weight_at = getattr(coarse, f"{term}_weight")  # alpha_entropy_weight(), normal_smooth_weight(), ...
    late = CoarseConfig(**{f"{term}_weight": 300.0, f"{term}_from": 0.5})
    assert [weight_at(late, r) for r in (0.0, 0.49, 0.55, 0.6, 1.0)] == pytest.approx([0, 0, 150, 300, 300])
    assert weight_at(CoarseConfig(**{f"{term}_weight": 300.0}), 0.0) == 300.0
    assert weight_at(CoarseConfig(**{f"{term}_from": 0.5}), 0.9) == 0.0


def test_cpu_preset_turns_the_techniques_on_and_they_can_be_switched_off():
    p = get_preset("cpu")
    assert p.shading.coarse and p.shading.fine and p.guidance.t_sampling == "dreamtime"
    assert p.fine.t_max == 0.5 and p.fine.texture_filter == "linear-mipmap-linear"
    assert p.fine.tv_weight > 0 and p.fine.rebake_sigma > 0
    assert p.coarse.opacity_entropy_weight == 0 and p.coarse.max_scale == 0  # off: see docs/benchmarks.md
    assert p.coarse.elevation_range == (-10.0, 80.0) and p.coarse.background == "learned"
    assert p.fine.random_bg_prob == 0.5 and p.fine.rebake_reunwrap
    assert p.fine.vertex_offsets and p.fine.normal_weight > 0 and p.coarse.density_threshold < 0.5  # geometry
    assert p.coarse.normal_smooth_weight > 0 and p.coarse.normal_smooth_views == 1  # views from below,
    # capped low enough that a torus's tube bends past the cap (its hole stays open) at full weight
    assert p.coarse.normal_smooth_views_scale == 1.0 and 0 < p.coarse.normal_smooth_views_cap < p.coarse.normal_smooth_cap
    assert p.coarse.z_variance_weight > 0 and p.coarse.z_variance_from >= 0.5  # from the start it films holes
    off = get_preset("cpu", {"shading.coarse": False, "shading.fine": False, "guidance.t_sampling": "random",
                             "fine.t_max": "none", "fine.tv_weight": 0, "fine.texture_filter": "linear",
                             "fine.rebake_sigma": 0, "fine.vertex_offsets": False, "coarse.density_threshold": 0.5})
    assert off.fine.vertex_offsets is False and off.coarse.density_threshold == 0.5
    assert off.shading.coarse is False and off.fine.t_max is None and off.fine.tv_weight == 0
    with pytest.raises(ValueError, match="shading.albedo_prob"):
        get_preset("cpu", {"shading.albedo_prob": 0.8, "shading.textureless_prob": 0.5})


def _seam_jump(mesh) -> float:
    """Mean colour difference across UV seams: each seam edge's midpoint sampled through both faces."""
    import numpy as np

    f = mesh.faces.numpy()
    cuv = mesh.corner_uvs.numpy().reshape(-1, 3, 2)
    tex = mesh.texture.numpy()
    H, W = tex.shape[:2]
    edges = {}
    jumps = []
    for fi, tri in enumerate(f):
        for k in range(3):
            a, b = tri[k], tri[(k + 1) % 3]
            uv_mid = 0.5 * (cuv[fi, k] + cuv[fi, (k + 1) % 3])
            key = (min(a, b), max(a, b))
            if key in edges:
                other = edges[key]
                if np.abs(other - uv_mid).max() > 1e-4:  # a seam: the two faces map the edge apart
                    def at(uv):
                        return tex[min(H - 1, int((1 - uv[1]) * H)), min(W - 1, int(uv[0] * W))]
                    jumps.append(np.abs(at(other) - at(uv_mid)).mean())
            else:
                edges[key] = uv_mid
    return float(np.mean(jumps))


def test_seam_aware_rebake_makes_seams_agree_and_keeps_the_colour_field():
    from backend.mesh.bake import bake_texture
    from backend.pipeline.fine import seam_aware_rebake

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=128,
                                 backend="torch")
    field = lambda p: torch.stack([0.5 + 0.4 * p[:, 0], 0.5 + 0.4 * p[:, 2], torch.full_like(p[:, 0], 0.3)], -1)  # noqa: E731
    clean, mask = bake_texture(mesh.positions, mesh.faces, mesh.corner_uvs, field, 128, backend="torch")
    gen = torch.Generator().manual_seed(0)
    mesh.texture = (clean + 0.08 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    before_seam = _seam_jump(mesh)
    before_err = (mesh.texture - clean)[mask].abs().mean()
    seam_aware_rebake(mesh, 1.0, backend="torch")
    after_seam = _seam_jump(mesh)
    after_err = (mesh.texture - clean)[mask].abs().mean()
    assert after_seam < 0.5 * before_seam
    assert after_err < 0.6 * before_err  # the noise is averaged, the smooth field kept
    seam_aware_rebake(mesh, 1.0, backend="torch", passes=2)  # two more passes: seams agree further
    assert _seam_jump(mesh) < after_seam
    assert (mesh.texture - clean)[mask].abs().mean() < after_err * 1.1


def test_chart_padding_follows_the_charts_during_refinement():
    from backend.pipeline.fine import padding_source

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, lambda p: 0.5 + 0.5 * p.clamp(-1, 1).abs(),
                                 face_budget=5000, texture_resolution=32, backend="torch")
    assert mesh.texel_mask is not None and 0.1 < mesh.texel_mask.float().mean() < 0.95
    cams = orbit_cameras([0.0], [0.0], width=16)
    # a loss that darkens everything it sees: through the coarse mip levels it reaches the padding too
    refine(mesh, lambda im, c, bg, r: im.mean(), lambda s: cams,
           FineConfig(steps=5, lr=0.2, preview_every=0, rasterizer="torch", texture_filter="linear-mipmap-linear"))
    flat = mesh.texture.reshape(-1, 3)
    src = padding_source(mesh.texel_mask).reshape(-1)
    assert torch.equal(flat, flat[src])  # every padding texel holds its nearest chart texel's colour


def test_extrapolated_texel_points_lie_beyond_the_chart_edges_on_the_surface():
    from backend.mesh.bake import texel_surface_points, texel_surface_points_extrapolated

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=64,
                                 backend="torch")
    pts, mask = texel_surface_points(mesh.positions, mesh.faces, mesh.corner_uvs, 64, backend="torch")
    ext, emask = texel_surface_points_extrapolated(mesh.positions, mesh.faces, mesh.corner_uvs, 64, reach=2,
                                                   backend="torch")
    assert bool((emask >= mask).all()) and int(emask.sum()) > int(mask.sum()) * 1.2
    torch.testing.assert_close(ext[mask], pts[mask])
    extra = ext[emask & ~mask]
    r = extra.norm(dim=-1)
    assert (r - 0.6).abs().max() < 0.06  # just beyond an edge of the (flat-faced) sphere, on its surface



def test_vertex_offsets_with_normal_consistency_flatten_a_noisy_plane_without_shrinking_it():
    """Magic3D's geometry refinement: per-vertex offsets regularised by normal consistency (and a
    Laplacian on the offsets) take the bumps off a flat face; the face keeps its size."""
    import numpy as np

    n = 17
    xs = np.linspace(-0.6, 0.6, n)
    gx, gy = np.meshgrid(xs, xs, indexing="ij")
    rng = np.random.default_rng(0)
    verts = np.stack([gx.ravel(), gy.ravel(), 0.03 * rng.uniform(-1.0, 1.0, n * n)], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    mesh = prepare_textured_mesh(verts, faces, None, face_budget=5000, texture_resolution=32, backend="torch")

    def bumps(p):  # spread of the interior vertices' heights about their mean plane
        p = p.numpy()
        inner = (np.abs(p[:, :2]) < 0.55).all(1)
        return float(p[inner, 2].std())

    before = bumps(mesh.positions)
    cams = orbit_cameras([30.0, 210.0], [60.0, 60.0], width=32)
    cfg = FineConfig(steps=40, vertex_offsets=True, lr=0.0, lr_offsets=3e-3, offset_limit=0.05,
                     laplacian_weight=1e4, normal_weight=1e3, preview_every=0, rasterizer="torch")
    refine(mesh, lambda im, c, bg, r: 0.0 * im.sum(), lambda s: cams, cfg)
    after = bumps(mesh.deformed)
    assert after < 0.5 * before, (before, after)
    # the face keeps its place and size inside its border (an open border's last ring may stretch a
    # little: tilting its triangles flat moves it outward; extracted surfaces are closed)
    p0, p1 = mesh.positions.numpy(), mesh.deformed.numpy()
    inner = (np.abs(p0[:, :2]) < 0.45).all(1)
    assert np.abs(p1[inner, :2] - p0[inner, :2]).mean() < 0.01
    assert abs(p1[inner, 2].mean() - p0[inner, 2].mean()) < 0.005
    spread = p1[inner, :2].max(0) - p1[inner, :2].min(0)
    assert np.all(np.abs(spread - (p0[inner, :2].max(0) - p0[inner, :2].min(0))) < 0.03), spread


def test_rebake_with_reunwrap_unshears_the_texels_and_keeps_the_colour_on_the_surface():
    """Offsets that shear the surface after the first unwrap stretch its texels; re-unwrapping before
    the seam-aware re-bake gives square texels again, and every surface point keeps its colour."""
    from backend.mesh.bake import bake_texture
    from backend.pipeline.fine import seam_aware_rebake
    from backend.quality.texture import texel_density

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    res = 128
    mesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=5000, texture_resolution=res,
                                 backend="torch")
    field = lambda p: torch.stack([0.5 + 0.4 * p[:, 0], 0.5 + 0.4 * p[:, 2], 0.5 + 0.4 * p[:, 1]], -1)  # noqa: E731
    mesh.texture, _ = bake_texture(mesh.positions, mesh.faces, mesh.corner_uvs, field, res, backend="torch")
    shear = torch.tensor([[1.0, 0.0, 1.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # x += 1.2 z
    mesh.offsets = mesh.positions @ shear.T - mesh.positions
    moved = lambda p: field(p @ torch.linalg.inv(shear).T)  # noqa: E731  (colour rides with the surface)

    def aspect(m):
        return texel_density(m.deformed.numpy(), m.faces.numpy(), m.corner_uvs.numpy(), res, res)["anisotropy"]

    sheared = aspect(mesh)
    seam_aware_rebake(mesh, 1.0, backend="torch", reunwrap=dict(resolution=res, padding=2, isolate=False))
    assert aspect(mesh) < 1.3 < sheared
    expected, mask = bake_texture(mesh.deformed, mesh.faces, mesh.corner_uvs, moved, res, backend="torch")
    assert (mesh.texture - expected)[mask].abs().mean() < 0.02


def test_multistep_target_is_ddim_and_one_step_is_the_x0_form(tiny_pixel):
    """DreamGaussian's multi-step denoised target: ``denoise`` is deterministic DDIM (checked against
    diffusers' DDIMScheduler on the same noise predictions), one step is exactly the x0 form, and the
    multistep SDS loss pulls the image toward that target (gradient = 2·w·(z − x0)/B, bounded)."""
    from diffusers import DDIMScheduler

    from backend.guidance import load_guidance

    g = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0, sds_form="multistep",
                                     denoise_steps=3), "cpu")
    g.set_prompt("a red cube")
    az, el = torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0])
    cond = g.view_embeddings(az, el)
    gen = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.tensor([600, 600])
    calls = []
    real_predict = g.predict_noise

    def counted(x, tt, c, cam=None, scale=None):
        calls.append(int(tt[0]))
        return real_predict(x, tt, c, cam, scale)

    g.predict_noise = counted
    with torch.no_grad():
        eps0 = g.predict_noise(z_t, t, cond)
        ours = g.denoise(z_t, t, eps0, cond, None, 3)
    assert calls == [600, 400, 200]  # one UNet pass per DDIM step, evenly spaced from t to 0
    sched = DDIMScheduler(num_train_timesteps=g.bundle.num_train_timesteps, beta_schedule="linear",
                          clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False)
    sched.alphas_cumprod = g.bundle.alphas_cumprod.cpu()
    sched.set_timesteps(5)  # 1000 / 5 = 200 apart: 800, 600, 400, 200, 0
    x = z_t
    with torch.no_grad():
        for tt in (600, 400, 200):
            out = sched.step(real_predict(x, torch.tensor([tt, tt]), cond), tt, x, eta=0.0, use_clipped_model_output=True)
            x, ref = out.prev_sample, out.pred_original_sample
    assert torch.allclose(ours, ref, atol=1e-4)
    with torch.no_grad():
        one = g.denoise(z_t, t, eps0, cond, None, 1)
    assert torch.allclose(one, g.x0_estimate(z_t, t, eps0))
    assert not torch.allclose(one, ours, atol=1e-3)  # more steps: a different (sampled) target
    g.predict_noise = real_predict
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    g.sds_loss(images, az, el, 0.3).backward()
    assert torch.isfinite(images.grad).all() and 0 < images.grad.abs().max() <= 2.0 + 1e-5


def test_fine_stage_takes_its_own_sds_form(tiny_pixel):
    """``fine.sds_form`` (DreamGaussian's stage 2 on the textured mesh) changes only the fine stage's guidance."""
    from backend.guidance import load_guidance
    from backend.pipeline.fine import fine_loss_fn

    g = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0), "cpu")
    g.set_prompt("a red cube")
    seen = []
    real = g.with_config

    def spy(**changes):
        other = real(**changes)
        seen.append(other.config)
        return other

    g.with_config = spy
    fine_loss_fn(g, FineConfig(sds_form="multistep", t_max=0.5))
    assert seen[-1].sds_form == "multistep" and seen[-1].t_max == 0.5 and g.config.sds_form == "eps"
    fine_loss_fn(g, FineConfig(sds_form=None, t_max=None, cfg_scale=None))
    assert len(seen) == 1  # nothing to change: the guidance's own form


def _plane_depth(cams, normal, offset, bump=0.0):
    """(1, 1, H, W) camera-space depth of the plane n·P = offset seen by ``cams`` (one camera), plus a
    bump of ``bump`` world units in the middle of the image."""
    H, W = cams.height, cams.width
    K = cams.Ks[0]
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    rays = torch.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], torch.ones_like(jj)], dim=0)
    depth = offset / (torch.tensor(normal).view(3, 1, 1) * rays).sum(0)
    r2 = ((jj - W / 2) ** 2 + (ii - H / 2) ** 2) / (W / 6) ** 2
    return (depth + bump * torch.exp(-r2)).view(1, 1, H, W)


def test_normal_smoothness_is_zero_on_a_plane_whatever_its_silhouette_and_grows_with_a_bump():
    cams = orbit_cameras([30.0], [20.0], 3.0, 40.0, width=32)
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    alpha = (((xx - 16) ** 2 + (yy - 16) ** 2) < 12 ** 2).float().view(1, 1, 32, 32)  # a disc of surface
    plane = _plane_depth(cams, (0.2, -0.3, 0.93), 3.0)
    flat = normal_smoothness(depth_normals(plane, alpha, cams), alpha)
    assert float(flat) < 1e-8  # the disc's edge (normals fall back to the view) is not counted
    bumped = _plane_depth(cams, (0.2, -0.3, 0.93), 3.0, bump=-0.3).requires_grad_(True)
    rough = normal_smoothness(depth_normals(bumped, alpha, cams), alpha)
    assert float(rough.detach()) > 1e-3
    rough.backward()
    assert bumped.grad is not None and bumped.grad.abs().sum() > 0  # the gradient reaches the depth


def test_capped_normal_smoothness_does_not_ask_to_bridge_an_occlusion_edge():
    """With ``cap`` (the weak membrane) a depth jump inside the silhouette, where a near part hides a
    far one, costs a constant and sends (almost) no gradient; the plain square pulls at it."""
    cams = orbit_cameras([30.0], [20.0], 3.0, 40.0, width=32)
    alpha = torch.ones(1, 1, 32, 32)
    depth = torch.full((1, 1, 32, 32), 3.0)
    depth[..., 16:] = 3.6  # the right half lies 0.6 behind the left

    def gradient(cap: float) -> float:
        d = depth.clone().requires_grad_(True)
        normal_smoothness(depth_normals(d, alpha, cams), alpha, cap=cap).backward()
        assert d.grad is not None
        return float(d.grad.abs().sum())

    plain, capped = gradient(0.0), gradient(0.25)
    assert plain > 0.1 and capped < 0.01 * plain, (plain, capped)  # measured: 0.95 and 0.0012


def test_normal_smoothness_alone_flattens_a_lumpy_surface_of_gaussians():
    """threestudio's ``lambda_normal_smooth`` on the Gaussians' depth normals: with no other loss, the
    term moves the Gaussians so the surface they render is smoother; with no weight nothing changes."""
    def roughness(model) -> float:
        with torch.no_grad():
            out = model.render(_THREE_VIEWS, torch.zeros(3))
            return float(normal_smoothness(depth_normals(out.depth, out.alpha, _THREE_VIEWS), out.alpha))

    lrs = dict(lr_means=5e-3, lr_means_end=5e-3)
    before, after = _regulariser_alone(roughness, _lumpy_shell, 40, normal_smooth_weight=10.0, **lrs)
    assert after < 0.8 * before, (before, after)  # measured: 0.168 -> 0.042
    before, unchanged = _regulariser_alone(roughness, _lumpy_shell, 40, normal_smooth_weight=0.0, **lrs)
    assert unchanged == pytest.approx(before, rel=1e-3)


def _lumpy_shell() -> GaussianModel:
    """A shell of 300 Gaussians of radius 0.5 whose radii are jittered by ±15 %."""
    shell = GaussianModel.init_random(300, 0.5, "shell", 0.05, 0.6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        jitter = 2 * torch.rand(len(shell), 1, generator=torch.Generator().manual_seed(2)) - 1
        shell.params["means"].mul_(1.0 + 0.15 * jitter)
    return shell


def test_views_from_below_smooth_the_underside_the_guidance_never_sees():
    """``normal_smooth_views``: with the guidance's cameras high above (60-80 deg), the normal
    smoothness alone leaves the shell's underside as lumpy as it was; extra views from below, seen
    only by the regulariser, smooth it too."""
    below = orbit_cameras([0.0, 120.0, 240.0], [-50.0, -50.0, -50.0], 3.0, 40.0, width=32)

    def underside_roughness(model) -> float:
        with torch.no_grad():
            out = model.render(below, torch.zeros(3))
            return float(normal_smoothness(depth_normals(out.depth, out.alpha, below), out.alpha))

    common = dict(normal_smooth_weight=10.0, lr_means=5e-3, lr_means_end=5e-3, elevation_range=(60.0, 80.0))
    before, unseen = _regulariser_alone(underside_roughness, _lumpy_shell, 40, **common)
    _, seen = _regulariser_alone(underside_roughness, _lumpy_shell, 40, normal_smooth_views=2, **common)
    assert seen < 0.7 * unseen, (before, unseen, seen)
    _, weightless = _regulariser_alone(underside_roughness, _lumpy_shell, 40, normal_smooth_views=2,
                                       normal_smooth_views_scale=0.0, **common)
    assert weightless > 0.9 * unseen, (unseen, weightless)  # the views are drawn but weigh nothing


def test_the_views_from_below_can_keep_only_surface_that_faces_down():
    """``normal_smooth_views_max_nz``: those views' term counts only pixels whose world normal's z is at
    most this, so at -1 nothing is left, and at 0 less than with every pixel."""
    from backend.pipeline.coarse import underside_smoothness

    shell = _lumpy_shell()

    def term(max_nz: float) -> float:
        cfg = CoarseConfig(normal_smooth_views=3, normal_smooth_views_max_nz=max_nz, renderer="torch")
        with torch.no_grad():
            return float(underside_smoothness(shell, cfg, 32, torch.Generator().manual_seed(0), torch.device("cpu"),
                                              "torch"))

    every, down, none = term(1.0), term(0.0), term(-1.0)
    assert every > 0 and none == 0.0 and down != every, (every, down, none)


def test_the_views_from_below_have_their_own_cap_when_it_is_set():
    """``normal_smooth_views_cap``: None uses ``normal_smooth_cap`` (the guidance views' cap); a value caps
    only the views from below, so a tiny cap there bounds their term by it whatever the other cap."""
    from backend.pipeline.coarse import underside_smoothness

    shell = _lumpy_shell()

    def term(**kw) -> float:
        cfg = CoarseConfig(normal_smooth_views=3, renderer="torch", **kw)
        with torch.no_grad():
            return float(underside_smoothness(shell, cfg, 32, torch.Generator().manual_seed(0), torch.device("cpu"),
                                              "torch"))

    plain, shared, own = term(), term(normal_smooth_cap=0.01), term(normal_smooth_cap=0.01, normal_smooth_views_cap=0.0)
    tiny = term(normal_smooth_views_cap=0.01)
    assert 0 < shared <= 0.01 < plain, (plain, shared)
    assert own == plain, (own, plain)  # 0 = the plain square, whatever normal_smooth_cap says
    assert 0 < tiny <= 0.01, tiny


def test_interval_score_matching_inverts_the_render_and_draws_no_noise(tiny_pixel):
    """LucidDreamer's ISM: z_s comes from z by deterministic DDIM inversion with the unconditional
    prediction (steps of at most the stride from t = 0), z_t from z_s by one more step, and the
    gradient is w(t)·(eps_cfg(z_t, t) − eps_uncond(z_s, s)), checked against the DDIM formulas step by
    step. No random noise enters, so two calls under different seeds give the same gradient, which SDS
    does not."""
    from backend.guidance import load_guidance

    g = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0, sds_form="ism",
                                     ism_interval=50, ism_inversion_stride=200), "cpu")
    g.set_prompt("a red cube")
    az, el = torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([450, 450])
    g.sample_timesteps = lambda batch, ratio, lo, hi: (t, 450, 450)
    calls = []
    real_unet = g.unet_noise

    def counted(x, tt, emb, cam=None):
        calls.append([int(v) for v in tt])
        return real_unet(x, tt, emb, cam)

    def gradients_under_two_seeds(guidance) -> list[torch.Tensor]:
        grads = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            x = images.clone().requires_grad_(True)
            guidance.sds_loss(x, az, el, 0.3).backward()
            grads.append(x.grad)
        return grads

    g.unet_noise = counted
    grads = gradients_under_two_seeds(g)
    assert torch.equal(grads[0], grads[1])
    # s = 400 in ceil(400 / 200) = 2 inversion steps (0 → 200 → 400), one step 400 → 450, one guided pass
    assert calls[:4] == [[0, 0], [200, 200], [400, 400], [450, 450, 450, 450]]
    g.unet_noise = real_unet
    alphas = g.bundle.alphas_cumprod
    uncond = g._uncond.expand(2, -1, -1)
    with torch.no_grad():
        z = images * 2 - 1
        x, eps = alphas[0].sqrt() * z, None
        for t_from, t_to in ((0, 200), (200, 400), (400, 450)):
            eps = real_unet(x, torch.tensor([t_from] * 2), uncond)
            x0 = (x - (1 - alphas[t_from]).sqrt() * eps) / alphas[t_from].sqrt()
            x = alphas[t_to].sqrt() * x0 + (1 - alphas[t_to]).sqrt() * eps
        grad = (1 - alphas[450]) * (g.predict_noise(x, t, g.view_embeddings(az, el)) - eps)
    # d loss / d image = (d loss / d z) · (d z / d image) = grad / B · 2, and B = 2
    assert torch.allclose(grads[0], grad, atol=1e-5)
    sds = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0), "cpu")
    sds.set_prompt("a red cube")
    sds_grads = gradients_under_two_seeds(sds)
    assert not torch.allclose(sds_grads[0], sds_grads[1])


def test_interval_score_matching_settings_are_checked():
    from backend.pipeline.presets import get_preset

    preset = get_preset("cpu", overrides={"guidance.sds_form": "ism", "guidance.ism_interval": 80,
                                          "guidance.weighting": "sigma"})
    assert (preset.guidance.sds_form, preset.guidance.ism_interval, preset.guidance.weighting) == ("ism", 80, "sigma")
    with pytest.raises((ValueError, ProtocolError), match="ism_interval"):
        get_preset("cpu", overrides={"guidance.ism_interval": 0})
    with pytest.raises((ValueError, ProtocolError), match="ism_inversion_stride"):
        get_preset("cpu", overrides={"guidance.ism_inversion_stride": 5})
    with pytest.raises((ValueError, ProtocolError), match="ism_until"):
        get_preset("cpu", overrides={"guidance.ism_until": 1.5})
    assert get_preset("cpu", overrides={"guidance.sds_form": "csd"}).guidance.sds_form == "csd"


def test_classifier_score_distillation_is_the_guidance_term_alone(tiny_pixel):
    """CSD (Yu et al. 2024): the gradient is w(t)·cfg·(eps_cond − eps_uncond) on the same noisy input as
    SDS, so it is SDS's gradient less w(t)·(eps_uncond − eps): checked against one SDS call under the
    same seed, with both noise predictions recomputed from that call's noise."""
    from backend.guidance import load_guidance

    az, el = torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([300, 700])
    grads, noises = {}, {}
    for form in ("eps", "csd"):
        g = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0, sds_form=form), "cpu")
        g.set_prompt("a red cube")
        g.sample_timesteps = lambda batch, ratio, lo, hi: (t, 300, 700)
        torch.manual_seed(3)
        x = images.clone().requires_grad_(True)
        g.sds_loss(x, az, el, 0.3).backward()
        grads[form] = x.grad
        torch.manual_seed(3)
        noises[form] = torch.randn(2, 3, 32, 32)
    a = g.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        z_t = a.sqrt() * (images * 2 - 1) + (1 - a).sqrt() * noises["csd"]
        eps_cond, eps_uncond = g.noise_pair(z_t, t, g.view_embeddings(az, el))
    # d loss / d image = grad / B · 2 with B = 2
    w = 1 - a
    assert torch.allclose(grads["csd"], w * 5.0 * (eps_cond - eps_uncond), atol=1e-5)
    assert torch.allclose(grads["eps"] - grads["csd"], w * (eps_uncond - noises["csd"]), atol=1e-5)
    assert (eps_uncond - noises["csd"]).abs().max() > 1e-3  # the dropped term is not zero here


def test_interval_score_matching_can_hand_over_to_sds_part_way(tiny_pixel):
    """``guidance.ism_until``: before it the gradient has no random noise in it (the same under two seeds),
    after it the step is plain SDS (two seeds differ, and it equals an ``eps`` guidance's step)."""
    from backend.guidance import load_guidance

    az, el = torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def grad(guidance, seed: int, ratio: float) -> torch.Tensor:
        guidance.set_prompt("a red cube")
        guidance.sample_timesteps = lambda batch, r, lo, hi: (torch.tensor([450, 450]), 450, 450)
        torch.manual_seed(seed)
        x = images.clone().requires_grad_(True)
        guidance.sds_loss(x, az, el, ratio).backward()
        return x.grad

    ism = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0, sds_form="ism",
                                       ism_until=0.5), "cpu")
    sds = load_guidance(GuidanceConfig(model=str(tiny_pixel), fp16=False, cfg_scale=5.0), "cpu")
    assert torch.equal(grad(ism, 0, 0.3), grad(ism, 1, 0.3))
    late = grad(ism, 0, 0.7)
    assert not torch.allclose(late, grad(ism, 1, 0.7))
    assert torch.equal(late, grad(sds, 0, 0.7))
