"""Preview / coarse meshes from 3D Gaussians: density grid → marching cubes → clean-up → decimation.

Density at a world point x (Blender frame, the optimisation cube [-bound, bound]^3):

    d(x) = sum_i o_i exp(-0.5 (x - mu_i)^T Sigma_i^-1 (x - mu_i))

evaluated Gaussian by Gaussian on the grid cells inside each one's 3-sigma box (chunks of Gaussians
with the same box size, so memory stays bounded) and scattered into the grid; ``evaluate_gaussians``
is the exact point-wise form (points in spatially coherent blocks), used by tests and small queries.
Enclosed pockets below the threshold are filled first (``fill_cavities``: no hidden inner
shells), and with ``carve`` also the cells no camera of the optimisation saw empty
(``backend.mesh.carve``: the hollow under an object seen only from above). The iso-surface
``d = threshold`` (marching cubes, scikit-image) is kept to its largest connected
components, decimated to a face budget (fast-simplification) and coloured per vertex with the
density-weighted mean colour of the Gaussians (a colour grid splatted alongside, sampled trilinearly).
The density grid of the same Gaussians at the same grid is remembered (``backend.mesh.memo``): a job
meshes its final Gaussians twice.

``extract_mesh(gaussians, grid_resolution, face_budget, threshold)`` → ``MeshPayload`` (positions in
world units of the optimisation frame; ``fit_to_size`` scales to metres).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from backend.mesh.export import compute_vertex_normals
from backend.mesh.memo import GaussianMemo
from protocol.mesh import MeshPayload

log = logging.getLogger(__name__)


class EmptyMeshError(RuntimeError):
    """The Gaussians have no density anywhere near the threshold (nothing to mesh)."""


def _as_gaussians(gaussians):
    """Accept a GaussianModel or activated Gaussians; return detached float32 activated Gaussians."""
    g = gaussians.activated() if hasattr(gaussians, "activated") else gaussians
    return g.detach()


def _precision_factors(g):
    from backend.gaussians.render import quat_to_rotmat

    R = quat_to_rotmat(g.quats.float())  # (N, 3, 3), columns = principal axes
    inv_s = 1.0 / g.scales.float().clamp_min(1e-8)
    return R, inv_s


@torch.no_grad()
def evaluate_gaussians(points: torch.Tensor, gaussians, with_color: bool = False, block_points: int = 4096,
                       block_gaussians: int = 1024, cutoff: float = 3.0):
    """Density (M,) and optionally density-weighted colour (M, 3) of Gaussians at world points (M, 3).

    Points should be spatially coherent in chunks of ``block_points`` (grid blocks, sorted vertices):
    each chunk meets only Gaussians whose ``cutoff``-sigma box overlaps the chunk's bounding box.
    Colour is the weighted mean (0.5 grey where the density is 0).
    """
    g = _as_gaussians(gaussians)
    device = g.means.device
    points = points.to(device=device, dtype=torch.float32)
    means = g.means.float()
    R, inv_s = _precision_factors(g)
    op = g.opacities.float()
    col = g.colors.float()
    reach = cutoff * g.scales.float().max(dim=-1).values  # (N,)
    lo_g, hi_g = means - reach[:, None], means + reach[:, None]
    M = points.shape[0]
    density = torch.zeros(M, device=device)
    color_sum = torch.zeros(M, 3, device=device) if with_color else None
    for s in range(0, M, block_points):
        pts = points[s:s + block_points]
        lo, hi = pts.min(0).values, pts.max(0).values
        near = ((hi_g >= lo) & (lo_g <= hi)).all(dim=-1).nonzero().squeeze(-1)
        for t in range(0, near.numel(), block_gaussians):
            idx = near[t:t + block_gaussians]
            d = pts[:, None, :] - means[idx][None]                     # (m, n, 3)
            y = torch.einsum("mnj,njk->mnk", d, R[idx]) * inv_s[idx][None]
            w = op[idx][None] * torch.exp(-0.5 * (y * y).sum(-1))     # (m, n)
            density[s:s + block_points] += w.sum(-1)
            if with_color:
                color_sum[s:s + block_points] += w @ col[idx]
    if not with_color:
        return density
    color = torch.where(density[:, None] > 1e-12, color_sum / density[:, None].clamp_min(1e-12),
                        torch.full_like(color_sum, 0.5))
    return density, color


@torch.no_grad()
def density_grid(gaussians, resolution: int = 64, bound: float = 1.0, with_color: bool = False,
                 cutoff: float = 3.0, max_elements: int = 1 << 22):
    """Density on the cell-centred grid of [-bound, bound]^3, indexed [ix, iy, iz].

    Each Gaussian is evaluated only on the grid cells inside its ``cutoff``-sigma box, in chunks of
    Gaussians with the same box size (at most ``max_elements`` evaluations per chunk), and
    scattered into the grid; cost ~ N × box cells instead of N × R^3.

    Returns:
        (R, R, R) float32 numpy density, and with ``with_color`` also the (R, R, R, 3) float32
        density-weighted mean colour (0.5 grey where the density is 0).
    """
    g = _as_gaussians(gaussians)
    device = g.means.device
    R = int(resolution)
    h = 2.0 * bound / R
    means = g.means.float()
    Rm, inv_s = _precision_factors(g)
    op = g.opacities.float()
    col = g.colors.float()
    reach = cutoff * g.scales.float().max(dim=-1).values
    half = torch.clamp(torch.ceil(reach / h), 1, R).long()  # box half-width in cells
    centre = torch.floor((means + bound) / h).long()  # cell containing the mean
    acc = torch.zeros(R * R * R, 4 if with_color else 1, device=device)  # density (+ colour sum)
    inside = ((means > -bound - reach[:, None]) & (means < bound + reach[:, None])).all(-1)
    for k in torch.unique(half[inside]).tolist():
        idx_k = (inside & (half == k)).nonzero().squeeze(-1)
        r = torch.arange(-k, k + 1, device=device)
        stencil = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (S, 3)
        S = stencil.shape[0]
        step = max(1, max_elements // S)
        for t in range(0, idx_k.numel(), step):
            idx = idx_k[t:t + step]
            cells = centre[idx][:, None, :] + stencil[None]  # (n, S, 3)
            valid = ((cells >= 0) & (cells < R)).all(-1)
            pos = -bound + h * (cells.float() + 0.5)
            d = pos - means[idx][:, None, :]
            y = torch.einsum("nsj,njk->nsk", d, Rm[idx]) * inv_s[idx][:, None, :]
            w = op[idx][:, None] * torch.exp(-0.5 * (y * y).sum(-1)) * valid
            flat = (cells[..., 0].clamp(0, R - 1) * R + cells[..., 1].clamp(0, R - 1)) * R + cells[..., 2].clamp(0, R - 1)
            if with_color:
                vals = torch.cat([w[..., None], w[..., None] * col[idx][:, None, :]], -1).reshape(-1, 4)
            else:
                vals = w.reshape(-1, 1)
            acc.index_add_(0, flat.reshape(-1), vals)
    dens, csum = acc[:, 0], acc[:, 1:]
    density = dens.reshape(R, R, R).cpu().numpy()
    if not with_color:
        return density
    color = torch.where(dens[:, None] > 1e-12, csum / dens[:, None].clamp_min(1e-12), torch.full_like(csum, 0.5))
    return density, color.reshape(R, R, R, 3).cpu().numpy()


def sample_grid(grid: np.ndarray, points: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Trilinear samples of a cell-centred (R, R, R, C) grid over [-bound, bound]^3 at points (M, 3)."""
    vol = torch.tensor(np.asarray(grid, dtype=np.float32))  # a copy: the grid may be a read-only memo
    if vol.dim() == 3:
        vol = vol[..., None]
    vol = vol.permute(3, 0, 1, 2)[None]  # (1, C, X, Y, Z): D=x, H=y, W=z
    p = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)) / bound
    coords = p[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)
    out = torch.nn.functional.grid_sample(vol, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(vol.shape[1], -1).T.numpy()


def _largest_components(verts: np.ndarray, faces: np.ndarray, min_fraction: float, max_components: int):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = verts.shape[0]
    if faces.shape[0] == 0:
        return verts, faces
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(rows.shape[0], dtype=np.int8), (rows, cols)), shape=(n, n))
    ncomp, labels = connected_components(graph, directed=False)
    face_label = labels[faces[:, 0]]
    sizes = np.bincount(face_label, minlength=ncomp)
    order = np.argsort(-sizes)
    keep_labels = [lab for lab in order[:max_components] if sizes[lab] >= min_fraction * sizes[order[0]]]
    keep_faces = faces[np.isin(face_label, keep_labels)]
    used = np.unique(keep_faces)
    remap = np.full(n, -1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    return verts[used], remap[keep_faces]


def signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume (positive when faces are CCW seen from outside)."""
    v = verts.astype(np.float64)
    return float(np.einsum("ij,ij->i", v[faces[:, 0]], np.cross(v[faces[:, 1]], v[faces[:, 2]])).sum() / 6.0)


@torch.no_grad()
def fill_cavities(vol: np.ndarray, level: float) -> np.ndarray:
    """Raise enclosed low-density pockets of a density grid (R, R, R) above ``level``.

    Cells below ``level`` that no path of below-level cells connects to the grid's border are
    inside the object (SDS leaves hollows where no view needs density); marching cubes would give
    each one a closed inner shell, a hidden extra component that UV space, texels and a sculptor's
    tools waste time on. Filled (``scipy.ndimage.binary_fill_holes``, 6-connected), such a pocket
    reads as solid and the surface is the outside only. Returns a new array when anything changed.
    """
    from scipy import ndimage

    solid = vol >= level
    cavity = ndimage.binary_fill_holes(solid) & ~solid
    if not cavity.any():
        return vol
    out = vol.copy()
    out[cavity] = max(2.0 * level, float(level) + 1e-3)
    log.debug("filled %d enclosed cells below the iso level", int(cavity.sum()))
    return out


#: The last two density grids (with colour) that :func:`extract_mesh` evaluated, by the Gaussians' contents
#: and the grid (``backend.mesh.memo``): a job meshes its final Gaussians twice at the cpu preset's grids.
_density_memo = GaussianMemo(size=2)


def extract_mesh(gaussians, grid_resolution: int = 64, face_budget: int = 20000, threshold: float = 0.5,
                 bound: float = 1.0, min_component_fraction: float = 0.1, max_components: int = 4,
                 with_colors: bool = True, carve=None) -> MeshPayload:
    """Mesh the Gaussians' density iso-surface (see module docstring).

    Args:
        gaussians: a ``GaussianModel`` or activated ``Gaussians``.
        grid_resolution: cells per axis over [-bound, bound].
        face_budget: maximum number of triangles after decimation.
        threshold: iso level; lowered to half the maximum density when the density never reaches it.
        min_component_fraction, max_components: keep at most ``max_components`` connected
            components with at least this fraction of the largest one's faces.
        carve: a ``backend.mesh.carve.CarveViews``: cells that none of its views shows to be empty
            are filled before meshing (space carving by the optimisation's cameras); None: off.
    Returns:
        MeshPayload with positions (N,3) float32 (world units), faces (F,3) uint32 CCW from outside,
        normals (N,3) float32 and colors (N,4) uint8 (sRGB, alpha 255).
    Raises:
        EmptyMeshError: when the Gaussians have no density in the volume.
    """
    from skimage.measure import marching_cubes

    g = _as_gaussians(gaussians)
    if len(g) == 0:
        raise EmptyMeshError("no Gaussians to mesh")
    vol, color_grid = _density_memo.get(g, ("density_grid", int(grid_resolution), float(bound)),
                                        lambda: density_grid(g, grid_resolution, bound, with_color=True))
    peak = float(vol.max())
    level = float(threshold)
    if peak < level:
        if peak < 1e-6:
            raise EmptyMeshError(f"the Gaussians have no density in [-{bound}, {bound}]^3")
        level = 0.5 * peak
        log.info("density peak %.3f below threshold %.3f; meshing at %.3f", peak, threshold, level)
    vol = fill_cavities(vol, level)
    if carve is not None:
        from backend.mesh.carve import fill_unseen, unseen_cells

        vol = fill_unseen(vol, level, unseen_cells(g, carve, grid_resolution, bound))
    h = 2.0 * bound / grid_resolution
    padded = np.pad(vol, 1, mode="constant", constant_values=0.0)
    verts, faces, _, _ = marching_cubes(padded, level=level, spacing=(h, h, h), allow_degenerate=False)
    verts = verts - (bound + h / 2.0)  # padded cell 0 centre sits at -bound - h/2
    faces = faces.astype(np.int64)
    verts, faces = _largest_components(verts, faces, min_component_fraction, max_components)
    if faces.shape[0] > face_budget:
        import fast_simplification

        reduction = 1.0 - face_budget / faces.shape[0]
        verts, faces = fast_simplification.simplify(verts.astype(np.float32), faces.astype(np.int64),
                                                    target_reduction=reduction)
        faces = np.asarray(faces, dtype=np.int64)
        if faces.shape[0] > face_budget:  # simplification can overshoot by a few faces
            faces = faces[:face_budget]
            used = np.unique(faces)
            remap = np.full(verts.shape[0], -1, dtype=np.int64)
            remap[used] = np.arange(used.shape[0])
            verts, faces = verts[used], remap[faces]
    if faces.shape[0] == 0:
        raise EmptyMeshError("marching cubes found no surface")
    if signed_volume(verts, faces) < 0:
        faces = faces[:, ::-1]
    verts = np.ascontiguousarray(verts, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    colors = None
    if with_colors:
        rgb = np.clip(sample_grid(color_grid, verts, bound), 0.0, 1.0)
        colors = np.concatenate([np.round(rgb * 255.0), np.full((verts.shape[0], 1), 255.0)], 1).astype(np.uint8)
    return MeshPayload(positions=verts, faces=faces, normals=compute_vertex_normals(verts, faces), colors=colors)


def fit_to_size(mesh: MeshPayload, size: float = 1.0) -> MeshPayload:
    """Scale the mesh so its largest dimension is ``size`` metres and put the origin at its bottom
    centre (bounding box centred in X and Y, lowest point at z = 0), so an object placed at the 3D
    cursor stands on it (the protocol's convention, Blender frame +Z up)."""
    if size <= 0:
        raise ValueError(f"object size must be > 0 metres, got {size}")
    pos = np.asarray(mesh.positions, dtype=np.float64)
    if pos.shape[0] == 0:
        return mesh
    lo, hi = pos.min(0), pos.max(0)
    extent = float((hi - lo).max())
    scale = size / extent if extent > 0 else 1.0
    anchor = (lo + hi) / 2.0
    anchor[2] = lo[2]
    new = (pos - anchor) * scale
    return dataclasses.replace(mesh, positions=new.astype(np.float32))
