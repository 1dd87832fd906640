"""Contact sheets for the asset-quality benchmark: four azimuths, the top and bottom views and the atlas.

``render_views(mesh, views, size)`` rasterises the textured mesh with the project's PyTorch
rasteriser (``backend.mesh.rasterize_torch``) under an orthographic camera that frames the mesh's
bounding sphere, 2× supersampled. Colour = texture (bilinear, through the per-corner UVs; vertex
colours when there is no texture) × (0.3 + 0.7·max(0, n·l)) with flat face normals, so facets,
bumps and dents show, and a light from the viewer's upper left. Background: light blue-grey, so
both white and black objects stand out.

Views (azimuth, elevation) in degrees, MeshPayload frame (+Z up, front −Y): azimuth 0 looks at the
front from −Y, 90 from +X, 180 from +Y, 270 from −X, at 20° elevation; the top view looks down −Z
with +Y up in the picture, the bottom view up +Z (the underside, which no view above the horizon
shows: a hollow or open base is visible there). The atlas tile shows the texture with everything
outside the UV charts darkened, so padding and unused atlas area are visible.

``contact_sheet(mesh, report, title)`` → a PIL image: a header with the prompt and the judge's key
numbers (failures marked), then the seven tiles in a row, each labelled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from backend.quality import texture as T
from backend.quality.geometry import one_torch_thread

VIEWS: tuple[tuple[str, float, float], ...] = (
    ("front", 0.0, 20.0), ("right", 90.0, 20.0), ("back", 180.0, 20.0), ("left", 270.0, 20.0), ("top", 0.0, 90.0),
    ("bottom", 0.0, -90.0),
)
BACKGROUND = np.array([0.80, 0.83, 0.88])


def _camera(az: float, el: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, up, to_camera) unit vectors of a camera at azimuth ``az``, elevation ``el`` (degrees)."""
    a, e = math.radians(az), math.radians(el)
    c = np.array([math.sin(a) * math.cos(e), -math.cos(a) * math.cos(e), math.sin(e)])
    f = -c
    ref = np.array([0.0, 0.0, 1.0]) if abs(f[2]) < 0.99 else np.array([-math.sin(a), math.cos(a), 0.0])
    r = np.cross(f, ref)
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    return r, u, c


def render_views(mesh, views=VIEWS, size: int = 192) -> list[np.ndarray]:
    """(size, size, 3) uint8 renders of ``mesh`` (a MeshPayload) for each (name, azimuth, elevation)."""
    pos = np.asarray(mesh.positions, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    lo, hi = pos.min(0), pos.max(0)
    centre = (lo + hi) / 2
    radius = max(float(np.linalg.norm(hi - lo)) / 2, 1e-9) * 1.04
    tex = T.load_texture(mesh)
    uv3 = T.corner_uvs_of(mesh)
    colors = None if getattr(mesh, "colors", None) is None else np.asarray(mesh.colors, np.float64)[:, :3] / 255.0
    tri = pos[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-30)
    S = 2 * size
    out = []
    with one_torch_thread():
        for _, az, el in views:
            out.append(_render_one(pos, faces, fn, centre, radius, tex, uv3, colors, az, el, S, size))
    return out


def _render_one(pos, faces, fn, centre, radius, tex, uv3, colors, az, el, S, size) -> np.ndarray:
    """One supersampled (S = 2·size) view, box-filtered down to (size, size, 3) uint8."""
    from backend.mesh.rasterize_torch import interpolate, rasterize

    r, u, c = _camera(az, el)
    p = pos - centre
    clip = np.stack([p @ r / radius, -(p @ u) / radius, -(p @ c) / radius * 0.9, np.ones(len(p))], axis=1)
    rast = rasterize(torch.as_tensor(clip, dtype=torch.float32)[None], torch.as_tensor(faces, dtype=torch.int32),
                     (S, S))[0]
    tid = rast[..., 3].long().numpy() - 1
    hit = tid >= 0
    img = np.tile(BACKGROUND, (S, S, 1))
    if hit.any():
        f_hit = tid[hit]
        if tex is not None and uv3 is not None:
            corner_idx = torch.arange(len(faces) * 3).reshape(-1, 3)
            uv = interpolate(torch.as_tensor(uv3.reshape(-1, 2), dtype=torch.float32), rast[None],
                             corner_idx)[0].numpy()
            albedo = T.sample_bilinear(tex, uv[hit].astype(np.float64))
        elif colors is not None:
            b = rast[..., :2].numpy()[hit]
            bary = np.concatenate([b, 1 - b.sum(1, keepdims=True)], axis=1)
            albedo = np.einsum("mk,mkj->mj", bary, colors[faces[f_hit]])
        else:
            albedo = np.full((len(f_hit), 3), 0.8)
        light = -0.35 * r + 0.55 * u + 0.75 * c
        light /= np.linalg.norm(light)
        shade = 0.3 + 0.7 * np.clip(fn[f_hit] @ light, 0.0, 1.0)
        img[hit] = np.clip(albedo * shade[:, None], 0, 1)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return (img * 255 + 0.5).astype(np.uint8)


def atlas_tile(mesh, size: int = 192) -> np.ndarray:
    """(size, size, 3) uint8: the texture atlas, texels outside the UV charts darkened to 30 %."""
    tex = T.load_texture(mesh)
    uv3 = T.corner_uvs_of(mesh)
    if tex is None or uv3 is None:
        return np.full((size, size, 3), 60, np.uint8)
    mask = T.chart_mask(uv3, tex.shape[0], tex.shape[1])
    shown = np.where(mask[..., None], tex, tex * 0.3)
    from PIL import Image

    img = Image.fromarray((np.clip(shown, 0, 1) * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def header_lines(report) -> list[tuple[str, bool | None]]:
    """(text, passed) fragments of the judge's key numbers for the header."""
    if report is None:
        return []
    out = []
    for m in report.measures:
        if m.key in ("voxel_components",):
            continue
        text = f"{m.key} {m.value_text()}" + (f" ({m.target})" if m.passed is not None else "")
        if m.value is None and m.detail:  # e.g. tunnels of an open surface ("—" has no glyph)
            text = f"{m.key} {m.detail}"
        for a, b in (("≥", ">="), ("≤", "<="), ("≈", "~"), ("×", "x"), ("—", "-")):
            text = text.replace(a, b)
        out.append((text, m.passed))
    return out


def contact_sheet(mesh, report=None, title: str = "", size: int = 192):
    """PIL RGB image: header (title, verdict, numbers) over front/right/back/left/top/bottom renders and the atlas."""
    from PIL import Image, ImageDraw

    tiles = render_views(mesh, VIEWS, size) + [atlas_tile(mesh, size)]
    names = [v[0] for v in VIEWS] + ["atlas"]
    head_h, label_h = 58, 16
    sheet = Image.new("RGB", (size * len(tiles), head_h + label_h + size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    big, small = _font(16), _font(12)
    verdict = "" if report is None else ("  PASS" if report.passed else "  FAIL: " + ", ".join(report.failures))
    draw.text((6, 4), title + verdict, fill=(0, 0, 0) if report is None or report.passed else (170, 0, 0), font=big)
    x, y = 6, 26
    for text, ok in header_lines(report):
        w = draw.textlength(text + "   ", font=small)
        if x + w > sheet.width - 6:
            x, y = 6, y + 15
        draw.text((x, y), text, fill={True: (0, 110, 0), False: (190, 0, 0), None: (80, 80, 80)}[ok], font=small)
        x += w
    for i, (tile, name) in enumerate(zip(tiles, names)):
        sheet.paste(Image.fromarray(tile), (i * size, head_h + label_h))
        draw.text((i * size + 4, head_h + 1), name, fill=(60, 60, 60), font=small)
    return sheet


def write_contact_sheet(mesh, path: str | Path, report=None, title: str = "", size: int = 192) -> Path:
    """Render and save the contact sheet as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(mesh, report, title, size).save(path, optimize=True)
    return path
