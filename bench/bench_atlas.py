"""Atlas utilisation of the UV packing (issue 12, "an atlas that uses its area").

    PYTHONPATH=$PWD python bench/bench_atlas.py [ASSET.glb ...] [--resolution 256] [--padding 2]

For the six exact solids (``backend.quality.reference.solid_surface`` + the fine stage's clean-up to
5 000 faces) and any GLB / OBJ / mesh.npz given (their positions and faces are unwrapped again), it
runs ``backend.mesh.uv.unwrap`` (in its child process, as the pipeline does) with ``fill=False``
(session 2's packing: xatlas's own w × h atlas normalised to [0, 1]²) and ``fill=True`` (charts fitted
into exactly one resolution² atlas, best of the chart variants, stretched to fill), and prints:

* util — fraction of atlas texels whose centre lies in a chart triangle (``texture.chart_mask``; the
  judge's ``atlas`` measure);
* tex/m, spread, aniso — ``texture.texel_density``: median texels per metre, p90/p10, mean σ1/σ2;
* gap — fewest empty texels between two charts' touched texels (``texture.min_chart_gap``; a padding
  of p asks for 2p);
* overlap — UV area counted twice (folded or overlapping triangles: the sum of the UV triangles'
  areas over the area they cover, minus 1; 4× supersampled);
* s — wall time of the unwrap (child process included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from backend.mesh.uv import unwrap
from backend.quality import texture as T


def meshes(paths: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from backend.mesh.cleanup import clean_mesh
    from backend.quality.judge import load_mesh
    from backend.quality.reference import solid_surface

    out = {}
    for shape in ("cube", "torus", "sphere", "cone", "pyramid", "cylinder"):
        pos, faces = solid_surface(shape, 64)
        clean = clean_mesh(pos, faces, face_budget=5000, min_component_fraction=0.02)
        out[f"exact {shape}"] = (np.asarray(clean.positions, np.float32), np.asarray(clean.faces, np.int64))
    for p in paths:
        m = load_mesh(p)
        out[str(Path(p).parent.name + "/" + Path(p).name)] = (np.asarray(m.positions, np.float32),
                                                             np.asarray(m.faces, np.int64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("assets", nargs="*")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--padding", type=int, default=2)
    args = ap.parse_args()
    res, pad = args.resolution, args.padding
    print(f"resolution {res}², padding {pad}")
    print(f"{'mesh':26s} {'packing':6s} {'util':>6s} {'tex/m':>6s} {'spread':>6s} {'aniso':>6s} {'gap':>4s} {'overlap':>7s} {'s':>5s}")
    sums: dict[bool, list] = {False: [], True: []}
    for name, (pos, faces) in meshes(args.assets).items():
        for fill in (False, True):
            t0 = time.perf_counter()
            atlas = unwrap(pos, faces, resolution=res, padding=pad, fill=fill)
            dt = time.perf_counter() - t0
            util = float(T.chart_mask(atlas.corner_uvs.reshape(-1, 3, 2), res, res).mean())
            dens = T.texel_density(pos, faces, atlas.corner_uvs, res, res)
            gap = T.min_chart_gap(atlas.corner_uvs, res)
            uv3 = atlas.corner_uvs.reshape(-1, 3, 2).astype(np.float64)
            tri_area = 0.5 * np.abs((uv3[:, 1, 0] - uv3[:, 0, 0]) * (uv3[:, 2, 1] - uv3[:, 0, 1])
                                    - (uv3[:, 2, 0] - uv3[:, 0, 0]) * (uv3[:, 1, 1] - uv3[:, 0, 1])).sum()
            overlap = tri_area / max(float(T.chart_mask(uv3, 4 * res, 4 * res).mean()), 1e-12) - 1.0
            sums[fill].append((util, dt))
            print(f"{name:26s} {'fill' if fill else 'old':6s} {util:6.3f} {dens['median']:6.0f} {dens['spread']:6.2f} "
                  f"{dens['anisotropy']:6.2f} {gap:4d} {overlap:7.3f} {dt:5.2f}", flush=True)
    for fill, rows in sums.items():
        u, t = np.array(rows).T
        print(f"{'fill' if fill else 'old'}: util mean {u.mean():.3f} (min {u.min():.3f}, max {u.max():.3f}), "
              f"unwrap median {np.median(t):.2f} s")


if __name__ == "__main__":
    main()
