"""A small preview picture of a finished mesh, for job lists (the add-on's History shows it).

``render_thumbnail(mesh, size)`` renders the ``MeshPayload`` (Blender frame: metres, +Z up,
front facing -Y) with an orthographic camera looking from the front-right and a little above,
through the pure-PyTorch rasteriser (``backend/mesh/rasterize_torch.py``; it runs wherever
torch does, and a 128² picture of a 50k-triangle mesh takes well under a second on a CPU).
Colour is the texture (sampled at the interpolated per-corner UVs), else the vertex colours,
else light grey, shaded with one flat Lambert light; the background is transparent. Rendered at
twice the size and box-filtered down for smooth edges. Returns PNG bytes (RGBA, row 0 at the top).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from protocol.mesh import MeshPayload

THUMBNAIL_NAME = "thumbnail.png"
_VIEW = np.array([0.55, -1.0, 0.45])  # from the object towards the camera: front-right, a little above


def _texture_of(mesh: MeshPayload) -> np.ndarray | None:
    """(H, W, 3) float in [0, 1], row 0 at the top, or None."""
    if mesh.texture_rgba is not None:
        return np.asarray(mesh.texture_rgba)[..., :3].astype(np.float32) / 255.0
    if mesh.texture_png is not None:
        from PIL import Image

        with Image.open(io.BytesIO(bytes(mesh.texture_png))) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return None


def render_thumbnail(mesh: MeshPayload, size: int = 128) -> bytes:
    """PNG bytes of a ``size``×``size`` RGBA picture of ``mesh`` (see the module docstring).

    Runs torch on one thread (restored afterwards): the picture is small, and on a busy CPU
    more threads only contend (0.15 s against several seconds for a 320-triangle mesh).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render(mesh, int(size))
    finally:
        torch.set_num_threads(threads)


def _render(mesh: MeshPayload, size: int) -> bytes:
    from PIL import Image

    from backend.mesh.rasterize_torch import interpolate, rasterize

    pos = np.asarray(mesh.positions, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    res = 2 * int(size)
    rgba = np.zeros((res, res, 4), np.float32)
    if len(faces):
        corners = pos[faces].reshape(-1, 3)  # unwelded: one vertex per corner, so per-corner data works
        centre = (corners.min(0) + corners.max(0)) / 2.0
        back = _VIEW / np.linalg.norm(_VIEW)  # from the object towards the camera
        right = np.cross(np.array([0.0, 0.0, 1.0]), back)
        right /= np.linalg.norm(right)
        up = np.cross(back, right)
        rel = corners - centre
        x, y, depth = rel @ right, rel @ up, rel @ back
        half = max(np.abs(x).max(), np.abs(y).max(), 1e-6) * 1.08
        zr = max(np.abs(depth).max(), 1e-6) * 1.01
        clip = np.stack([x / half, -y / half, -depth / zr, np.ones_like(x)], axis=1)  # row 0 = top
        tri = torch.arange(len(corners), dtype=torch.int32).reshape(-1, 3)
        rast = rasterize(torch.from_numpy(clip).float(), tri, (res, res))
        tid = rast[0, ..., 3].long() - 1  # (H, W), -1 where empty
        hit = tid >= 0
        e1, e2 = corners[1::3] - corners[0::3], corners[2::3] - corners[0::3]
        n = np.cross(e1, e2)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        light = np.array([0.3, -0.6, 0.75])
        light /= np.linalg.norm(light)
        shade = (0.35 + 0.65 * np.abs(n @ light)).astype(np.float32)  # two-sided
        tex = _texture_of(mesh)
        if tex is not None and mesh.uvs is not None:
            uv = interpolate(torch.from_numpy(np.asarray(mesh.uvs, np.float32)), rast, tri)[0].numpy()
            th, tw = tex.shape[:2]
            cols = np.clip((uv[..., 0] * tw).astype(np.int64), 0, tw - 1)
            rows = np.clip(((1.0 - uv[..., 1]) * th).astype(np.int64), 0, th - 1)
            color = tex[rows, cols]
        elif mesh.colors is not None:
            vcol = np.asarray(mesh.colors, np.float32)[faces.reshape(-1), :3] / 255.0
            color = interpolate(torch.from_numpy(vcol), rast, tri)[0].numpy()
        else:
            color = np.full((res, res, 3), 0.8, np.float32)
        t = tid.numpy()
        lit = color * shade[np.maximum(t, 0)][..., None]
        mask = hit.numpy()
        rgba[mask, :3] = lit[mask]
        rgba[mask, 3] = 1.0
    small = rgba.reshape(size, 2, size, 2, 4).mean(axis=(1, 3))
    alpha = small[..., 3:4]
    small[..., :3] = np.where(alpha > 0, small[..., :3] / np.maximum(alpha, 1e-6), 0.0)  # un-premultiply
    out = io.BytesIO()
    Image.fromarray(np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGBA").save(out, format="PNG")
    return out.getvalue()
