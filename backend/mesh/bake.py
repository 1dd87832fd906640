"""Bake an initial texture: query a colour field at the surface point of every texel, dilate seams.

Texture convention (ARCHITECTURE.md): (H, W, C) with row 0 at the top; UVs per corner with the
origin at the bottom-left, so texel (r, c) is centred at uv = ((c + 0.5)/W, 1 − (r + 0.5)/H).

The mesh is rasterised in UV space with the same rasteriser as the renders (nvdiffrast on CUDA,
the PyTorch twin elsewhere): clip position (2u − 1, 1 − 2v, 0, 1) per corner puts texel row 0 at
v ≈ 1. Interpolating the corner positions gives the 3D surface point (Blender frame) of each
covered texel; ``color_fn`` gives its colour. Uncovered texels are filled from their covered
neighbours (seam dilation), so bilinear filtering and mipmaps never pull in background colour.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.mesh import rasterize as rz

ColorFn = Callable[[torch.Tensor], torch.Tensor]


def texel_surface_points(positions: torch.Tensor, faces: torch.Tensor, corner_uvs: torch.Tensor,
                         resolution: int | tuple[int, int], backend: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """World positions of the texel centres covered by the UV atlas.

    Args:
        positions: (V, 3) float vertex positions. faces: (F, 3) int. corner_uvs: (F*3, 2) float.
        resolution: texture side, or (H, W).

    Returns:
        points (H, W, 3) float (0 where uncovered) and mask (H, W) bool.
    """
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    device = positions.device
    uv = corner_uvs.to(device=device, dtype=torch.float32)
    nF = faces.shape[0]
    if uv.shape != (nF * 3, 2):
        raise ValueError(f"corner_uvs must be (F*3, 2) = ({nF * 3}, 2), got {tuple(uv.shape)}")
    clip = torch.stack([uv[:, 0] * 2.0 - 1.0, 1.0 - uv[:, 1] * 2.0, torch.zeros_like(uv[:, 0]),
                        torch.ones_like(uv[:, 0])], dim=1)
    tri = torch.arange(nF * 3, device=device, dtype=torch.int32).reshape(nF, 3)
    rast = rz.rasterize(clip, tri, (H, W), backend=backend)
    corner_pos = positions[faces.long().reshape(-1)].float()
    points = rz.interpolate(corner_pos, rast, tri, backend=backend)[0]
    return points, rast[0, ..., 3] > 0


def texel_surface_points_extrapolated(positions: torch.Tensor, faces: torch.Tensor, corner_uvs: torch.Tensor,
                                      resolution: int | tuple[int, int], reach: int = 2,
                                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`texel_surface_points` plus the padding texels within ``reach`` texels of a chart.

    A padding texel takes the triangle of its nearest covered texel and extends that triangle's
    (affine) UV → 3D map to its own centre, so it gets the 3D point just beyond the chart's edge:
    the neighbouring face across the seam. Bilinear samples at a chart border then read colours of
    the right place in 3D on both sides of a seam (a seam-aware bake).

    Returns:
        points (H, W, 3) and mask (H, W) bool of the texels that have a point.
    """
    from scipy.ndimage import distance_transform_edt

    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    device = positions.device
    uv = corner_uvs.to(device=device, dtype=torch.float32)
    nF = faces.shape[0]
    clip = torch.stack([uv[:, 0] * 2.0 - 1.0, 1.0 - uv[:, 1] * 2.0, torch.zeros_like(uv[:, 0]),
                        torch.ones_like(uv[:, 0])], dim=1)
    tri = torch.arange(nF * 3, device=device, dtype=torch.int32).reshape(nF, 3)
    rast = rz.rasterize(clip, tri, (H, W), backend=backend)[0]
    corner_pos = positions[faces.long().reshape(-1)].float()
    points = rz.interpolate(corner_pos, rast[None], tri, backend=backend)[0]
    covered = rast[..., 3] > 0
    dist, (rows, cols) = distance_transform_edt(~covered.cpu().numpy(), return_indices=True)
    near = torch.as_tensor((dist > 0) & (dist <= reach), device=device)
    if bool(near.any()):
        rr = torch.as_tensor(rows, device=device)[near]
        cc = torch.as_tensor(cols, device=device)[near]
        fid = rast[rr, cc, 3].long() - 1
        # texel centre of each padding texel in UV (origin bottom-left)
        pr, pc = torch.nonzero(near, as_tuple=True)
        u = (pc.float() + 0.5) / W
        v = 1.0 - (pr.float() + 0.5) / H
        t_uv = uv.reshape(nF, 3, 2)[fid]  # (P, 3, 2)
        a, b, c = t_uv[:, 0], t_uv[:, 1], t_uv[:, 2]
        den = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
        den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
        l1 = ((u - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (v - a[:, 1])) / den
        l2 = ((b[:, 0] - a[:, 0]) * (v - a[:, 1]) - (u - a[:, 0]) * (b[:, 1] - a[:, 1])) / den
        l0 = 1.0 - l1 - l2
        p3 = corner_pos.reshape(nF, 3, 3)[fid]
        points[pr, pc] = l0[:, None] * p3[:, 0] + l1[:, None] * p3[:, 1] + l2[:, None] * p3[:, 2]
    return points, covered | near


def dilate(texture: torch.Tensor, mask: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Seam dilation: every uncovered texel within ``iterations`` texels of a chart takes the
    colour of its nearest covered texel (Euclidean distance transform); texels farther away get
    the mean covered colour.

    Args:
        texture: (H, W, C) float. mask: (H, W) bool, True where the texture is valid.
    """
    from scipy.ndimage import distance_transform_edt

    if not bool(mask.any()) or bool(mask.all()):
        return texture
    m = mask.detach().cpu().numpy()
    dist, (ri, ci) = distance_transform_edt(~m, return_indices=True)
    ri = torch.as_tensor(ri, device=texture.device)
    ci = torch.as_tensor(ci, device=texture.device)
    out = texture[ri, ci]
    far = torch.as_tensor(dist > iterations, device=texture.device)
    if bool(far.any()):
        out = torch.where(far.unsqueeze(-1), texture[mask].mean(dim=0), out)
    return out


@torch.no_grad()
def bake_texture(positions: torch.Tensor, faces: torch.Tensor, corner_uvs: torch.Tensor, color_fn: ColorFn,
                 resolution: int, dilate_iterations: int = 8, backend: str = "auto",
                 chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Texture whose texels hold ``color_fn`` at their surface points, seams dilated.

    Args:
        positions: (V, 3) Blender-frame vertex positions. faces: (F, 3). corner_uvs: (F*3, 2).
        color_fn: (P, 3) world points → (P, 3) colours in [0, 1].
        resolution: texture side in texels.

    Returns:
        texture (H, W, 3) float32 in [0, 1] (row 0 at the top), mask (H, W) of covered texels.
    """
    points, mask = texel_surface_points(positions, faces, corner_uvs, resolution, backend)
    H, W = mask.shape
    tex = torch.zeros(H, W, 3, dtype=torch.float32, device=positions.device)
    flat = points[mask]
    cols = [color_fn(flat[i:i + chunk]).float() for i in range(0, flat.shape[0], chunk)]
    if cols:
        tex[mask] = torch.cat(cols).clamp(0.0, 1.0)
    return dilate(tex, mask, dilate_iterations), mask


def _part1by2(x: torch.Tensor) -> torch.Tensor:
    """Spread the low 10 bits of x so that bit i lands on bit 3i."""
    x = x & 0x3FF
    x = (x | (x << 16)) & 0xFF0000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    x = (x | (x << 2)) & 0x09249249
    return x


def _morton3(q: torch.Tensor) -> torch.Tensor:
    """(P, 3) integer cell coordinates in [0, 1023] → (P,) Morton codes."""
    return _part1by2(q[:, 0]) | (_part1by2(q[:, 1]) << 1) | (_part1by2(q[:, 2]) << 2)


def gaussian_color_fn(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                      colors: torch.Tensor, k: int = 16, block_points: int = 512, cutoff: float = 3.0,
                      max_dense: int = 0) -> ColorFn:
    """Colour field of a set of 3D Gaussians, for :func:`bake_texture`.

    The colour at x is the average of the colours of nearby Gaussians weighted by
    softmax(log o_i − ½·(x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i)): each Gaussian's opacity-scaled density at x,
    normalised, so a point far from every Gaussian still takes the colour of the most plausible
    one. "Nearby" is the k nearest centres among the Gaussians whose box overlaps the point's
    block, or every such Gaussian when there are at most ``max_dense`` of them (off by default:
    on the CPU the k-nearest path measured faster).

    Points are sorted into spatially coherent blocks of ``block_points``; each block only looks at
    the Gaussians whose ``cutoff``-sigma box overlaps the block's bounding box (all Gaussians when
    fewer than k overlap), so the cost is ~ points × local Gaussians, not points × all Gaussians.

    Args:
        means (N, 3), quats (N, 4) (w, x, y, z), scales (N, 3) activated std devs (world units),
        opacities (N,) in (0, 1], colors (N, 3) in [0, 1]; all on one device.
    """
    from backend.gaussians.render import quat_to_rotmat

    means = means.detach().float()
    N = means.shape[0]
    if N == 0:
        raise ValueError("cannot bake from an empty set of Gaussians")
    R = quat_to_rotmat(torch.nn.functional.normalize(quats.detach().float(), dim=-1))  # (N, 3, 3)
    sc = scales.detach().float().clamp(min=1e-6)
    inv_s = 1.0 / sc
    log_o = torch.log(opacities.detach().float().reshape(-1).clamp(min=1e-6))
    cols = colors.detach().float()
    reach = cutoff * sc.max(dim=-1).values
    lo_g, hi_g = means - reach[:, None], means + reach[:, None]
    kk = min(k, N)

    def weighted(p: torch.Tensor, cand: torch.Tensor | None) -> torch.Tensor:
        if cand is not None and cand.numel() <= max_dense:
            # every overlapping Gaussian, shared by the whole block (no per-pair gathers)
            delta = p[:, None, :] - means[cand][None]  # (P, n, 3)
            local = torch.einsum("pni,nij->pnj", delta, R[cand])
            m = ((local * inv_s[cand][None]) ** 2).sum(-1)
            w = torch.softmax(log_o[cand][None] - 0.5 * m, dim=1)
            return w @ cols[cand]
        else:
            mu = means if cand is None else means[cand]
            kn = min(kk, mu.shape[0])
            idx = torch.cdist(p, mu).topk(kn, dim=1, largest=False).indices  # (P, k) into mu
            if cand is not None:
                idx = cand[idx]
        delta = p[:, None, :] - means[idx]  # (P, k, 3)
        local = torch.einsum("pki,pkij->pkj", delta, R[idx])  # coordinates along the Gaussian's axes
        m = ((local * inv_s[idx]) ** 2).sum(-1)
        w = torch.softmax(log_o[idx] - 0.5 * m, dim=1)
        return (w.unsqueeze(-1) * cols[idx]).sum(1)

    def fn(points: torch.Tensor) -> torch.Tensor:
        points = points.float()
        P = points.shape[0]
        if P == 0:
            return points.new_zeros(0, 3)
        # spatial sort along a Morton (Z-order) curve: consecutive blocks are compact patches
        lo, hi = points.min(0).values, points.max(0).values
        q = ((points - lo) / (hi - lo).clamp(min=1e-9) * 1023.0).long().clamp(0, 1023)
        order = torch.argsort(_morton3(q))
        out = torch.empty(P, 3, device=points.device)
        for s in range(0, P, block_points):
            sel = order[s:s + block_points]
            p = points[sel]
            blo, bhi = p.min(0).values, p.max(0).values
            cand = ((hi_g >= blo) & (lo_g <= bhi)).all(-1).nonzero().squeeze(-1)
            out[sel] = weighted(p, cand if cand.numel() >= kk else None)
        return out

    return fn
