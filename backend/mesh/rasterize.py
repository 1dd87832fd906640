"""Differentiable mesh rasteriser: one signature, two backends (nvdiffrast on CUDA, pure PyTorch).

The API follows nvdiffrast (no antialias pass):

* ``rasterize(pos_clip, tri, resolution) -> rast`` (B, H, W, 4) = (u, v, z/w, triangle_id + 1);
* ``interpolate(attr, rast, tri) -> (B, H, W, C)``;
* ``texture(tex, uv, filter_mode='linear') -> (B, H, W, C)``.

Conventions shared by both backends:

* Clip space is OpenGL-like: NDC = xyz / w, −1 ≤ z/w ≤ 1 with smaller z/w nearer, pixel (i, j)
  centred at NDC ((2j + 1)/W − 1, (2i + 1)/H − 1). Row 0 is NDC y = −1; ``clip_from_cameras``
  maps OpenCV cameras (+Y down) so that row 0 is the TOP of the picture (pipeline images).
* ``texture`` samples with v = 0 at the FIRST row of the tensor (nvdiffrast). Pipeline textures
  keep row 0 at the top and UVs with origin bottom-left, so ``render_mesh`` samples at (u, 1 − v).

``backend``: 'torch', 'nvdiffrast' or 'auto' (nvdiffrast for CUDA tensors when it imports,
else torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.gaussians.cameras import Cameras
from backend.mesh import rasterize_torch

BACKENDS = ("auto", "torch", "nvdiffrast")
DEFAULT_NEAR = 0.1
DEFAULT_FAR = 100.0


def _impl(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasteriser backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return rasterize_torch
    from backend.mesh import rasterize_nvdiffrast

    if backend == "nvdiffrast":
        if device.type != "cuda":
            raise RuntimeError("the nvdiffrast backend needs CUDA tensors")
        return rasterize_nvdiffrast
    if device.type == "cuda" and rasterize_nvdiffrast.is_available():
        return rasterize_nvdiffrast
    return rasterize_torch


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend name ('torch' or 'nvdiffrast') that ``backend`` selects on ``device``."""
    impl = _impl(backend, torch.device(device))
    return "torch" if impl is rasterize_torch else "nvdiffrast"


def rasterize(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
              backend: str = "auto") -> torch.Tensor:
    """Rasterise (B, V, 4) or (V, 4) clip positions with (F, 3) int32 indices → (B, H, W, 4)."""
    return _impl(backend, pos_clip.device).rasterize(pos_clip, tri, resolution)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(V, C) or (B, V, C) attributes over ``rast`` with (F, 3) indices into attr → (B, H, W, C)."""
    return _impl(backend, rast.device).interpolate(attr, rast, tri)


def rasterize_with_db(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``rasterize`` plus rast_db (B, H, W, 4): (du/dX, du/dY, dv/dX, dv/dY) of the barycentrics per pixel."""
    return _impl(backend, pos_clip.device).rasterize_with_db(pos_clip, tri, resolution)


def interpolate_da(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, rast_db: torch.Tensor,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``interpolate`` plus (B, H, W, 2C) screen-space derivatives (dX, dY per attribute channel)."""
    return _impl(backend, rast.device).interpolate_da(attr, rast, tri, rast_db)


def texture(tex: torch.Tensor, uv: torch.Tensor, filter_mode: str = "linear", boundary_mode: str = "clamp",
            backend: str = "auto", uv_da: torch.Tensor | None = None,
            max_mip_level: int | None = None) -> torch.Tensor:
    """Sample (B, Ht, Wt, C) textures at (B, H, W, 2) UVs (v = 0 at tex row 0) → (B, H, W, C).

    ``filter_mode='linear-mipmap-linear'`` (trilinear over a mip pyramid, as DreamGaussian's mesh
    renderer) needs ``uv_da`` from :func:`interpolate_da`."""
    return _impl(backend, uv.device).texture(tex, uv, filter_mode=filter_mode, boundary_mode=boundary_mode,
                                             uv_da=uv_da, max_mip_level=max_mip_level)


# ----------------------------------------------------------------------------------------------
# cameras → clip space


def projection_from_cameras(cameras: Cameras, near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR) -> torch.Tensor:
    """(B, 4, 4) OpenCV camera → clip matrices for ``cameras``' intrinsics and image size.

    x_ndc = 2·(fx·x/z + cx)/W − 1, y_ndc = 2·(fy·y/z + cy)/H − 1 (camera +Y down → image row 0 at
    the top), z_ndc ∈ [−1, 1] over depth [near, far], w = depth.
    """
    if not 0.0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    K = cameras.Ks
    B = K.shape[0]
    W, H = float(cameras.width), float(cameras.height)
    P = torch.zeros(B, 4, 4, dtype=K.dtype, device=K.device)
    P[:, 0, 0] = 2.0 * K[:, 0, 0] / W
    P[:, 0, 1] = 2.0 * K[:, 0, 1] / W
    P[:, 0, 2] = 2.0 * K[:, 0, 2] / W - 1.0
    P[:, 1, 1] = 2.0 * K[:, 1, 1] / H
    P[:, 1, 2] = 2.0 * K[:, 1, 2] / H - 1.0
    P[:, 2, 2] = (far + near) / (far - near)
    P[:, 2, 3] = -2.0 * far * near / (far - near)
    P[:, 3, 2] = 1.0
    return P


def to_clip(verts: torch.Tensor, cameras: Cameras, near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR) -> torch.Tensor:
    """World-frame vertices (V, 3) or (B, V, 3) → (B, V, 4) clip positions for each camera."""
    mvp = projection_from_cameras(cameras, near, far) @ cameras.viewmats.to(verts.dtype)
    if verts.ndim == 2:
        verts = verts.unsqueeze(0)
    homo = torch.cat([verts, torch.ones_like(verts[..., :1])], dim=-1)
    return homo @ mvp.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# one textured render


@dataclass
class MeshRender:
    """Output of ``render_mesh``.

    image: (B, 3, H, W) float in [0, 1] (row 0 top), composited over the background.
    alpha: (B, 1, H, W) float coverage (0 or 1, no antialiasing).
    rast: (B, H, W, 4) raw rasteriser output.
    """

    image: torch.Tensor
    alpha: torch.Tensor
    rast: torch.Tensor


def render_mesh(
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras: Cameras,
    *,
    texture_map: torch.Tensor | None = None,
    uv: torch.Tensor | None = None,
    uv_faces: torch.Tensor | None = None,
    vertex_colors: torch.Tensor | None = None,
    background: float | torch.Tensor = 1.0,
    backend: str = "auto",
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
    filter_mode: str = "linear",
) -> MeshRender:
    """Render a mesh (textured, vertex-coloured, or plain white) from ``cameras``.

    Args:
        verts: (V, 3) world positions (Blender frame), may require grad.
        faces: (F, 3) int vertex indices.
        cameras: B cameras; the image size is ``cameras.height × cameras.width``.
        texture_map: (Ht, Wt, 3) float in [0, 1], row 0 at the TOP (pipeline convention).
        uv: (M, 2) float UVs, origin bottom-left; ``uv_faces`` (F, 3) int indexes them per corner.
        vertex_colors: (V, 3) float in [0, 1], used when no texture is given.
        background: scalar or (3,) colour behind the mesh.
        filter_mode: texture filter, 'linear' (bilinear) or 'linear-mipmap-linear' (mipmapped with
            per-pixel UV derivatives, so a texel's gradient reaches it through every pixel whose
            footprint covers it, as in DreamGaussian's nvdiffrast renderer).
    """
    impl = _impl(backend, verts.device)
    tri = faces.to(device=verts.device, dtype=torch.int32)
    pos = to_clip(verts, cameras.to(verts.device), near, far)
    mip = texture_map is not None and filter_mode == "linear-mipmap-linear"
    if mip:
        rast, rast_db = impl.rasterize_with_db(pos, tri, (cameras.height, cameras.width))
    else:
        rast = impl.rasterize(pos, tri, (cameras.height, cameras.width))
    mask = (rast[..., 3:4] > 0).to(verts.dtype)
    if texture_map is not None:
        if uv is None or uv_faces is None:
            raise ValueError("a texture needs uv and uv_faces")
        uv_t = torch.stack([uv[:, 0], 1.0 - uv[:, 1]], dim=-1)  # sample with v = 0 at texture row 0
        uv_tri = uv_faces.to(device=verts.device, dtype=torch.int32)
        if mip:
            texc, texd = impl.interpolate_da(uv_t, rast, uv_tri, rast_db)
            color = impl.texture(texture_map.unsqueeze(0), texc, filter_mode=filter_mode, boundary_mode="clamp",
                                 uv_da=texd)
        else:
            texc = impl.interpolate(uv_t, rast, uv_tri)
            color = impl.texture(texture_map.unsqueeze(0), texc, filter_mode=filter_mode, boundary_mode="clamp")
    elif vertex_colors is not None:
        color = impl.interpolate(vertex_colors, rast, tri)
    else:
        color = mask.expand(-1, -1, -1, 3)
    bg = torch.as_tensor(background, dtype=color.dtype, device=color.device).reshape(-1)[:3]
    image = color * mask + bg * (1.0 - mask)
    return MeshRender(image.permute(0, 3, 1, 2).contiguous(), mask.permute(0, 3, 1, 2).contiguous(), rast)
