"""backend.mesh.topology: the edges and corner edges the backend sends with every mesh."""

import numpy as np
import pytest

from backend.mesh.topology import edge_topology, with_edges
from protocol.mesh import MeshPayload, decode_mesh, encode_mesh


def _brute_force(faces):
    edges = sorted({tuple(sorted((int(f[k]), int(f[(k + 1) % 3])))) for f in faces for k in range(3)})
    index = {e: i for i, e in enumerate(edges)}
    corner = [index[tuple(sorted((int(f[k]), int(f[(k + 1) % 3]))))] for f in faces for k in range(3)]
    return np.array(edges, np.uint32).reshape(-1, 2), np.array(corner, np.uint32)


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_brute_force_edge_set(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 30))
    faces = rng.integers(0, n, (int(rng.integers(1, 80)), 3)).astype(np.uint32)
    edges, corner_edges = edge_topology(faces, n)
    want_edges, want_corner = _brute_force(faces)
    np.testing.assert_array_equal(edges, want_edges)
    np.testing.assert_array_equal(corner_edges, want_corner)
    assert edges.dtype == np.uint32 and corner_edges.dtype == np.uint32


def test_closed_mesh_has_euler_characteristic_two():
    # octahedron: V - E + F = 2, every edge shared by two faces
    faces = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4],
                      [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]], np.uint32)
    edges, corner_edges = edge_topology(faces, 6)
    assert 6 - len(edges) + len(faces) == 2
    assert np.all(np.bincount(corner_edges, minlength=len(edges)) == 2)


def test_with_edges_travels_the_wire_and_keeps_existing_edges():
    mesh = MeshPayload(positions=np.zeros((4, 3), np.float32), faces=np.array([[0, 1, 2], [2, 1, 3]], np.uint32))
    full = with_edges(mesh)
    assert mesh.edges is None and full.edges.shape == (5, 2) and full.corner_edges.shape == (6,)
    assert with_edges(full) is full
    back = decode_mesh(*encode_mesh(full))
    np.testing.assert_array_equal(back.edges, full.edges)
    np.testing.assert_array_equal(back.corner_edges, full.corner_edges)


def test_empty_faces():
    edges, corner_edges = edge_topology(np.zeros((0, 3), np.uint32), 3)
    assert edges.shape == (0, 2) and corner_edges.shape == (0,)
