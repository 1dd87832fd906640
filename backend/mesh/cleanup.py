"""Mesh clean-up for extracted surfaces: components, holes, winding, outward normals, decimation.

All arrays are numpy; positions (N, 3) float in Blender's frame (metres, +Z up), faces (F, 3)
int64 counter-clockwise seen from outside after clean-up.

Steps of :func:`clean_mesh`:

1. merge duplicate vertices, drop degenerate / duplicate faces and unreferenced vertices;
2. keep the largest connected component plus every component with at least
   ``min_component_fraction`` of the faces (floaters from the density grid go);
3. fill small holes (trimesh's ``fill_holes``: triangles and quads) where possible;
4. make the winding consistent per component and orient it outward (positive signed volume
   for closed components, normals pointing away from the component centre otherwise);
5. decimate to ``face_budget`` faces with fast-simplification (quadric edge collapse), then
   repeat 1 and 4 on the result;
6. give every fan of faces around a vertex its own vertex (``backend.mesh.manifold``): a collapse
   now and then glues two sheets along an edge or leaves a stray triangle on one, and the stray,
   then a component of its own, goes as in 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import trimesh

from backend.mesh.manifold import split_nonmanifold


class MeshCleanupError(ValueError):
    """The input has no usable surface (no faces, all degenerate, non-finite positions)."""


@dataclass
class CleanMesh:
    """Result of :func:`clean_mesh`.

    positions: (N, 3) float32; faces: (F, 3) int64 CCW from outside;
    stats: counts before/after each step (for logs and the job record).
    """

    positions: np.ndarray
    faces: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def watertight(self) -> bool:
        return bool(trimesh.Trimesh(self.positions, self.faces, process=False).is_watertight)


def _basic(positions: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh:
    mesh = trimesh.Trimesh(np.asarray(positions, np.float64), np.asarray(faces, np.int64), process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces(height=1e-12))
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    return mesh


def keep_large_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """The largest face-connected component plus those with >= min_fraction of all faces."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    keep_labels = np.nonzero((counts >= min_fraction * len(mesh.faces)) | (counts == counts.max()))[0]
    keep = np.isin(labels, keep_labels)
    if keep.all():
        return mesh
    out = mesh.copy()
    out.update_faces(keep)
    out.remove_unreferenced_vertices()
    return out


def orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Consistent winding per component, each component's normals pointing outward (vectorised)."""
    faces = orient_faces(np.asarray(mesh.vertices), np.asarray(mesh.faces))
    return trimesh.Trimesh(mesh.vertices, faces, process=False)


def orient_faces(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) faces with winding made consistent across manifold edges and oriented outward.

    Faces form a graph through edges shared by exactly two faces; a breadth-first walk over each
    component fixes every face relative to its parent (neighbours must traverse the shared edge in
    opposite directions). Each component is then flipped if its signed volume (closed components,
    measured about the component centroid) or its area-weighted normal · (centre → face) (open
    components) is negative.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    faces = np.asarray(faces, dtype=np.int64).copy()
    nF = len(faces)
    if nF == 0:
        return faces
    src = faces.reshape(-1)
    dst = faces[:, [1, 2, 0]].reshape(-1)
    face_of = np.repeat(np.arange(nF), 3)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = lo * (int(positions.shape[0]) + 1) + hi
    order = np.argsort(key, kind="stable")
    k_sorted = key[order]
    uniq, start, counts = np.unique(k_sorted, return_index=True, return_counts=True)
    pair = counts == 2
    a = order[start[pair]]
    b = order[start[pair] + 1]
    fa, fb = face_of[a], face_of[b]
    # same direction along the shared edge → the two faces disagree (relation 2), else agree (1)
    rel = np.where(src[a] == src[b], 2, 1).astype(np.int8)
    keep = fa != fb
    fa, fb, rel = fa[keep], fb[keep], rel[keep]
    graph = coo_matrix((np.concatenate([rel, rel]), (np.concatenate([fa, fb]), np.concatenate([fb, fa]))),
                       shape=(nF, nF)).tocsr()
    ncomp, labels = connected_components(graph, directed=False)
    flip = np.zeros(nF, dtype=bool)
    seen = np.zeros(nF, dtype=bool)
    for root in range(nF):
        if seen[root]:
            continue
        bfs, pred = breadth_first_order(graph, root, directed=False, return_predecessors=True)
        seen[bfs] = True
        if len(bfs) > 1:
            child = bfs[1:]
            par = pred[child]
            r = np.asarray(graph[child, par]).reshape(-1) == 2
            # parity along the tree: flip[child] = flip[parent] xor r, in BFS order (parents first)
            fl = flip
            for c, p_, rr in zip(child.tolist(), par.tolist(), r.tolist()):
                fl[c] = fl[p_] ^ rr
    faces[flip] = faces[flip][:, ::-1]

    # outward orientation per component
    p = np.asarray(positions, dtype=np.float64)
    tri = p[faces]
    comp_centre = np.zeros((ncomp, 3))
    np.add.at(comp_centre, labels, tri.mean(axis=1))
    comp_centre /= np.bincount(labels, minlength=ncomp)[:, None]
    rel_tri = tri - comp_centre[labels][:, None, :]
    vol = np.einsum("ij,ij->i", rel_tri[:, 0], np.cross(rel_tri[:, 1], rel_tri[:, 2]))
    comp_vol = np.bincount(labels, weights=vol, minlength=ncomp)
    # boundary edges per component decide closed vs open
    boundary = uniq[counts == 1]
    n_boundary = np.zeros(ncomp, dtype=np.int64)
    if len(boundary):
        b_faces = face_of[order[start[counts == 1]]]
        n_boundary = np.bincount(labels[b_faces], minlength=ncomp)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = np.einsum("ij,ij->i", normals, tri.mean(axis=1) - comp_centre[labels])
    comp_out = np.bincount(labels, weights=outward, minlength=ncomp)
    score = np.where(n_boundary == 0, comp_vol, comp_out)
    bad = score[labels] < 0
    faces[bad] = faces[bad][:, ::-1]
    return faces


def decimate(positions: np.ndarray, faces: np.ndarray, face_budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to at most ~``face_budget`` faces (no-op when already within budget)."""
    if len(faces) <= face_budget:
        return positions, faces
    import fast_simplification

    pts, tris = fast_simplification.simplify(np.asarray(positions, np.float64), np.asarray(faces, np.int32),
                                             target_count=int(face_budget))
    return pts, tris.astype(np.int64)


def clean_mesh(positions: np.ndarray, faces: np.ndarray, face_budget: int | None = None,
               min_component_fraction: float = 0.02, fill_holes: bool = True) -> CleanMesh:
    """Run the clean-up pipeline (module docstring) and return a :class:`CleanMesh`.

    Raises:
        MeshCleanupError: empty input or nothing left after removing degenerate faces.
    """
    positions = np.asarray(positions)
    faces = np.asarray(faces)
    if positions.ndim != 2 or positions.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshCleanupError(f"need positions (N, 3) and faces (F, 3), got {positions.shape}, {faces.shape}")
    if len(faces) == 0:
        raise MeshCleanupError("the mesh has no faces (empty extraction: is the density threshold too high?)")
    if not np.all(np.isfinite(positions)):
        raise MeshCleanupError("positions contain NaN or infinite values")
    stats = {"faces_in": int(len(faces)), "vertices_in": int(len(positions))}
    mesh = _basic(positions, faces)
    if len(mesh.faces) == 0:
        raise MeshCleanupError("every face is degenerate")
    mesh = keep_large_components(mesh, min_component_fraction)
    stats["faces_components"] = int(len(mesh.faces))
    if fill_holes and not mesh.is_watertight:
        trimesh.repair.fill_holes(mesh)
    mesh = orient_outward(mesh)
    if face_budget is not None:
        pts, tris = decimate(mesh.vertices, mesh.faces, face_budget)
        mesh = orient_outward(_basic(pts, tris))
    pts, tris, split = split_nonmanifold(mesh.vertices, mesh.faces)
    stats["nonmanifold_vertices_split"] = split
    if split:  # a collapse glued two sheets or left a stray triangle: one vertex per fan, strays dropped
        mesh = keep_large_components(trimesh.Trimesh(pts, tris, process=False), min_component_fraction)
    stats["faces_out"] = int(len(mesh.faces))
    stats["vertices_out"] = int(len(mesh.vertices))
    stats["watertight"] = bool(mesh.is_watertight)
    return CleanMesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64), stats)
