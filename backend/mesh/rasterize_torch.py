"""Pure-PyTorch differentiable triangle rasteriser in the shape of nvdiffrast's API.

It runs anywhere torch runs (the CPU path of the fine stage) and is the reference the
nvdiffrast backend is compared with.

Conventions (identical to nvdiffrast's, see ``backend/mesh/rasterize.py``)
-------------------------------------------------------------------------
* Input positions are homogeneous clip coordinates (x, y, z, w). NDC = (x/w, y/w, z/w).
* Pixel (row i, column j) of an H×W image has its centre at NDC
  x = (2j + 1)/W − 1 and y = (2i + 1)/H − 1: row 0 is at NDC y = −1. (``clip_from_cameras``
  in ``rasterize.py`` maps OpenCV's +Y-down camera so that row 0 is the top of the picture.)
* Output ``rast`` (B, H, W, 4) float32: (u, v, z/w, triangle_id + 1), with 0 everywhere in
  empty pixels. (u, v) are perspective-correct barycentrics: an attribute interpolates as
  u·a0 + v·a1 + (1 − u − v)·a2. Smaller z/w is nearer; the nearest triangle wins.
* No back-face culling. Triangles with a vertex at w ≤ 0 (behind the camera) are dropped and
  fragments outside −1 ≤ z/w ≤ 1 are discarded (nvdiffrast clips such triangles instead; the
  pipeline keeps geometry inside the frustum, where both agree).

Differentiability: ``interpolate`` is differentiable w.r.t. the attributes and the
barycentrics, ``texture`` w.r.t. the texture and the UVs, and the barycentric channels of
``rasterize`` w.r.t. the vertex positions (recomputed with autograd for the winning triangle
of each pixel). Like nvdiffrast without ``antialias``, visibility itself has no gradient.

Algorithm: for every (image, triangle) pair, the pixel centres inside its screen bounding box
are enumerated as candidate fragments (chunked so that at most ``max_candidates`` exist at a
time), tested with edge functions, depth-reduced with ``scatter_reduce(amin)`` into a z-buffer,
and ties broken towards the higher triangle id. Cost ~ the sum of bounding-box areas, which
suits the many small triangles of extracted meshes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_MAX_CANDIDATES = 1 << 22


def _check_inputs(pos: torch.Tensor, tri: torch.Tensor, resolution) -> tuple[torch.Tensor, int, int]:
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    if pos.ndim != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be (B, V, 4) or (V, 4) clip coordinates, got {tuple(pos.shape)}")
    if tri.ndim != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be (F, 3), got {tuple(tri.shape)}")
    if tri.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tri must be int32 or int64, got {tri.dtype}")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= pos.shape[1]):
        raise ValueError(f"tri indices out of range [0, {pos.shape[1]})")
    H, W = int(resolution[0]), int(resolution[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"resolution must be positive (H, W), got {resolution}")
    return pos, H, W


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
              max_candidates: int = DEFAULT_MAX_CANDIDATES) -> torch.Tensor:
    """Rasterise triangles.

    Args:
        pos: (B, V, 4) or (V, 4) float clip-space positions (a 2-D input means B = 1).
        tri: (F, 3) int32/int64 vertex indices.
        resolution: (H, W) output size in pixels.
        max_candidates: bound on candidate fragments held at once (memory ~ 40 bytes each).

    Returns:
        rast: (B, H, W, 4) (u, v, z/w, triangle_id + 1) in pos's dtype (float32 or float64);
        zeros where empty.
    """
    pos, H, W = _check_inputs(pos, tri, resolution)
    B = pos.shape[0]
    device = pos.device
    tri_l = tri.long()
    nF = tri_l.shape[0]
    out_dtype = pos.dtype if pos.dtype in (torch.float32, torch.float64) else torch.float32
    rast = torch.zeros(B, H, W, 4, dtype=out_dtype, device=device)
    if nF == 0:
        return rast

    with torch.no_grad():
        p = pos.detach().float()
        w = p[..., 3]
        safe_w = torch.where(w.abs() > 1e-12, w, torch.ones_like(w))
        sx = (p[..., 0] / safe_w + 1.0) * (0.5 * W)  # continuous pixel coords, centres at j + 0.5
        sy = (p[..., 1] / safe_w + 1.0) * (0.5 * H)
        sz = p[..., 2] / safe_w
        # per (b, f) triangle screen data: (B, F, 3)
        tx, ty, tz, tw = sx[:, tri_l], sy[:, tri_l], sz[:, tri_l], w[:, tri_l]
        area = (tx[..., 1] - tx[..., 0]) * (ty[..., 2] - ty[..., 0]) - \
               (tx[..., 2] - tx[..., 0]) * (ty[..., 1] - ty[..., 0])
        valid = (tw > 1e-8).all(-1) & (area.abs() > 1e-12)
        valid &= (tz.min(-1).values <= 1.0) & (tz.max(-1).values >= -1.0)
        # pixel index ranges of the bounding box: centres j + 0.5 inside [min, max]
        x0 = torch.ceil(tx.min(-1).values - 0.5).clamp(min=0)
        x1 = torch.floor(tx.max(-1).values - 0.5).clamp(max=W - 1)
        y0 = torch.ceil(ty.min(-1).values - 0.5).clamp(min=0)
        y1 = torch.floor(ty.max(-1).values - 0.5).clamp(max=H - 1)
        nx = (x1 - x0 + 1).clamp(min=0)
        ny = (y1 - y0 + 1).clamp(min=0)
        valid &= (nx > 0) & (ny > 0)
        counts = torch.where(valid, nx * ny, torch.zeros_like(nx)).long().reshape(-1)  # (B*F,)

        zbuf = torch.full((B * H * W,), float("inf"), device=device)
        idbuf = torch.full((B * H * W,), -1, dtype=torch.long, device=device)
        units = torch.nonzero(counts > 0).squeeze(1)
        if units.numel():
            csum = torch.cumsum(counts[units], 0)
            start = 0
            total = int(csum[-1])
            done = 0
            while done < total:
                # next chunk: units whose cumulative count stays within budget (at least one unit)
                end = int(torch.searchsorted(csum, torch.tensor(done + max_candidates, device=device),
                                             right=True))
                end = max(end, start + 1)
                chunk = units[start:end]
                _raster_chunk(chunk, counts[chunk], nF, H, W, tx, ty, tz, area, x0, y0, nx, zbuf, idbuf)
                done = int(csum[end - 1])
                start = end

        hit = idbuf >= 0
        pix = torch.nonzero(hit).squeeze(1)
        unit = idbuf[pix]
    if pix.numel() == 0:
        return rast

    # differentiable recompute of the winners' barycentrics
    b_idx = pix // (H * W)
    rem = pix % (H * W)
    py = (rem // W).to(pos.dtype) + 0.5
    px = (rem % W).to(pos.dtype) + 0.5
    f_idx = unit % nF
    verts = pos[b_idx.unsqueeze(1), tri_l[f_idx]]  # (P, 3, 4)
    vw = verts[..., 3]
    vx = (verts[..., 0] / vw + 1.0) * (0.5 * W)
    vy = (verts[..., 1] / vw + 1.0) * (0.5 * H)
    vz = verts[..., 2] / vw
    l0, l1, l2 = _screen_barycentrics(vx, vy, px, py)
    q0, q1, q2 = l0 / vw[:, 0], l1 / vw[:, 1], l2 / vw[:, 2]
    qs = q0 + q1 + q2
    u = q0 / qs
    v = q1 / qs
    z = l0 * vz[:, 0] + l1 * vz[:, 1] + l2 * vz[:, 2]
    vals = torch.stack([u, v, z, (f_idx + 1).to(pos.dtype)], dim=1).to(out_dtype)
    flat = rast.reshape(B * H * W, 4)
    flat = flat.index_put((pix,), vals)
    return flat.reshape(B, H, W, 4)


def _screen_barycentrics(vx, vy, px, py):
    """Screen-space barycentrics (l0, l1, l2) of points (px, py) in triangles (vx, vy) (P, 3)."""
    area = (vx[:, 1] - vx[:, 0]) * (vy[:, 2] - vy[:, 0]) - (vx[:, 2] - vx[:, 0]) * (vy[:, 1] - vy[:, 0])
    l0 = ((vx[:, 1] - px) * (vy[:, 2] - py) - (vx[:, 2] - px) * (vy[:, 1] - py)) / area
    l1 = ((vx[:, 2] - px) * (vy[:, 0] - py) - (vx[:, 0] - px) * (vy[:, 2] - py)) / area
    return l0, l1, 1.0 - l0 - l1


def _raster_chunk(chunk, counts, nF, H, W, tx, ty, tz, area, x0, y0, nx, zbuf, idbuf) -> None:
    """Depth-test the candidate fragments of the (b, f) units in ``chunk`` into zbuf/idbuf (in place)."""
    device = chunk.device
    rep = torch.repeat_interleave(torch.arange(chunk.numel(), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(rep.numel(), device=device) - first[rep]
    u = chunk[rep]  # (b*F + f) unit ids, one per candidate
    b = u // nF
    f = u % nF
    nxu = nx.reshape(-1)[u].long()
    cx = x0.reshape(-1)[u].long() + local % nxu
    cy = y0.reshape(-1)[u].long() + local // nxu
    px = cx.float() + 0.5
    py = cy.float() + 0.5
    X = tx[b, f]
    Y = ty[b, f]
    a = area[b, f]
    l0 = ((X[:, 1] - px) * (Y[:, 2] - py) - (X[:, 2] - px) * (Y[:, 1] - py)) / a
    l1 = ((X[:, 2] - px) * (Y[:, 0] - py) - (X[:, 0] - px) * (Y[:, 2] - py)) / a
    l2 = 1.0 - l0 - l1
    eps = -1e-6
    inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    Z = tz[b, f]
    z = l0 * Z[:, 0] + l1 * Z[:, 1] + l2 * Z[:, 2]
    inside &= (z >= -1.0) & (z <= 1.0)
    if not bool(inside.any()):
        return
    z = z[inside]
    u = u[inside]
    pix = b[inside] * (H * W) + cy[inside] * W + cx[inside]
    cz = torch.full_like(zbuf, float("inf")).scatter_reduce(0, pix, z, "amin")
    win = z == cz[pix]
    cid = torch.full_like(idbuf, -1).scatter_reduce(0, pix[win], u[win], "amax")
    better = cz < zbuf
    zbuf[better] = cz[better]
    idbuf[better] = cid[better]


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes over the rasterised image.

    Args:
        attr: (V, C) or (B, V, C) float attributes (B = 1 broadcasts).
        rast: (B, H, W, 4) output of ``rasterize``.
        tri: (F, 3) int indices into ``attr`` (may differ from the rasterised index buffer, e.g.
            per-corner UVs, as long as F matches).

    Returns:
        (B, H, W, C) float; zeros in empty pixels.
    """
    if attr.ndim == 2:
        attr = attr.unsqueeze(0)
    if attr.ndim != 3:
        raise ValueError(f"attr must be (V, C) or (B, V, C), got {tuple(attr.shape)}")
    B, H, W, _ = rast.shape
    if attr.shape[0] not in (1, B):
        raise ValueError(f"attr batch {attr.shape[0]} does not match rast batch {B}")
    tid = rast[..., 3].long() - 1
    mask = tid >= 0
    idx = tri.long()[tid.clamp(min=0)]  # (B, H, W, 3)
    if attr.shape[0] == 1:
        a = attr[0][idx]  # (B, H, W, 3, C)
    else:
        a = attr[torch.arange(B, device=attr.device).view(B, 1, 1, 1), idx]
    u = rast[..., 0:1]
    v = rast[..., 1:2]
    out = u * a[..., 0, :] + v * a[..., 1, :] + (1.0 - u - v) * a[..., 2, :]
    return out * mask.unsqueeze(-1).to(out.dtype)


def rasterize_with_db(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
                      max_candidates: int = DEFAULT_MAX_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """``rasterize`` plus ``rast_db`` (B, H, W, 4) = (du/dX, du/dY, dv/dX, dv/dY), the screen-space
    derivatives (per pixel) of the perspective-correct barycentrics, as nvdiffrast's
    ``rasterize(..., grad_db=True)``. Central differences of the winning triangle's barycentric
    formula at ±½ pixel (exact for affine maps, second-order accurate under perspective); no gradient
    flows through ``rast_db``. Zeros in empty pixels."""
    rast = rasterize(pos, tri, resolution, max_candidates)
    pos3, H, W = _check_inputs(pos, tri, resolution)
    B = pos3.shape[0]
    db = torch.zeros(B, H, W, 4, dtype=rast.dtype, device=rast.device)
    with torch.no_grad():
        tid = rast[..., 3].long() - 1
        pix = torch.nonzero(tid.reshape(-1) >= 0).squeeze(1)
        if pix.numel() == 0:
            return rast, db
        b_idx = pix // (H * W)
        rem = pix % (H * W)
        py = (rem // W).to(pos3.dtype) + 0.5
        px = (rem % W).to(pos3.dtype) + 0.5
        verts = pos3.detach()[b_idx.unsqueeze(1), tri.long()[tid.reshape(-1)[pix]]]  # (P, 3, 4)
        vw = verts[..., 3]
        vx = (verts[..., 0] / vw + 1.0) * (0.5 * W)
        vy = (verts[..., 1] / vw + 1.0) * (0.5 * H)

        def uv_at(x, y):
            l0, l1, l2 = _screen_barycentrics(vx, vy, x, y)
            q0, q1, q2 = l0 / vw[:, 0], l1 / vw[:, 1], l2 / vw[:, 2]
            qs = q0 + q1 + q2
            return q0 / qs, q1 / qs

        ux1, vx1 = uv_at(px + 0.5, py)
        ux0, vx0 = uv_at(px - 0.5, py)
        uy1, vy1 = uv_at(px, py + 0.5)
        uy0, vy0 = uv_at(px, py - 0.5)
        vals = torch.stack([ux1 - ux0, uy1 - uy0, vx1 - vx0, vy1 - vy0], dim=1).to(db.dtype)
        db = db.reshape(B * H * W, 4).index_put((pix,), vals).reshape(B, H, W, 4)
    return rast, db


def interpolate_da(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                   rast_db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``interpolate`` plus the attributes' screen-space derivatives (nvdiffrast's
    ``interpolate(..., rast_db=rast_db, diff_attrs='all')``): out_da (B, H, W, 2C) ordered
    (da0/dX, da0/dY, da1/dX, da1/dY, ...). Zeros in empty pixels."""
    out = interpolate(attr, rast, tri)
    if attr.ndim == 2:
        attr = attr.unsqueeze(0)
    B, H, W, _ = rast.shape
    tid = rast[..., 3].long() - 1
    mask = (tid >= 0).unsqueeze(-1)
    idx = tri.long()[tid.clamp(min=0)]
    a = attr[0][idx] if attr.shape[0] == 1 else attr[torch.arange(B, device=attr.device).view(B, 1, 1, 1), idx]
    d0 = a[..., 0, :] - a[..., 2, :]  # (B, H, W, C)
    d1 = a[..., 1, :] - a[..., 2, :]
    dX = rast_db[..., 0:1] * d0 + rast_db[..., 2:3] * d1
    dY = rast_db[..., 1:2] * d0 + rast_db[..., 3:4] * d1
    da = torch.stack([dX, dY], dim=-1).reshape(B, H, W, -1)
    return out, da * mask.to(da.dtype)


FILTER_MODES = ("linear", "nearest", "linear-mipmap-linear")


def mip_lod(uv_da: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) level of detail log2(major axis of the UV footprint, in texels) for
    ``uv_da`` (du/dX, du/dY, dv/dX, dv/dY) on a ``height`` × ``width`` texture (isotropic
    trilinear filtering along the footprint's major axis, as nvdiffrast's linear-mipmap-linear)."""
    ux, uy = uv_da[..., 0] * width, uv_da[..., 1] * width
    vx, vy = uv_da[..., 2] * height, uv_da[..., 3] * height
    # eigenvalues of J Jᵀ with J = [[ux, uy], [vx, vy]]
    a = ux * ux + uy * uy
    c = vx * vx + vy * vy
    b = ux * vx + uy * vy
    major = 0.5 * (a + c) + torch.sqrt((0.25 * (a - c) ** 2 + b * b).clamp(min=0.0))
    return 0.5 * torch.log2(major.clamp(min=1e-20))


def mip_pyramid(img: torch.Tensor, max_mip_level: int | None = None) -> list[torch.Tensor]:
    """[level 0 = img (B, C, H, W), level 1 (2×2 box filtered), ...] down to 1 texel per side (or
    ``max_mip_level`` levels below the base)."""
    levels = [img]
    while min(levels[-1].shape[-2:]) > 1 and (max_mip_level is None or len(levels) <= max_mip_level):
        levels.append(F.avg_pool2d(levels[-1], 2, ceil_mode=True))
    return levels


def _sample(img: torch.Tensor, uv: torch.Tensor, filter_mode: str, boundary_mode: str) -> torch.Tensor:
    """grid_sample of (B, C, Ht, Wt) at (B, H, W, 2) UVs → (B, C, H, W)."""
    if boundary_mode == "wrap":
        Ht, Wt = img.shape[-2:]
        uv = uv - torch.floor(uv)
        # pad one texel on each side by wrapping, then sample inside the padded image
        img = torch.cat([img[..., -1:], img, img[..., :1]], dim=3)
        img = torch.cat([img[..., -1:, :], img, img[..., :1, :]], dim=2)
        uv = torch.stack([(uv[..., 0] * Wt + 1.0) / (Wt + 2), (uv[..., 1] * Ht + 1.0) / (Ht + 2)], dim=-1)
    grid = uv * 2.0 - 1.0
    return F.grid_sample(img, grid.to(img.dtype), mode="nearest" if filter_mode == "nearest" else "bilinear",
                         padding_mode="border", align_corners=False)


def texture(tex: torch.Tensor, uv: torch.Tensor, filter_mode: str = "linear",
            boundary_mode: str = "clamp", uv_da: torch.Tensor | None = None,
            max_mip_level: int | None = None) -> torch.Tensor:
    """Sample a texture at per-pixel UVs (nvdiffrast's convention).

    Args:
        tex: (B, Ht, Wt, C) or (Ht, Wt, C) float texture (B = 1 broadcasts). Texel (r, c) has its
            centre at uv = ((c + 0.5)/Wt, (r + 0.5)/Ht): v = 0 is the FIRST row of ``tex``.
        uv: (B, H, W, 2) float texture coordinates.
        filter_mode: 'linear' (bilinear), 'nearest' or 'linear-mipmap-linear' (trilinear over a
            2×2-box mip pyramid at the level of detail of ``uv_da``; see :func:`mip_lod`).
        boundary_mode: 'clamp' or 'wrap'.
        uv_da: (B, H, W, 4) UV derivatives per pixel (du/dX, du/dY, dv/dX, dv/dY), needed by
            'linear-mipmap-linear' (from :func:`interpolate_da`).
        max_mip_level: deepest mip level used (None: down to 1 texel).

    Returns:
        (B, H, W, C) float.
    """
    if tex.ndim == 3:
        tex = tex.unsqueeze(0)
    if tex.ndim != 4 or uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(f"tex must be (B, Ht, Wt, C) and uv (B, H, W, 2); got {tuple(tex.shape)}, "
                         f"{tuple(uv.shape)}")
    if filter_mode not in FILTER_MODES:
        raise ValueError(f"filter_mode must be one of {FILTER_MODES}, got {filter_mode!r}")
    if boundary_mode not in ("clamp", "wrap"):
        raise ValueError(f"boundary_mode must be 'clamp' or 'wrap', got {boundary_mode!r}")
    B = uv.shape[0]
    if tex.shape[0] not in (1, B):
        raise ValueError(f"tex batch {tex.shape[0]} does not match uv batch {B}")
    img = tex.permute(0, 3, 1, 2).expand(B, -1, -1, -1)
    if filter_mode != "linear-mipmap-linear":
        return _sample(img, uv, filter_mode, boundary_mode).permute(0, 2, 3, 1)
    if uv_da is None or uv_da.shape[:3] != uv.shape[:3] or uv_da.shape[-1] != 4:
        raise ValueError("filter_mode 'linear-mipmap-linear' needs uv_da (B, H, W, 4)")
    levels = mip_pyramid(img, max_mip_level)
    lod = mip_lod(uv_da, tex.shape[1], tex.shape[2]).clamp(0.0, float(len(levels) - 1))
    out = None
    for k, level in enumerate(levels):
        w = (1.0 - (lod - k).abs()).clamp(min=0.0).unsqueeze(1)  # (B, 1, H, W) hat weights
        if k > 0 and not bool((w > 0).any()):
            continue
        sample = _sample(level, uv, "linear", boundary_mode) * w
        out = sample if out is None else out + sample
    return out.permute(0, 2, 3, 1)
