"""The strict asset-quality judge (issue 12): a produced mesh against the solid and colour intended.

    from backend.quality.judge import judge_mesh, judge_prompt, judge_file
    report = judge_prompt(mesh_payload, "a red cube")      # intent read from the prompt
    report = judge_mesh(mesh_payload, "torus", "orange")   # intent given
    report = judge_file("asset.glb", "a red cube")         # GLB / OBJ / mesh.npz
    report.passed, report.failures, report.to_markdown(), report.to_dict()

    python -m backend.quality.judge asset.glb "a red cube" [--json] [--sheet sheet.png]   # exit 1 on fail

Every threshold is absolute (``THRESHOLDS``, the targets of issue 12 §3); no "best of six", no
relative margins between candidate solids. Measures (``backend.quality.report.Measure`` keys):

* ``iou`` — IoU on 64³ voxels of the mesh's bounding box with the intended solid scaled per axis to
  that box, best yaw (``geometry.solid_iou``; inside/outside by a three-axis ray-parity vote, so
  non-watertight meshes are judged sensibly). ≥ 0.80 for cube and sphere, ≥ 0.75 otherwise.
* ``hole`` (torus) — fraction of the central column (radius < the inner radius, full height) that
  the surface or the solid fills (``geometry.torus_hole_occupancy``). ≤ 0.15.
* ``apex`` (cone, pyramid) — mean cross-section of the top fifth over the bottom fifth of the voxel
  solid (``geometry.apex_ratio``): the narrow end must be on +Z. ≤ 0.5.
* ``components`` — connected components of the surface after welding coincident vertices
  (``geometry.topology``). = 1.
* ``colour`` — the area-weighted mean colour of the textured surface as seen (random points on the
  faces, the texture sampled through their UVs, so padding and unused atlas never count), named by
  ``colour.classify_colour`` (hue, with saturation and value rules for white, black, grey). = the
  intended colour.
* ``value`` (white) — HSV value of that mean colour. ≥ 0.75.
* ``speckle`` — mean |texel − 3×3 median| inside the UV charts, /255 (``texture.speckle``). ≤ 5.
* ``seam`` — colour jump across UV seams over the jump across interior edges
  (``texture.seam_jumps``). ≤ 2.

Shown for information (no target in issue 12): ``tunnels`` (genus of the closed surface),
``voxel_components``, ``lit`` (mean luma of up-facing over down-facing surface, > 1 when light is
baked into the albedo), ``luma`` (mean luma over the luma of the prompt colour's albedo), ``off_colour``
(the fraction of the colour samples that, named one by one, are not the intended colour:
``colour.off_colour_fraction``; blotches that leave the mean right), ``atlas``
(fraction of atlas texels whose centre lies in a UV chart, ``texture.chart_mask``; its detail gives
``texture.texel_density``: median texels per metre, the p90/p10 spread and the texel aspect).

Frames: MeshPayload conventions (metres, +Z up, per-corner UVs with a bottom-left origin, texture
row 0 at the top). GLB/OBJ files (glTF's +Y up) are turned back to +Z up by ``load_mesh``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from backend.priors import COLOURS, SHAPES
from backend.quality import colour as C
from backend.quality import geometry as G
from backend.quality import texture as T
from backend.quality.prompts import parse_intent
from backend.quality.report import Measure, QualityReport
from protocol.mesh import MeshPayload

#: Absolute targets (issue 12 §3).
THRESHOLDS: dict[str, float] = {
    "iou": 0.75,
    "iou_cube": 0.80,
    "iou_sphere": 0.80,
    "hole_max": 0.15,
    "apex_max": 0.5,
    "components": 1,
    "white_value_min": C.WHITE_MIN_VALUE,
    "speckle_max": 5.0,
    "seam_ratio_max": 2.0,
}

#: Voxel resolution of the IoU (cells per axis over the bounding box) and surface colour samples.
VOXEL_RES = 64
COLOUR_SAMPLES = 60_000


def iou_threshold(shape: str) -> float:
    return THRESHOLDS.get(f"iou_{shape}", THRESHOLDS["iou"])


def judge_mesh(mesh: MeshPayload, shape: str, colour: str | None = None, prompt: str = "",
               res: int = VOXEL_RES, samples: int = COLOUR_SAMPLES) -> QualityReport:
    """Judge ``mesh`` against the intended ``shape`` (of ``backend.priors.SHAPES``) and ``colour``
    (of ``COLOURS``, or None to skip the colour verdict). See the module docstring."""
    if shape not in SHAPES:
        raise ValueError(f"unknown solid {shape!r}; the judge knows {', '.join(SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the judge knows {', '.join(COLOURS)}")
    t0 = time.perf_counter()
    pos = np.asarray(mesh.positions, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"need positions (N,3) and faces (F>0,3), got {pos.shape} and {faces.shape}")
    measures: list[Measure] = []
    info: dict = {"faces": int(len(faces)), "vertices": int(len(pos))}

    # ---- geometry
    grid = G.voxelize(pos, faces, res)
    iou, yaw = G.solid_iou(shape, grid)
    thr = iou_threshold(shape)
    measures.append(Measure("iou", f"IoU with the intended {shape} ({res}³)", iou, f"≥ {thr:.2f}", iou >= thr,
                            f"best yaw {yaw:.0f}°"))
    if shape == "torus":
        hole = G.torus_hole_occupancy(grid)
        measures.append(Measure("hole", "torus hole occupancy", hole, f"≤ {THRESHOLDS['hole_max']:.2f}",
                                hole <= THRESHOLDS["hole_max"]))
    if shape in ("cone", "pyramid"):
        apex = G.apex_ratio(grid)
        measures.append(Measure("apex", "apex up (top/bottom cross-section)", apex,
                                f"≤ {THRESHOLDS['apex_max']:.1f}", apex <= THRESHOLDS["apex_max"]))
    topo = G.topology(pos, faces)
    big = ", ".join(f"{a:.3f}" for a in topo.component_area_fractions[:4])
    measures.append(Measure("components", "connected components (surface)", topo.components,
                            f"= {THRESHOLDS['components']}", topo.components == THRESHOLDS["components"],
                            f"area fractions {big}" if topo.components > 1 else ""))
    expected_genus = 1 if shape == "torus" else 0
    measures.append(Measure("tunnels", "tunnels (genus)", topo.tunnels, f"{expected_genus} for a {shape}", None,
                            "open surface" if topo.tunnels is None else ""))
    measures.append(Measure("voxel_components", "connected components (voxel solid)", G.voxel_components(grid),
                            "", None))
    info.update(boundary_edges=topo.boundary_edges, nonmanifold_edges=topo.nonmanifold_edges, euler=topo.euler,
                axis_agreement=grid.axis_agreement, voxel_fill=float(grid.occ.mean()), best_yaw=yaw,
                bbox_size=(grid.hi - grid.lo).tolist())

    # ---- colour of the surface as seen
    fid, bary = T.surface_samples(pos, faces, samples)
    rgb = T.sample_surface_colour(mesh, fid, bary)
    if rgb is None:
        measures.append(Measure("colour", "colour (mean of the surface)", None, colour or "", False if colour else None,
                                "the mesh has no texture or vertex colours"))
    else:
        mean = rgb.mean(axis=0)
        verdict = C.classify_colour(mean)
        h, s, v = verdict.hsv
        detail = f"HSV ({h:.0f}°, {s:.2f}, {v:.2f})" + ("" if verdict.margin is None
                                                        else f", hue margin {verdict.margin:.0f}°")
        measures.append(Measure("colour", "colour (mean of the surface)", verdict.name, colour or "any",
                                None if colour is None else verdict.name == colour, detail))
        if colour == "white":
            measures.append(Measure("value", "white's value (HSV V of the mean)", v,
                                    f"≥ {THRESHOLDS['white_value_min']:.2f}", v >= THRESHOLDS["white_value_min"]))
        if colour is not None:
            measures.append(Measure("off_colour", "surface off its colour (samples named otherwise)",
                                    C.off_colour_fraction(rgb, colour), "info", None))
        info.update(mean_rgb=verdict.rgb, mean_hsv=verdict.hsv, hue_margin=verdict.margin)
        # baked light: up-facing against down-facing surface
        tri = pos[faces[fid]]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        nz = n[:, 2] / np.maximum(np.linalg.norm(n, axis=1), 1e-30)
        luma = C.luminance(rgb)
        up, down = luma[nz > 0.7], luma[nz < -0.7]
        lit = float(up.mean() / down.mean()) if len(up) > 50 and len(down) > 50 and down.mean() > 1e-3 else float("nan")
        measures.append(Measure("lit", "lit balance (luma up-facing / down-facing)", lit, "≈ 1 (no baked light)", None))
        if colour is not None:
            ref = float(C.luminance(np.asarray(COLOURS[colour])))
            measures.append(Measure("luma", "mean luma / prompt colour's luma", float(luma.mean()) / max(ref, 1e-6),
                                    "≈ 1", None))

    # ---- texture
    tex = T.load_texture(mesh)
    uv3 = T.corner_uvs_of(mesh)
    if tex is None or uv3 is None:
        measures.append(Measure("speckle", "texture speckle (/255, 3×3 median, in charts)", None,
                                f"≤ {THRESHOLDS['speckle_max']:.0f}", None, "no UV texture"))
        measures.append(Measure("seam", "seam jump / interior jump", None, f"≤ {THRESHOLDS['seam_ratio_max']:.0f}×",
                                None, "no UV texture"))
    else:
        mask = T.chart_mask(uv3, tex.shape[0], tex.shape[1])
        sp, n_tex = T.speckle(tex, mask)
        measures.append(Measure("speckle", "texture speckle (/255, 3×3 median, in charts)", sp,
                                f"≤ {THRESHOLDS['speckle_max']:.0f}", bool(sp <= THRESHOLDS["speckle_max"]),
                                f"{n_tex} texels"))
        sj = T.seam_jumps(pos, faces, uv3, tex)
        ratio = sj["ratio"]
        measures.append(Measure("seam", "seam jump / interior jump", ratio, f"≤ {THRESHOLDS['seam_ratio_max']:.0f}×",
                                None if np.isnan(ratio) else bool(ratio <= THRESHOLDS["seam_ratio_max"]),
                                f"seam {sj['seam']:.1f}/255 over {sj['seam_edges']} edges, "
                                f"interior {sj['interior']:.1f}/255"))
        dens = T.texel_density(pos, faces, uv3, tex.shape[0], tex.shape[1])
        measures.append(Measure("atlas", "atlas use (texels in a chart / all)", float(mask.mean()), "", None,
                                f"{dens['median']:.0f} texels/m, spread p90/p10 {dens['spread']:.2f}, "
                                f"texel aspect {dens['anisotropy']:.2f}"))
        info.update(atlas_coverage=float(mask.mean()), texture_size=list(tex.shape[:2]), seam_jump=sj["seam"],
                    interior_jump=sj["interior"], texel_density=dens["median"], texel_density_spread=dens["spread"],
                    texel_anisotropy=dens["anisotropy"])
    info["judge_seconds"] = time.perf_counter() - t0
    return QualityReport(prompt, shape, colour, measures, info)


def judge_prompt(mesh: MeshPayload, prompt: str, **kwargs) -> QualityReport:
    """``judge_mesh`` with the shape and colour read from ``prompt`` (``prompts.parse_intent``)."""
    intent = parse_intent(prompt)
    return judge_mesh(mesh, intent.shape, intent.colour, prompt=prompt, **kwargs)


def load_mesh(path: str | Path) -> MeshPayload:
    """A MeshPayload (Blender frame) from ``mesh.npz`` (the benchmark's dump), a GLB or an OBJ.

    GLB/OBJ are written +Y up (``backend.mesh.export``): a file point (x, y, z) is the Blender
    point (x, −z, y). trimesh gives per-vertex UVs with a bottom-left origin; they become per corner.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        return MeshPayload(positions=d["positions"], faces=d["faces"], uvs=d.get("uvs"),
                           texture_rgba=d.get("texture_rgba"), colors=d.get("colors"))
    import trimesh

    m = trimesh.load(path, force="mesh", process=False)
    v = np.asarray(m.vertices, dtype=np.float64)
    pos = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1).astype(np.float32)
    faces = np.asarray(m.faces, dtype=np.int64)
    uvs = tex = colors = None
    visual = m.visual
    if getattr(visual, "uv", None) is not None and len(visual.uv) == len(v):
        uvs = np.asarray(visual.uv, dtype=np.float32)[faces].reshape(-1, 2)
        mat = getattr(visual, "material", None)
        img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
        if img is not None:
            tex = np.asarray(img.convert("RGBA"))
    elif getattr(visual, "vertex_colors", None) is not None:
        colors = np.asarray(visual.vertex_colors, dtype=np.uint8)
    return MeshPayload(positions=pos, faces=faces.astype(np.uint32), uvs=uvs, texture_rgba=tex, colors=colors)


def judge_file(path: str | Path, prompt: str, **kwargs) -> QualityReport:
    """Judge a GLB / OBJ / mesh.npz against ``prompt``."""
    return judge_prompt(load_mesh(path), prompt, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m backend.quality.judge ASSET "a red cube" [--json] [--sheet sheet.png]``; exit 0 on pass, 1 on fail."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m backend.quality.judge", description="Judge an asset strictly.")
    ap.add_argument("asset", type=Path, help="GLB, OBJ or mesh.npz")
    ap.add_argument("prompt", help="the prompt it was made from (names the intended solid and colour)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--sheet", type=Path, default=None, help="also write a contact sheet PNG here")
    args = ap.parse_args(argv)
    try:
        mesh = load_mesh(args.asset)
        report = judge_prompt(mesh, args.prompt)
    except (OSError, ValueError) as exc:
        ap.error(str(exc))
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.to_markdown())
    if args.sheet is not None:
        from backend.quality.contact_sheet import write_contact_sheet

        write_contact_sheet(mesh, args.sheet, report, args.prompt)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
