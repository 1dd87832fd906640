"""Atlas utilisation of the UV packing (issue 12, "an atlas that uses its area").

    PYTHONPATH=$PWD python bench/bench_atlas.py [ASSET.glb ...] [--resolution 256] [--padding 2]
    PYTHONPATH=$PWD python bench/bench_atlas.py --shapes torus --grid 128 --faces 50000 --resolution 1024

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
  areas over the area they cover, minus 1; supersampled to 1024²);
* s — wall time of the unwrap (child process included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from backend.mesh.uv import unwrap
from backend.quality import texture as T

SHAPES = ("cube", "torus", "sphere", "cone", "pyramid", "cylinder")


def meshes(paths: list[str], shapes=SHAPES, grid: int = 64, faces: int = 5000
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from backend.mesh.cleanup import clean_mesh
    from backend.quality.judge import load_mesh
    from backend.quality.reference import solid_surface

    out = {}
    budget = faces
    for shape in shapes:
        pos, faces = solid_surface(shape, grid)
        clean = clean_mesh(pos, faces, face_budget=budget, min_component_fraction=0.02)
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
    ap.add_argument("--shapes", default=",".join(SHAPES), help="exact solids to include (comma-separated; '' for none)")
    ap.add_argument("--grid", type=int, default=64, help="marching-cubes grid of the exact solids")
    ap.add_argument("--faces", type=int, default=5000, help="face budget of the exact solids")
    args = ap.parse_args()
    res, pad = args.resolution, args.padding
    print(f"resolution {res}², padding {pad}")
    print(f"{'mesh':26s} {'packing':6s} {'util':>6s} {'tex/m':>6s} {'spread':>6s} {'aniso':>6s} {'gap':>4s} {'overlap':>7s} {'s':>5s}")
    sums: dict[bool, list] = {False: [], True: []}
    shapes = [s for s in args.shapes.split(",") if s]
    ss = max(1, 1024 // res)  # supersampling of the gap measure
    for name, (pos, faces) in meshes(args.assets, shapes, args.grid, args.faces).items():
        for fill in (False, True):
            t0 = time.perf_counter()
            atlas = unwrap(pos, faces, resolution=res, padding=pad, fill=fill)
            dt = time.perf_counter() - t0
            util = float(T.chart_mask(atlas.corner_uvs.reshape(-1, 3, 2), res, res).mean())
            dens = T.texel_density(pos, faces, atlas.corner_uvs, res, res)
            gap = T.min_chart_gap(atlas.corner_uvs, res, ss=ss)
            uv3 = atlas.corner_uvs.reshape(-1, 3, 2).astype(np.float64)
            tri_area = 0.5 * np.abs((uv3[:, 1, 0] - uv3[:, 0, 0]) * (uv3[:, 2, 1] - uv3[:, 0, 1])
                                    - (uv3[:, 2, 0] - uv3[:, 0, 0]) * (uv3[:, 1, 1] - uv3[:, 0, 1])).sum()
            overlap = tri_area / max(float(T.chart_mask(uv3, ss * res, ss * res).mean()), 1e-12) - 1.0
            sums[fill].append((util, dt))
            print(f"{name:26s} {'fill' if fill else 'old':6s} {util:6.3f} {dens['median']:6.0f} {dens['spread']:6.2f} "
                  f"{dens['anisotropy']:6.2f} {gap:4d} {overlap:7.3f} {dt:5.2f}", flush=True)
    for fill, rows in sums.items():
        u, t = np.array(rows).T
        print(f"{'fill' if fill else 'old'}: util mean {u.mean():.3f} (min {u.min():.3f}, max {u.max():.3f}), "
              f"unwrap median {np.median(t):.2f} s")


if __name__ == "__main__":
    main()
