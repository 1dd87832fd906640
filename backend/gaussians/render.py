"""Differentiable 3D Gaussian rendering: gsplat on CUDA, a pure-PyTorch twin everywhere.

``render_gaussians(means, quats, scales, opacities, colors, cameras, background, backend="auto")``

Inputs (world frame = Blender's, see ``cameras.py``):
    means (N, 3) float, quats (N, 4) float (w, x, y, z; normalised here), scales (N, 3) float
    standard deviations in world units (already activated), opacities (N,) in [0, 1],
    colors (N, 3) in [0, 1], cameras: a ``Cameras`` batch of C views, background (C, 3) or (3,).
Output: ``RenderOutput`` with image (C, 3, H, W), alpha (C, 1, H, W), depth (C, 1, H, W)
    (expected camera-space depth, alpha-normalised), means2d (C, N, 2) pixel positions whose
    ``.grad`` is filled after backward when ``retain_means2d=True`` (for densification),
    visible (C, N) bool, and with ``depth_variance=True`` depth_var (C, 1, H, W): the alpha-normalised
    variance of the splats' camera-space depths along each pixel's ray, Σ w (z − depth)² / Σ w
    (world units², 0 where alpha is 0; HiFA's z-variance).

The torch backend follows gsplat's "classic" 3DGS maths exactly: EWA projection with the
Jacobian's x/z and y/z clamped to 1.3× the field of view, a 0.3 px² dilation of the 2D covariance
(``eps2d``), pixel centres at (j + 0.5, i + 0.5), per-pixel alpha = min(0.999, o·exp(-σ)) skipped
when σ < 0 or alpha < 1/255, front-to-back compositing that stops before transmittance falls to
1e-4. Gaussians are binned into image tiles by an opacity-aware extent (every pixel where alpha can
reach 1/255 is covered, so the result equals a brute-force evaluation over all pixels), then each
group of tiles is composited densely: (tiles, K, pixels) tensors, K = the most Gaussians in a tile of
the group, tiles grouped by their Gaussian count to keep padding small. The compositing has its own
backward (``_CompositeTiles``, the gradient gsplat's CUDA kernel computes): on the cpu preset's scene
(3000 Gaussians, 4 views, 48 px, one thread) forward + backward take 131 ms against 207 ms with autograd
over the same maths (``bench/bench_render.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from backend.gaussians.cameras import Cameras

log = logging.getLogger(__name__)

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
_announced: set[str] = set()


@dataclass
class RenderOutput:
    image: torch.Tensor            # (C, 3, H, W)
    alpha: torch.Tensor            # (C, 1, H, W)
    depth: torch.Tensor            # (C, 1, H, W) expected depth (0 where alpha is 0)
    means2d: torch.Tensor | None = None   # (C, N, 2) pixel positions
    visible: torch.Tensor | None = None   # (C, N) bool
    depth_var: torch.Tensor | None = None  # (C, 1, H, W) depth variance along the ray (depth_variance=True)


def gsplat_available() -> bool:
    """True when CUDA is present and gsplat's CUDA extension is built and really runs
    (``backend.cuda_ext``: ``_C`` is not None and a one-Gaussian render works), not just imports."""
    if not torch.cuda.is_available():
        return False
    from backend import cuda_ext

    return cuda_ext.usable("gsplat")


def _gsplat_status_line() -> str:
    from backend import cuda_ext

    return cuda_ext.status("gsplat").line()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' → 'gsplat' when on CUDA with gsplat installed, else 'torch'. Logs the choice once."""
    device = torch.device(device)
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(f"unknown Gaussian renderer {backend!r}; expected auto, gsplat or torch")
    if backend == "auto":
        backend = "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
        why = "CUDA + gsplat" if backend == "gsplat" else (
            "no CUDA" if device.type != "cuda" else _gsplat_status_line())
    else:
        why = "requested"
        if backend == "gsplat" and device.type == "cuda":
            from backend import cuda_ext

            cuda_ext.wait("gsplat")  # an explicit request waits for a running warm-up build
    if backend == "gsplat" and (device.type != "cuda" or not gsplat_available()):
        raise RuntimeError("the gsplat renderer needs CUDA and a working gsplat extension (pip install '.[gpu]'); "
                           + (_gsplat_status_line() if device.type == "cuda" else "no CUDA device"))
    if backend not in _announced:
        _announced.add(backend)
        log.info("Gaussian renderer: %s (%s)", "gsplat" if backend == "gsplat" else "pure PyTorch", why)
    return backend


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions (w, x, y, z), any norm → (N, 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*quats.shape[:-1], 3, 3)


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) world covariances R S S Rᵀ."""
    M = quat_to_rotmat(quats) * scales.unsqueeze(-2)
    return M @ M.transpose(-1, -2)


def project_gaussians(means, quats, scales, viewmats, Ks, width, height, near=0.01, far=1e10, eps2d=0.3):
    """EWA projection as gsplat's classic mode.

    Returns:
        means2d (C, N, 2) pixels, cov2d (C, N, 2, 2) dilated, conics (C, N, 3) = (a, b, c) of the
        inverse covariance [[a, b], [b, c]], depths (C, N), valid (C, N) bool (in front, finite).
    """
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    p = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]
    cov_w = covariance_3d(quats, scales)
    cov_c = torch.einsum("cij,njk,clk->cnil", R, cov_w, R)
    tx, ty, tz = p.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tz_safe = torch.where(tz.abs() < 1e-6, torch.full_like(tz, 1e-6), tz)
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    txc = tz_safe * torch.minimum(torch.maximum(tx / tz_safe, -lim_x_neg), lim_x_pos)
    tyc = tz_safe * torch.minimum(torch.maximum(ty / tz_safe, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz_safe, zero, -fx * txc / tz_safe**2,
                     zero, fy / tz_safe, -fy * tyc / tz_safe**2], dim=-1).reshape(*tz.shape, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2)
    eye = torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    cov2d = cov2d + eps2d * eye
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * tx / tz_safe + cx, fy * ty / tz_safe + cy], dim=-1)
    valid = (tz > near) & (tz < far) & torch.isfinite(means2d).all(-1)
    return means2d, cov2d, conics, tz, valid


def render_gaussians(means, quats, scales, opacities, colors, cameras: Cameras, background=None,
                     backend: str = "auto", retain_means2d: bool = False, tile_size: int = 4,
                     chunk_elements: int = 1 << 18, near: float = 0.01, far: float = 1e10,
                     eps2d: float = 0.3, depth_variance: bool = False) -> RenderOutput:
    """Render C views of N Gaussians; see the module docstring for shapes and maths."""
    backend = resolve_backend(backend, means.device)
    C = len(cameras)
    if background is None:
        background = torch.zeros(3, dtype=means.dtype, device=means.device)
    bg = background.to(means.device, means.dtype)
    if bg.dim() == 1:
        bg = bg.expand(C, 3)
    if backend == "gsplat":
        return _render_gsplat(means, quats, scales, opacities, colors, cameras, bg, retain_means2d, near, far,
                              eps2d, depth_variance)
    return _render_torch(means, quats, scales, opacities, colors, cameras, bg, retain_means2d, tile_size,
                         chunk_elements, near, far, eps2d, depth_variance)


def _render_gsplat(means, quats, scales, opacities, colors, cameras, bg, retain_means2d, near, far, eps2d,
                   depth_variance=False):
    from gsplat import rasterization

    viewmats = cameras.viewmats.to(means)
    if depth_variance:  # a fourth colour channel per camera: the squared camera-space depth
        z = torch.einsum("cj,nj->cn", viewmats[:, 2, :3], means) + viewmats[:, 2, None, 3]  # (C, N)
        rgb_in = colors.expand(len(cameras), *colors.shape) if colors.dim() == 2 else colors
        colors = torch.cat([rgb_in, (z * z).unsqueeze(-1)], -1)  # (C, N, 4)
    renders, alphas, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, cameras.Ks.to(means),
        cameras.width, cameras.height, near_plane=near, far_plane=far, render_mode="RGB+ED", packed=False,
        rasterize_mode="classic", eps2d=eps2d,
    )
    means2d = meta["means2d"]
    if retain_means2d and means2d.requires_grad:
        means2d.retain_grad()
    rgb = renders[..., :3].permute(0, 3, 1, 2)
    alpha = alphas.permute(0, 3, 1, 2)
    depth = renders[..., -1:].permute(0, 3, 1, 2)  # "ED": already alpha-normalised
    image = rgb + (1.0 - alpha) * bg[:, :, None, None]
    radii = meta["radii"]
    visible = (radii > 0).all(-1) if radii.dim() == 3 else radii > 0
    depth_var = _depth_variance(renders[..., 3:4].permute(0, 3, 1, 2), alpha, depth) if depth_variance else None
    return RenderOutput(image, alpha, depth, means2d, visible, depth_var)


def _render_torch(means, quats, scales, opacities, colors, cameras, bg, retain_means2d, tile_size,
                  chunk_elements, near, far, eps2d, depth_variance=False):
    W, H = cameras.width, cameras.height
    viewmats = cameras.viewmats.to(means)
    Ks = cameras.Ks.to(means)
    C, N = viewmats.shape[0], means.shape[0]
    means2d, cov2d, conics, depths, valid = project_gaussians(means, quats, scales, viewmats, Ks, W, H, near,
                                                              far, eps2d)
    if retain_means2d and means2d.requires_grad:
        means2d.retain_grad()
    ts = tile_size
    tw, th = math.ceil(W / ts), math.ceil(H / ts)
    T = tw * th
    with torch.no_grad():
        op = opacities.detach().expand(C, N)
        # extent where alpha can still reach 1/255: 0.5 dᵀΣ⁻¹d <= log(255·o)
        s = torch.log((op / ALPHA_MIN).clamp_min(1.0))
        ext_x = torch.sqrt(2.0 * s * cov2d[..., 0, 0].detach()) + 1.0
        ext_y = torch.sqrt(2.0 * s * cov2d[..., 1, 1].detach()) + 1.0
        mx, my = means2d[..., 0].detach(), means2d[..., 1].detach()
        vis = valid & (op >= ALPHA_MIN) & (mx + ext_x > 0) & (mx - ext_x < W) & (my + ext_y > 0) & (my - ext_y < H)
        x0 = ((mx - ext_x) / ts).floor().clamp(0, tw - 1).long()
        x1 = ((mx + ext_x) / ts).floor().clamp(0, tw - 1).long()
        y0 = ((my - ext_y) / ts).floor().clamp(0, th - 1).long()
        y1 = ((my + ext_y) / ts).floor().clamp(0, th - 1).long()
        nx, ny = x1 - x0 + 1, y1 - y0 + 1
        count = torch.where(vis, nx * ny, torch.zeros_like(nx)).reshape(-1)
        flat = torch.arange(C * N, device=means.device).repeat_interleave(count)
        start = torch.cumsum(count, 0) - count
        local = torch.arange(flat.numel(), device=means.device) - start[flat]
        nxf = nx.reshape(-1)[flat]
        tx = x0.reshape(-1)[flat] + local % nxf
        ty = y0.reshape(-1)[flat] + local // nxf
        cam = flat // N
        tile_id = cam * T + ty * tw + tx
        depth_rank = torch.argsort(torch.argsort(depths.detach(), dim=1), dim=1).reshape(-1)
        order = torch.argsort(tile_id * N + depth_rank[flat])
        tile_sorted, gauss_sorted = tile_id[order], flat[order]
        per_tile = torch.bincount(tile_sorted, minlength=C * T)
        tstart = torch.cumsum(per_tile, 0) - per_tile
        pos = torch.arange(tile_sorted.numel(), device=means.device) - tstart[tile_sorted]
        kmax = int(per_tile.max()) if per_tile.numel() else 0
        table = torch.full((C * T, max(kmax, 1)), -1, dtype=torch.long, device=means.device)
        table[tile_sorted, pos] = gauss_sorted
        tile_order = torch.argsort(per_tile)
        counts_sorted = per_tile[tile_order].tolist()
        iy, ix = torch.meshgrid(torch.arange(ts, device=means.device), torch.arange(ts, device=means.device),
                                indexing="ij")
        local_px = torch.stack([ix.reshape(-1), iy.reshape(-1)], -1).to(means.dtype) + 0.5  # (P, 2)

    P = ts * ts
    col = colors.expand(C, N, 3) if colors.dim() == 2 else colors
    one = torch.ones_like(depths).unsqueeze(-1)
    extra = [depths.square().unsqueeze(-1)] if depth_variance else []
    # every attribute a tile needs of a splat, one row per (camera, Gaussian), so a tile group gathers once
    splats = torch.cat([means2d, conics, torch.log(opacities.clamp_min(1e-30)).expand(C, N).unsqueeze(-1), col,
                        depths.unsqueeze(-1), one, *extra], -1).reshape(C * N, -1)  # (C*N, SPLAT_COLUMNS [+ 1])
    outs_rgb, outs_a, outs_d, outs_d2 = [], [], [], []
    i = 0
    n_tiles = C * T
    while i < n_tiles:
        # grow the group while the padded work stays under the budget
        j = i + 1
        while j < n_tiles and (j - i + 1) * max(counts_sorted[j], 1) * P <= chunk_elements:
            j += 1
        tiles = tile_order[i:j]
        k = max(counts_sorted[j - 1], 1)
        rgb_t, a_t, d_t, d2_t = _composite(tiles, table[tiles, :k], splats, local_px, tw, T, ts)
        outs_rgb.append(rgb_t)
        outs_a.append(a_t)
        outs_d.append(d_t)
        outs_d2.append(d2_t)
        i = j
    inv = torch.argsort(tile_order)
    rgb = torch.cat(outs_rgb)[inv]  # (C*T, P, 3)
    acc = torch.cat(outs_a)[inv]    # (C*T, P)
    dsum = torch.cat(outs_d)[inv]   # (C*T, P)

    def untile(x: torch.Tensor, ch: int) -> torch.Tensor:
        x = x.reshape(C, th, tw, ts, ts, ch).permute(0, 5, 1, 3, 2, 4).reshape(C, ch, th * ts, tw * ts)
        return x[:, :, :H, :W]

    rgb_img = untile(rgb, 3)
    alpha = untile(acc.unsqueeze(-1), 1)
    depth = untile(dsum.unsqueeze(-1), 1) / alpha.clamp_min(1e-10)
    image = rgb_img + (1.0 - alpha) * bg[:, :, None, None]
    depth_var = _depth_variance(untile(torch.cat(outs_d2)[inv].unsqueeze(-1), 1), alpha, depth) if depth_variance else None
    return RenderOutput(image, alpha, depth, means2d, vis, depth_var)


def _depth_variance(depth_sq_sum: torch.Tensor, alpha: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Σ w z² / Σ w − depth² per pixel (C, 1, H, W; world units²) from the composited Σ w z², the alpha
    Σ w and the alpha-normalised depth; 0 where alpha is 0 (both renderers' ``depth_var``)."""
    return (depth_sq_sum / alpha.clamp_min(1e-10) - depth * depth).clamp_min(0.0) * (alpha > 0)


#: Columns of the renderer's per-splat table (``_render_torch``): means2d (pixels), conic (a, b, c),
#: log opacity, colour (3), camera-space depth, a constant 1; a 12th, the squared depth, with ``depth_variance``.
SPLAT_COLUMNS = 11


def _composite(tiles, idx, splats, local_px, tw, T, ts):
    """Front-to-back compositing of (n_tiles, K) depth-sorted Gaussian indices (-1 = padding).

    ``splats`` is the (C·N, ``SPLAT_COLUMNS`` [+ 1]) table of ``_render_torch``. Each Gaussian's exponent
    over a tile's P pixels is a quadratic in the pixel position, so it is written as (n, K, 6)
    coefficients, in tile-local pixels (small numbers, no cancellation), times the (P, 6) monomials
    [1, x, y, x², xy, y²] of the pixel centres: one batched matmul instead of the per-pixel differences.
    The opacity joins the constant term as log o (o·exp(−σ) = exp(log o − σ)), and padding gets −inf, so
    its alpha is 0 and it is skipped like any faint Gaussian. The coefficients are differentiated by
    autograd; the compositing itself by ``_CompositeTiles``'s hand-written backward.

    Returns rgb (n, P, 3), alpha (n, P), the weighted depth sum (n, P) and, with a 12th column, the
    weighted squared-depth sum (n, P) (else None). (σ < 0 cannot happen: the dilated 2D covariance is
    positive definite.)
    """
    s = splats[idx.clamp_min(0)]  # (n, K, columns)
    cam_tile = tiles % T
    origin = torch.stack([(cam_tile % tw) * ts, (cam_tile // tw) * ts], -1).to(splats.dtype)  # (n, 2)
    mx, my = (s[..., :2] - origin[:, None, :]).unbind(-1)  # (n, K) tile-local pixels
    a, b, c = s[..., 2], s[..., 3], s[..., 4]
    log_o = torch.where(idx >= 0, s[..., 5], torch.full_like(s[..., 5], -math.inf))
    # log o − σ(x, y) = log o − (a/2 (mx-x)² + c/2 (my-y)² + b (mx-x)(my-y)) as coefficients of the monomials
    coef = torch.stack([
        log_o - (0.5 * a * mx * mx + 0.5 * c * my * my + b * mx * my),
        a * mx + b * my,
        c * my + b * mx,
        -0.5 * a,
        -b,
        -0.5 * c,
    ], -1)  # (n, K, 6)
    x, y = local_px.unbind(-1)
    monomials = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], -1)  # (P, 6)
    out = _CompositeTiles.apply(coef, s[..., 6:], monomials)  # (n, P, 5 or 6): rgb, depth, alpha[, depth²]
    return out[..., :3], out[..., 4], out[..., 3], (out[..., 5] if splats.shape[-1] > SPLAT_COLUMNS else None)


class _CompositeTiles(torch.autograd.Function):
    """Alpha compositing of depth-sorted splats per tile, with a hand-written backward.

    Forward, per tile n, splat k (front to back) and pixel p (3DGS, Kerbl et al. 2023, classic rule):
        raw = exp(coef_k · m_p)                   (opacity × falloff; coef · m = log o − σ)
        α = min(0.999, raw), set to 0 where it is under 1/255
        T_k = Π_{j<k} (1 − α_j); splats after the one that would take T under 1e-4 are dropped
        w = α T;  out_p = Σ_k w_kp f_k            (f = colour, depth, 1 → rgb, depth sum, alpha)
    Backward (what gsplat's CUDA kernel computes, in tensors): with v_kp = f_k · ∂L/∂out_p,
        ∂L/∂α_k = T_k v_k − (Σ_{j>k} w_j v_j) / (1 − α_k),
    then through the clamp and the cut-off, ∂L/∂coef = (∂L/∂α · raw) @ m (autograd carries the
    constant term's share on to the opacity through log o), ∂L/∂f = Σ_p w ∂L/∂out. It saves the autograd
    graph's dozen (n, K, P) intermediates and their elementwise backward ops. The cut-off, the floor and
    the clamp's derivative are threshold and sign ops, not boolean masks (a comparison's boolean tensor and
    its conversion back cost several times an arithmetic op on the CPU). T_k is T_{k+1} / (1 − α_k),
    which is at least 0.001. ``tests/test_gaussians_render.py`` checks it with gradcheck.

    Inputs: coef (n, K, 6) (−inf constant for padding), feats (n, K, F), monomials (P, 6).
    Output: (n, P, F).
    """

    @staticmethod
    def forward(ctx, coef, feats, monomials):
        raw = torch.exp(torch.matmul(coef, monomials.T))  # (n, K, P)
        alpha = torch.threshold_(raw.clamp_(max=ALPHA_MAX), ALPHA_MIN, 0.0)  # 0 under 1/255
        kept = 1.0 - alpha
        after = torch.cumprod(kept, dim=1)  # T_{k+1}, the transmittance behind splat k
        trans = torch.threshold(after, T_MIN, 0.0).div_(kept)  # T_k = T_{k+1} / (1 − α_k), 0 once dropped
        w = alpha * trans
        out = torch.matmul(w.transpose(1, 2), feats)  # (n, P, F)
        ctx.save_for_backward(alpha, kept, trans, w, feats, monomials)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        alpha, kept, trans, w, feats, monomials = ctx.saved_tensors
        v = torch.matmul(feats, grad_out.transpose(1, 2))  # (n, K, P)
        from_k = torch.cumsum((w * v).flip(1), dim=1).flip(1)  # Σ_{j>=k} w_j v_j
        d = trans * v  # becomes ∂L/∂α, then ∂L/∂(coef·m) = ∂L/∂raw · raw
        d[:, :-1] -= from_k[:, 1:] / kept[:, :-1]  # − Σ_{j>k} w_j v_j / (1 − α_k)
        # ∂α/∂raw · raw is raw between the cut-off and the clamp, 0 outside: α · sign(0.999 − α)
        d.mul_((ALPHA_MAX - alpha).sign_().mul_(alpha))
        d_coef = torch.matmul(d, monomials)
        d_feats = torch.matmul(w, grad_out)
        return d_coef, d_feats, None
