"""Pure-PyTorch rasteriser against hand-computed cases, gradient checks, and nvdiffrast parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.gaussians.cameras import orbit_cameras
from backend.mesh import rasterize_torch as rt
from backend.mesh.rasterize import projection_from_cameras, render_mesh, resolve_backend, to_clip


def _pix_centres(n: int) -> np.ndarray:
    return (2 * np.arange(n) + 1) / n - 1.0


def test_coverage_of_half_square_matches_hand_count():
    # triangle (-1,-1), (1,-1), (-1,1) in NDC covers pixel centres with x + y <= 0
    pos = torch.tensor([[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rt.rasterize(pos, tri, (4, 4))
    assert rast.shape == (1, 4, 4, 4)
    xs = _pix_centres(4)
    expected = (xs[None, :] + xs[:, None]) <= 1e-9  # rows = y (row 0 at y = -1), cols = x
    covered = rast[0, ..., 3].numpy() > 0
    np.testing.assert_array_equal(covered, expected)
    assert covered.sum() == 10
    # row 0 is NDC y = -1: a triangle in the lower half (y < 0) lands in the first rows only
    low = torch.tensor([[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [0.0, -0.1, 0.0, 1.0]])
    r2 = rt.rasterize(low, tri, (8, 8))[0, ..., 3] > 0
    assert r2[:4].any() and not r2[4:].any()


def test_non_square_resolution_and_pixel_centres():
    # a thin triangle around x = 0.3 (centre of column 6 on a W=10 grid: (2*6+1)/10 - 1); inside
    # y in [-1, 1] its half-width stays within [0.075, 0.113], so columns 5 (x=0.1) and 7 (x=0.5) miss
    pos = torch.tensor([[0.15, -3.0, 0.0, 1.0], [0.45, -3.0, 0.0, 1.0], [0.3, 5.0, 0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rt.rasterize(pos, tri, (6, 10))
    cov = rast[0, ..., 3] > 0
    assert cov.shape == (6, 10)
    cols = torch.nonzero(cov.any(0)).squeeze(1).tolist()
    assert cols == [6]
    assert cov[:, 6].all()


def test_depth_order_independent_of_triangle_order():
    near = [[-1.0, -1.0, -0.5, 1.0], [1.0, -1.0, -0.5, 1.0], [0.0, 1.0, -0.5, 1.0]]
    far = [[-1.0, 1.0, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0], [0.0, -1.0, 0.5, 1.0]]
    pos = torch.tensor(near + far)
    for order in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        tri = torch.tensor(order, dtype=torch.int32)
        rast = rt.rasterize(pos, tri, (16, 16))
        ids = rast[0, ..., 3].long()
        near_id = 1 + order.index([0, 1, 2])
        far_id = 1 + order.index([3, 4, 5])
        # centre pixels are covered by both: the near one wins with z/w = -0.5
        assert ids[8, 8] == near_id
        assert rast[0, 8, 8, 2].item() == pytest.approx(-0.5)
        # where only the far one covers (top corners of the far triangle) it shows
        assert ids[15, 1] == far_id and rast[0, 15, 1, 2].item() == pytest.approx(0.5)
    # fragments beyond the far plane are discarded
    pos_out = pos.clone()
    pos_out[:3, 2] = 1.5
    rast = rt.rasterize(pos_out, torch.tensor([[0, 1, 2]], dtype=torch.int32), (8, 8))
    assert (rast[..., 3] == 0).all()


def test_perspective_correct_interpolation_matches_ray_plane_hits():
    # a tilted triangle in camera space, projected with a real camera; interpolating the camera-
    # space position must give the ray/plane intersection through each pixel centre.
    cams = orbit_cameras([0.0], [0.0], distance=3.0, fovy_deg=60.0, width=24, height=16)
    P = projection_from_cameras(cams)[0].double()
    cam_pts = torch.tensor([[-1.0, -0.6, 2.0], [1.2, -0.4, 4.0], [0.1, 0.9, 2.5]], dtype=torch.float64)
    homo = torch.cat([cam_pts, torch.ones(3, 1, dtype=torch.float64)], 1)
    pos = homo @ P.T
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rt.rasterize(pos, tri, (16, 24))
    attr = rt.interpolate(cam_pts, rast, tri)[0]
    K = cams.Ks[0].double()
    n = torch.cross(cam_pts[1] - cam_pts[0], cam_pts[2] - cam_pts[0], dim=0)
    mask = rast[0, ..., 3] > 0
    assert mask.sum() > 20
    for i, j in torch.nonzero(mask).tolist():
        d = torch.tensor([(j + 0.5 - K[0, 2]) / K[0, 0], (i + 0.5 - K[1, 2]) / K[1, 1], 1.0], dtype=torch.float64)
        t = (n @ cam_pts[0]) / (n @ d)
        np.testing.assert_allclose(attr[i, j].numpy(), (t * d).numpy(), atol=1e-9)
    # z/w channel is linear in screen space; compare with the projection of the hit point
    i, j = torch.nonzero(mask)[0].tolist()
    hit = attr[i, j]
    clip = P @ torch.cat([hit, torch.ones(1, dtype=torch.float64)])
    assert rast[0, i, j, 2].item() == pytest.approx((clip[2] / clip[3]).item(), abs=1e-9)


def test_camera_projection_matches_opencv_pixels():
    cams = orbit_cameras([30.0, -120.0], [20.0, -5.0], distance=3.0, fovy_deg=50.0, width=40, height=30)
    pts = torch.tensor([[0.3, -0.2, 0.5], [-0.7, 0.1, -0.2]])
    clip = to_clip(pts, cams)
    for b in range(2):
        cam = (cams.viewmats[b, :3, :3] @ pts.T + cams.viewmats[b, :3, 3:]).T
        uvw = (cams.Ks[b] @ cam.T).T
        px = uvw[:, :2] / uvw[:, 2:]
        ndc = clip[b, :, :2] / clip[b, :, 3:]
        np.testing.assert_allclose(((ndc[:, 0] + 1) * 20).numpy(), px[:, 0].numpy(), atol=1e-4)
        np.testing.assert_allclose(((ndc[:, 1] + 1) * 15).numpy(), px[:, 1].numpy(), atol=1e-4)
        np.testing.assert_allclose(clip[b, :, 3].numpy(), cam[:, 2].numpy(), atol=1e-5)


def test_render_orientation_top_of_image_is_up():
    # a quad above the origin (z > 0) seen from the front must land in the top rows
    verts = torch.tensor([[-0.5, 0.0, 0.2], [0.5, 0.0, 0.2], [0.5, 0.0, 0.9], [-0.5, 0.0, 0.9]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cams = orbit_cameras([0.0], [0.0], width=32)
    out = render_mesh(verts, faces, cams, backend="torch")
    rows = torch.nonzero(out.alpha[0, 0].sum(1)).squeeze(1)
    assert rows.max() < 16
    # and +X (right of the object seen from the front) lands on the right: colour by x
    colors = torch.stack([(verts[:, 0] > 0).float()] * 3, 1)
    img = render_mesh(verts, faces, cams, vertex_colors=colors, background=0.0, backend="torch").image
    rows_sel = img[0, 0, rows]
    assert rows_sel[:, 20:].mean() > rows_sel[:, :12].mean()


def test_chunking_gives_identical_results():
    torch.manual_seed(0)
    pos = torch.cat([torch.rand(60, 2) * 2 - 1, torch.rand(60, 1) * 1.8 - 0.9, torch.ones(60, 1)], 1)
    tri = torch.randint(0, 60, (80, 3), dtype=torch.int32)
    a = rt.rasterize(pos[None].repeat(2, 1, 1), tri, (20, 24))
    b = rt.rasterize(pos[None].repeat(2, 1, 1), tri, (20, 24), max_candidates=37)
    torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    pos = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        rt.rasterize(pos, torch.tensor([[0, 1, 3]], dtype=torch.int32), (4, 4))
    with pytest.raises(ValueError, match="clip"):
        rt.rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 2]], dtype=torch.int32), (4, 4))
    with pytest.raises(ValueError, match="filter_mode"):
        rt.texture(torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 2), filter_mode="cubic")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("opengl", "cpu")
    assert resolve_backend("auto", "cpu") == "torch"
    # a triangle behind the camera (w < 0) is dropped, not mirrored
    behind = torch.tensor([[-1.0, -1.0, 0.0, -1.0], [1.0, -1.0, 0.0, -1.0], [-1.0, 1.0, 0.0, -1.0]])
    assert (rt.rasterize(behind, torch.tensor([[0, 1, 2]]), (4, 4))[..., 3] == 0).all()


def test_texture_sampling_matches_hand_values():
    tex = torch.tensor([[[0.0], [1.0]], [[2.0], [3.0]]])  # row 0: 0 1, row 1: 2 3
    uv = torch.tensor([[[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]]])
    out = rt.texture(tex, uv)[0, 0, :, 0]
    np.testing.assert_allclose(out.numpy(), [0.0, 1.0, 2.0, 1.5, 0.5], atol=1e-6)
    near = rt.texture(tex, torch.tensor([[[[0.7, 0.6]]]]), filter_mode="nearest")
    assert near.item() == 3.0
    wrap = rt.texture(tex, torch.tensor([[[[1.25, 0.25]]]]), boundary_mode="wrap")
    assert wrap.item() == pytest.approx(0.0, abs=1e-6)


def test_gradchecks_interpolate_texture_and_positions():
    torch.manual_seed(1)
    pos = torch.tensor([[-0.8, -0.7, 0.1, 1.0], [0.9, -0.6, 0.3, 1.3], [0.1, 0.8, -0.2, 0.9]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rt.rasterize(pos, tri, (8, 8))
    attr = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: rt.interpolate(a, rast, tri), (attr,))

    tex = torch.rand(1, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    uv = (torch.rand(1, 4, 4, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, u: rt.texture(t, u), (tex, uv))

    # barycentric channels w.r.t. vertex positions (coverage unchanged by the tiny perturbations)
    p = pos.clone().requires_grad_(True)

    def bary(p_):
        r = rt.rasterize(p_, tri, (8, 8))
        return r[..., :3]

    assert torch.autograd.gradcheck(bary, (p,), eps=1e-7, atol=1e-5)


def test_gradient_moves_vertices_towards_target():
    # optimise one vertex's colour-weighted image: gradients through barycentrics reach positions
    cams = orbit_cameras([0.0], [0.0], width=32)
    verts = torch.tensor([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.0, 0.0, 0.5]], requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = render_mesh(verts, faces, cams, vertex_colors=colors, background=0.0, backend="torch")
    out.image[:, 2].sum().backward()  # more blue: grow the blue vertex's influence
    assert torch.isfinite(verts.grad).all() and verts.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for nvdiffrast")
def test_parity_torch_vs_nvdiffrast():
    pytest.importorskip("nvdiffrast.torch")
    import trimesh

    from backend.mesh import rasterize_nvdiffrast as rn

    m = trimesh.creation.icosphere(subdivisions=3)
    verts = torch.tensor(m.vertices, dtype=torch.float32, device="cuda") * torch.tensor([1.0, 0.7, 0.9], device="cuda")
    faces = torch.tensor(m.faces, dtype=torch.int32, device="cuda")
    cams = orbit_cameras([15.0, 100.0], [20.0, -5.0], width=96, device="cuda")
    pos = to_clip(verts, cams)
    r_t = rt.rasterize(pos, faces, (96, 96))
    r_n = rn.rasterize(pos, faces, (96, 96))
    same = (r_t[..., 3] == r_n[..., 3])
    assert same.float().mean() > 0.995  # ties on shared edges may differ
    both = same & (r_t[..., 3] > 0)
    torch.testing.assert_close(r_t[..., :3][both], r_n[..., :3][both], atol=2e-4, rtol=1e-3)
    attr = torch.rand(verts.shape[0], 3, device="cuda")
    torch.testing.assert_close(rt.interpolate(attr, r_n, faces), rn.interpolate(attr, r_n, faces), atol=1e-5, rtol=1e-4)
    tex = torch.rand(1, 32, 48, 3, device="cuda")
    uv = torch.rand(2, 96, 96, 2, device="cuda")
    torch.testing.assert_close(rt.texture(tex, uv), rn.texture(tex, uv), atol=1e-4, rtol=1e-3)
    # gradients of a textured render agree
    t1 = tex.clone().requires_grad_(True)
    t2 = tex.clone().requires_grad_(True)
    rt.texture(t1, uv).square().sum().backward()
    rn.texture(t2, uv).square().sum().backward()
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-3, rtol=1e-3)
    assert math.isfinite(float(r_n[..., 2].abs().max()))
    # mipmapped sampling with UV derivatives (issue 12): rast_db, interpolate_da and the trilinear
    # lookup agree (unverified on a GPU in the session that added it)
    rt_r, rt_db = rt.rasterize_with_db(pos, faces, (96, 96))
    rn_r, rn_db = rn.rasterize_with_db(pos, faces, (96, 96))
    both = (rt_r[..., 3] == rn_r[..., 3]) & (rt_r[..., 3] > 0)
    torch.testing.assert_close(rt_db[both], rn_db[both], atol=1e-3, rtol=0.02)
    uva = torch.rand(verts.shape[0], 2, device="cuda")
    _, da_t = rt.interpolate_da(uva, rn_r, faces, rn_db)
    uvn, da_n = rn.interpolate_da(uva, rn_r, faces, rn_db)
    torch.testing.assert_close(da_t, da_n, atol=1e-4, rtol=1e-3)
    tex = torch.rand(1, 64, 64, 3, device="cuda")
    m_t = rt.texture(tex, uvn, "linear-mipmap-linear", uv_da=da_n)
    m_n = rn.texture(tex, uvn, "linear-mipmap-linear", uv_da=da_n)
    assert (m_t - m_n).abs().mean() < 0.02


def test_barycentric_and_uv_derivatives_match_finite_differences():
    """rast_db / interpolate_da against the attribute one pixel over, on a tilted (perspective) quad."""
    cams = orbit_cameras([25.0], [30.0], 3.0, 40.0, width=64)
    verts = torch.tensor([[-0.7, -0.5, 0.0], [0.7, -0.5, 0.1], [0.7, 0.6, 0.4], [-0.7, 0.6, 0.2]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    pos = to_clip(verts, cams)
    rast, db = rt.rasterize_with_db(pos, tri, (64, 64))
    torch.testing.assert_close(rast, rt.rasterize(pos, tri, (64, 64)))
    attr = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    out, da = rt.interpolate_da(attr, rast, tri, db)
    assert da.shape == (1, 64, 64, 4)
    inside = rast[0, ..., 3] > 0
    tid = rast[0, ..., 3]
    # pixels whose right and lower neighbours lie in the same triangle (the map is affine per triangle)
    ok = inside[:-1, :-1] & (tid[1:, :-1] == tid[:-1, :-1]) & (tid[:-1, 1:] == tid[:-1, :-1])
    fd_x = (out[0, :-1, 1:] - out[0, :-1, :-1])[ok]  # one column right
    fd_y = (out[0, 1:, :-1] - out[0, :-1, :-1])[ok]  # one row down
    d = da[0, :-1, :-1][ok]
    assert ok.sum() > 500
    torch.testing.assert_close(d[:, [0, 2]], fd_x, atol=2e-3, rtol=0.05)
    torch.testing.assert_close(d[:, [1, 3]], fd_y, atol=2e-3, rtol=0.05)
    assert (da[0][~inside] == 0).all()


def test_mipmapped_texture_is_linear_at_magnification_and_averages_at_minification():
    tex = torch.zeros(1, 64, 64, 3)
    tex[:, ::2, ::2] = 1.0  # a one-texel checkerboard-like pattern: mean 0.25
    tex[:, 1::2, 1::2] = 1.0  # mean 0.5
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(1, 40, 40, 2, generator=g)
    # magnification (a pixel covers 1/4 texel): identical to bilinear
    small = torch.zeros(1, 40, 40, 4)
    small[..., 0] = 0.25 / 64
    small[..., 3] = 0.25 / 64
    torch.testing.assert_close(rt.texture(tex, uv, "linear-mipmap-linear", uv_da=small), rt.texture(tex, uv))
    # minification by 8 texels per pixel: level 3 of the pyramid, the pattern averages to grey
    big = torch.zeros(1, 40, 40, 4)
    big[..., 0] = 8.0 / 64
    big[..., 3] = 8.0 / 64
    assert rt.mip_lod(big, 64, 64).sub(3.0).abs().max() < 1e-5
    mip = rt.texture(tex, uv, "linear-mipmap-linear", uv_da=big)
    lin = rt.texture(tex, uv)
    assert (mip - 0.5).abs().max() < 1e-5
    assert lin.std() > 0.1  # bilinear aliases
    # fractional level: a blend of the two neighbouring levels
    half = big * 2 ** -0.5  # lod 2.5
    pyr = rt.mip_pyramid(tex.permute(0, 3, 1, 2))
    l2 = rt._sample(pyr[2], uv, "linear", "clamp").permute(0, 2, 3, 1)
    l3 = rt._sample(pyr[3], uv, "linear", "clamp").permute(0, 2, 3, 1)
    torch.testing.assert_close(rt.texture(tex, uv, "linear-mipmap-linear", uv_da=half), 0.5 * (l2 + l3))
    # the gradient of one pixel reaches every texel of its footprint
    t = tex.clone().requires_grad_(True)
    one = torch.tensor([[[[0.5, 0.5]]]])
    rt.texture(t, one, "linear-mipmap-linear", uv_da=big[:, :1, :1]).sum().backward()
    assert int((t.grad[0, ..., 0] > 0).sum()) >= 64
    with pytest.raises(ValueError, match="uv_da"):
        rt.texture(tex, uv, "linear-mipmap-linear")


def test_mipmapped_render_reduces_texture_aliasing_of_a_distant_mesh():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    verts = torch.tensor(m.vertices, dtype=torch.float32)
    faces = torch.tensor(m.faces)
    uv = torch.stack([torch.atan2(verts[:, 1], verts[:, 0]) / (2 * math.pi) + 0.5, verts[:, 2] / 1.2 + 0.5], -1)
    tex = torch.zeros(256, 256, 3)
    tex[::2] = 1.0  # stripes one texel wide
    cams = orbit_cameras([10.0], [10.0], 3.0, 40.0, width=24)
    lin = render_mesh(verts, faces, cams, texture_map=tex, uv=uv, uv_faces=faces, backend="torch")
    mip = render_mesh(verts, faces, cams, texture_map=tex, uv=uv, uv_faces=faces, backend="torch",
                      filter_mode="linear-mipmap-linear")
    inside = lin.alpha[0, 0] > 0
    assert mip.image[0, 0][inside].std() < 0.5 * lin.image[0, 0][inside].std()
    assert abs(float(mip.image[0, 0][inside].mean()) - 0.5) < 0.1
