"""The pure-PyTorch Gaussian renderer: exact against brute force, gradients, camera frame, gsplat parity."""

from __future__ import annotations

import math

import pytest
import torch

from backend.gaussians.cameras import orbit_cameras
from backend.gaussians.render import (
    ALPHA_MAX,
    ALPHA_MIN,
    T_MIN,
    project_gaussians,
    quat_to_rotmat,
    render_gaussians,
    resolve_backend,
)


def brute_force(means, quats, scales, opacities, colors, cameras, background, depth_moments=False):
    """Per-pixel loops over every Gaussian in depth order (gsplat's classic rule), no tiles, no culling.
    With ``depth_moments`` also Σ w z and Σ w z² per pixel (C, 1, H, W) each."""
    H, W = cameras.height, cameras.width
    R = quat_to_rotmat(quats)
    cov = R @ torch.diag_embed(scales**2) @ R.transpose(-1, -2)
    img = torch.zeros(len(cameras), 3, H, W, dtype=means.dtype)
    alpha_img = torch.zeros(len(cameras), 1, H, W, dtype=means.dtype)
    z_sum = torch.zeros(len(cameras), 1, H, W, dtype=means.dtype)
    z2_sum = torch.zeros(len(cameras), 1, H, W, dtype=means.dtype)
    for c in range(len(cameras)):
        V = cameras.viewmats[c].to(means)
        K = cameras.Ks[c].to(means)
        p = means @ V[:3, :3].T + V[:3, 3]
        order = torch.argsort(p[:, 2]).tolist()
        splats = []
        for n in order:
            x, y, z = p[n].tolist()
            if z <= 0.01:
                continue
            fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
            lim_x = (W - cx) / fx + 0.3 * (0.5 * W / fx), cx / fx + 0.3 * (0.5 * W / fx)
            lim_y = (H - cy) / fy + 0.3 * (0.5 * H / fy), cy / fy + 0.3 * (0.5 * H / fy)
            xc = z * min(max(x / z, -lim_x[1]), lim_x[0])
            yc = z * min(max(y / z, -lim_y[1]), lim_y[0])
            J = torch.tensor([[fx / z, 0, -fx * xc / z**2], [0, fy / z, -fy * yc / z**2]], dtype=means.dtype)
            c2 = J @ V[:3, :3] @ cov[n] @ V[:3, :3].T @ J.T + 0.3 * torch.eye(2, dtype=means.dtype)
            splats.append((fx * x / z + cx, fy * y / z + cy, torch.linalg.inv(c2), opacities[n], colors[n], z))
        for i in range(H):
            for j in range(W):
                T, rgb, acc = 1.0, torch.zeros(3, dtype=means.dtype), 0.0
                for mx, my, P, o, col, z in splats:
                    d = torch.tensor([mx - (j + 0.5), my - (i + 0.5)], dtype=means.dtype)
                    a = min(ALPHA_MAX, float(o * torch.exp(-0.5 * d @ P @ d)))
                    if a < ALPHA_MIN:
                        continue
                    if T * (1 - a) <= T_MIN:
                        break
                    rgb = rgb + a * T * col
                    acc += a * T
                    z_sum[c, 0, i, j] += a * T * z
                    z2_sum[c, 0, i, j] += a * T * z * z
                    T *= 1 - a
                img[c, :, i, j] = rgb + T * background[c]
                alpha_img[c, 0, i, j] = acc
    if depth_moments:
        return img, alpha_img, z_sum, z2_sum
    return img, alpha_img


def random_gaussians(n, dtype=torch.float64, seed=0, spread=0.4, opacity=(0.1, 1.0)):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * spread
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.2 + 0.04
    lo, hi = opacity
    opac = torch.rand(n, generator=g, dtype=dtype) * (hi - lo) + lo
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opac, colors


@pytest.mark.parametrize("tile", [4, 8])
def test_matches_brute_force_exactly(tile):
    means, quats, scales, opac, colors = random_gaussians(7)
    opac[0] = 0.999  # exercises the 0.999 clamp and the early stop
    cams = orbit_cameras([0.0, 120.0], [15.0, 35.0], 3.0, 49.0, width=18, height=14)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = render_gaussians(means, quats, scales, opac, colors, cams, bg, backend="torch", tile_size=tile,
                           chunk_elements=2000)
    ref, ref_alpha = brute_force(means, quats, scales, opac, colors, cams, bg)
    assert out.image.shape == (2, 3, 14, 18) and out.alpha.shape == (2, 1, 14, 18)
    assert torch.allclose(out.image, ref, atol=1e-12, rtol=0)
    assert torch.allclose(out.alpha, ref_alpha, atol=1e-12, rtol=0)
    assert out.alpha.max() > 0.5  # the Gaussians are actually in view


def test_depth_and_its_variance_along_the_ray_match_brute_force():
    """``depth`` is Σ w z / Σ w and ``depth_var`` (HiFA's z-variance) Σ w z² / Σ w − depth², per pixel."""
    means, quats, scales, opac, colors = random_gaussians(9, seed=2, spread=0.3)
    cams = orbit_cameras([0.0, 200.0], [15.0, -5.0], 3.0, 49.0, width=12, height=10)
    bg = torch.zeros(3, dtype=torch.float64)
    out = render_gaussians(means, quats, scales, opac, colors, cams, bg, backend="torch", chunk_elements=500,
                           depth_variance=True)
    _, alpha, z_sum, z2_sum = brute_force(means, quats, scales, opac, colors, cams, bg.expand(2, 3),
                                          depth_moments=True)
    seen = alpha > 1e-3
    depth = z_sum / alpha.clamp_min(1e-10)
    assert torch.allclose(out.depth[seen], depth[seen], atol=1e-9)
    variance = (z2_sum / alpha.clamp_min(1e-10) - depth**2).clamp_min(0)
    assert torch.allclose(out.depth_var[seen], variance[seen], atol=1e-9)
    assert variance[seen].max() > 1e-3  # splats at different depths share pixels
    assert render_gaussians(means, quats, scales, opac, colors, cams, bg, backend="torch").depth_var is None


def test_many_overlapping_gaussians_stop_at_transmittance_floor():
    means, quats, scales, opac, colors = random_gaussians(40, spread=0.05, opacity=(0.8, 0.95))
    cams = orbit_cameras([30.0], [10.0], 3.0, 49.0, width=10)
    bg = torch.ones(1, 3, dtype=torch.float64)
    out = render_gaussians(means, quats, scales, opac, colors, cams, bg, backend="torch")
    ref, ref_alpha = brute_force(means, quats, scales, opac, colors, cams, bg)
    assert torch.allclose(out.image, ref, atol=1e-12)
    assert out.alpha.max() > 0.999


def _gradcheck_render(gaussians, cams, fast_mode: bool) -> bool:
    """torch.autograd.gradcheck of the torch renderer's image, alpha and alpha-weighted depth (float64)."""
    bg = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)

    def f(m, q, s, o, c):
        out = render_gaussians(m, q, s, o, c, cams, bg, backend="torch")
        return out.image, out.alpha, out.depth * out.alpha

    inputs = tuple(t.clone().requires_grad_(True) for t in gaussians)
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def test_gradcheck_float64():
    gaussians = random_gaussians(3, seed=3, opacity=(0.3, 0.7))
    assert _gradcheck_render(gaussians, orbit_cameras([20.0], [10.0], 3.0, 40.0, width=8, height=6), fast_mode=True)


def test_gradcheck_float64_through_the_transmittance_floor():
    """The compositing's hand-written backward (``_CompositeTiles``) where splats overlap so densely that
    the 0.999 clamp and the 1e-4 transmittance floor both act, in every output (colour, alpha, depth).
    The full Jacobian (not gradcheck's fast mode, whose random projection misses splats behind the floor
    that wrongly get a gradient)."""
    means, quats, scales, opac, colors = random_gaussians(24, seed=4, spread=0.03, opacity=(0.85, 0.95))
    opac[2] = 0.9995  # clamped to 0.999: no gradient through the clamp
    cams = orbit_cameras([10.0], [20.0], 3.0, 40.0, width=7, height=6)
    out = render_gaussians(means, quats, scales, opac, colors, cams, torch.zeros(3, dtype=torch.float64),
                           backend="torch")
    assert out.alpha.max() > 0.999  # the floor (T 1e-4) is approached
    assert _gradcheck_render((means, quats, scales, opac, colors), cams, fast_mode=False)


def test_float32_gradients_match_float64_on_many_splats():
    """The renderer as the coarse stage runs it (float32, hundreds of overlapping splats, 48 px, tile
    groups): every parameter's gradient within 1e-3 of the float64 gradient's norm, and the depth's too."""
    means, quats, scales, opac, colors = random_gaussians(400, seed=6, spread=0.3)
    scales = scales * 0.5
    cams = orbit_cameras([0.0, 75.0, 160.0], [15.0, 40.0, 5.0], 3.0, 49.0, width=48)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        params = [t.to(dtype).clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
        out = render_gaussians(*params, cams, torch.ones(3, dtype=dtype), backend="torch", chunk_elements=1 << 14)
        weights = torch.linspace(-1, 1, out.image.numel(), dtype=dtype).reshape(out.image.shape)
        loss = (out.image * weights).sum() + (out.depth * out.alpha).sum() + out.alpha.square().sum()
        loss.backward()
        grads[dtype] = [p.grad.double() for p in params]
    for g64, g32 in zip(grads[torch.float64], grads[torch.float32]):
        assert g64.norm() > 0
        assert (g32 - g64).norm() <= 1e-3 * g64.norm()


def test_front_of_object_faces_minus_y():
    """A Gaussian at -Y (the object's front) is seen by the front camera (azimuth 0) in the centre column
    and is nearer to it than a Gaussian at +Y; the +X Gaussian appears on the right of the front view."""
    means = torch.tensor([[0.0, -0.5, 0.0], [0.6, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.full((2, 3), 0.05)
    opac = torch.tensor([0.9, 0.9])
    colors = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    cams = orbit_cameras([0.0], [0.0], 3.0, 49.0, width=33)
    m2, _, _, depth, _ = project_gaussians(means, quats, scales, cams.viewmats, cams.Ks, 33, 33)
    assert abs(m2[0, 0, 0].item() - 16.5) < 1e-4 and depth[0, 0] < 3.0
    assert m2[0, 1, 0].item() > 16.5  # +X is to the right in the front view
    out = render_gaussians(means, quats, scales, opac, colors, cams, torch.zeros(3), backend="torch")
    assert out.image[0, 0, 16, 16] > 0.5 and out.image[0, 2, 16, 16] < 0.05


def test_means2d_gradient_for_densification():
    means, quats, scales, opac, colors = random_gaussians(5, dtype=torch.float32)
    means.requires_grad_(True)
    cams = orbit_cameras([0.0, 90.0], [10.0, 10.0], 3.0, 49.0, width=16)
    out = render_gaussians(means, quats, scales, opac, colors, cams, torch.ones(3), backend="torch",
                           retain_means2d=True)
    out.image.sum().backward()
    assert out.means2d.grad is not None and out.means2d.grad.shape == (2, 5, 2)
    assert out.means2d.grad.abs().sum() > 0
    assert out.visible.shape == (2, 5)


def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown Gaussian renderer"):
        resolve_backend("opengl", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            resolve_backend("gsplat", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat parity needs CUDA")
def test_parity_with_gsplat():
    """gsplat vs the torch twin on CUDA: images, alpha and the depth variance within 2e-3 (max abs),
    gradients within 2% relative norm.

    Differences come only from gsplat culling at a 3-sigma tile box where the twin uses the exact
    opacity-aware extent, and from float32 summation order.
    """
    pytest.importorskip("gsplat")
    dev = torch.device("cuda")
    means, quats, scales, opac, colors = (t.float().to(dev) for t in random_gaussians(300, seed=5))
    scales = scales * 0.3
    cams = orbit_cameras([0.0, 90.0, 200.0], [10.0, 30.0, -5.0], 3.0, 49.0, width=64, device=dev)
    bg = torch.rand(3, 3, device=dev)
    outs, grads = {}, {}
    for backend in ("gsplat", "torch"):
        params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
        out = render_gaussians(*params, cams, bg, backend=backend, depth_variance=True)
        weights = torch.linspace(0, 1, out.image.numel(), device=dev).reshape(out.image.shape)
        ((out.image * weights).sum() + (out.depth_var * out.alpha).sum()).backward()
        outs[backend] = out
        grads[backend] = [p.grad for p in params]
    assert (outs["gsplat"].image - outs["torch"].image).abs().max() < 2e-3
    assert (outs["gsplat"].alpha - outs["torch"].alpha).abs().max() < 2e-3
    solid = outs["torch"].alpha > 0.5  # the depth variance (a fourth colour channel of z² in gsplat)
    assert (outs["gsplat"].depth_var - outs["torch"].depth_var)[solid].abs().max() < 2e-3
    for g_ref, g in zip(grads["gsplat"], grads["torch"]):
        assert (g - g_ref).norm() <= 0.02 * g_ref.norm() + 1e-6


def test_rotation_matrix_is_orthonormal():
    q = torch.randn(10, 4, dtype=torch.float64)
    R = quat_to_rotmat(q)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(10, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(10, dtype=torch.float64))
    assert math.isclose(float(quat_to_rotmat(torch.tensor([[1.0, 0, 0, 0]]))[0, 0, 0]), 1.0)
