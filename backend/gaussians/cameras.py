"""Cameras shared by the Gaussian renderer, the mesh rasteriser and the SDS loop.

Frames
------
* World frame: Blender's — metres, +Z up, right-handed, the object's front faces -Y
  (Blender's Front view looks from -Y towards +Y). Objects are optimised inside the
  cube [-1, 1]^3 centred at the origin.
* Camera frame: OpenCV's — +X right, +Y down, +Z forward (what gsplat and the pure-PyTorch
  twins expect). ``viewmats`` map world → camera.
* Azimuth is measured about +Z from the front: 0° puts the camera at -Y (front view),
  +90° at +X (Blender's Right view), ±180° at +Y (back). Elevation is the angle above the
  XY plane (positive looks down on the object).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Documented sampling ranges for random SDS cameras (degrees / metres).
AZIMUTH_RANGE = (-180.0, 180.0)
ELEVATION_RANGE = (-10.0, 45.0)
DISTANCE_RANGE = (2.8, 3.4)
FOVY_RANGE = (45.0, 55.0)


@dataclass
class Cameras:
    """A batch of B pinhole cameras looking at the origin.

    Attributes:
        viewmats: (B, 4, 4) float32 world→camera (OpenCV convention).
        Ks: (B, 3, 3) float32 intrinsics in pixels for an image of ``width`` × ``height``.
        width, height: image size in pixels.
        azimuth_deg, elevation_deg, distance: (B,) float32, the orbit parameters.
    """

    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    distance: torch.Tensor

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            self.viewmats.to(device), self.Ks.to(device), self.width, self.height,
            self.azimuth_deg.to(device), self.elevation_deg.to(device), self.distance.to(device),
        )

    def camera_centers(self) -> torch.Tensor:
        """(B, 3) camera positions in world coordinates."""
        R = self.viewmats[:, :3, :3]
        t = self.viewmats[:, :3, 3]
        return -(R.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)

    def with_resolution(self, width: int, height: int) -> Cameras:
        """Same poses and field of view at another image size (intrinsics rescaled)."""
        sx, sy = width / self.width, height / self.height
        Ks = self.Ks.clone()
        Ks[:, 0, :] *= sx
        Ks[:, 1, :] *= sy
        return Cameras(self.viewmats, Ks, width, height, self.azimuth_deg, self.elevation_deg, self.distance)


def orbit_position(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """(B, 3) world positions on the orbit (see module docstring for the angle conventions)."""
    az = torch.deg2rad(azimuth_deg)
    el = torch.deg2rad(elevation_deg)
    x = distance * torch.cos(el) * torch.sin(az)
    y = -distance * torch.cos(el) * torch.cos(az)
    z = distance * torch.sin(el)
    return torch.stack([x, y, z], dim=-1)


def look_at_viewmats(eye: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4, 4) world→camera OpenCV matrices for cameras at ``eye`` (B, 3) looking at ``target``.

    World up is +Z; elevations must stay inside (-90°, 90°).
    """
    if target is None:
        target = torch.zeros_like(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    down = torch.cross(forward, right, dim=-1)
    R = torch.stack([right, down, forward], dim=1)  # rows: camera axes in world coordinates
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    M = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    M[:, :3, :3] = R
    M[:, :3, 3] = t
    M[:, 3, 3] = 1.0
    return M


def intrinsics(fovy_deg: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, 3, 3) pinhole intrinsics for a vertical field of view in degrees, square pixels."""
    fy = height / (2.0 * torch.tan(torch.deg2rad(fovy_deg) / 2.0))
    K = torch.zeros(fovy_deg.shape[0], 3, 3, dtype=fovy_deg.dtype, device=fovy_deg.device)
    K[:, 0, 0] = fy
    K[:, 1, 1] = fy
    K[:, 0, 2] = width / 2.0
    K[:, 1, 2] = height / 2.0
    K[:, 2, 2] = 1.0
    return K


def orbit_cameras(
    azimuth_deg: torch.Tensor | list[float],
    elevation_deg: torch.Tensor | list[float],
    distance: torch.Tensor | list[float] | float = 3.0,
    fovy_deg: torch.Tensor | list[float] | float = 49.0,
    width: int = 64,
    height: int | None = None,
    device: torch.device | str = "cpu",
) -> Cameras:
    """Cameras on an orbit around the origin. Scalars broadcast to the batch size."""
    height = width if height is None else height
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32, device=device).reshape(-1)
    el = torch.as_tensor(elevation_deg, dtype=torch.float32, device=device).reshape(-1)
    B = max(az.numel(), el.numel())
    az, el = az.expand(B).clone(), el.expand(B).clone()
    el = el.clamp(-89.0, 89.0)
    dist = torch.as_tensor(distance, dtype=torch.float32, device=device).reshape(-1).expand(B).clone()
    fov = torch.as_tensor(fovy_deg, dtype=torch.float32, device=device).reshape(-1).expand(B).clone()
    eye = orbit_position(az, el, dist)
    return Cameras(look_at_viewmats(eye), intrinsics(fov, width, height), width, height, az, el, dist)


def as_range(values) -> tuple[float, float]:
    """``(lo, hi)`` floats from a two-item sequence (a preset's list or tuple), as ``sample_cameras`` takes."""
    lo, hi = values
    return float(lo), float(hi)


def sample_cameras(
    batch: int,
    width: int,
    generator: torch.Generator | None = None,
    azimuth_range: tuple[float, float] = AZIMUTH_RANGE,
    elevation_range: tuple[float, float] = ELEVATION_RANGE,
    distance_range: tuple[float, float] = DISTANCE_RANGE,
    fovy_range: tuple[float, float] = FOVY_RANGE,
    device: torch.device | str = "cpu",
    stratified_azimuth: bool = False,
) -> Cameras:
    """B random orbit cameras (uniform in each documented range), reproducible with ``generator``.

    With ``stratified_azimuth`` the azimuth range is cut into B equal arcs and camera i is drawn
    uniformly inside arc i (threestudio's ``batch_uniform_azimuth``, as MVDream's four views spread
    around the object): every batch sees the object from all sides, so one step's SDS gradient is a
    consensus of views around it rather than of views that may bunch on one side. Each camera is
    still uniform over the whole range, and the generator draws the same numbers either way."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    if stratified_azimuth:
        lo, hi = azimuth_range
        azimuth = lo + (hi - lo) * (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    else:
        azimuth = uniform(*azimuth_range)
    return orbit_cameras(
        azimuth, uniform(*elevation_range), uniform(*distance_range),
        uniform(*fovy_range), width, width, device,
    )


def view_word(azimuth_deg: float, elevation_deg: float) -> str:
    """The view-dependent prompt word for one camera: 'overhead', 'front', 'side' or 'back'."""
    if elevation_deg > 60.0:
        return "overhead"
    a = (azimuth_deg + 180.0) % 360.0 - 180.0
    if abs(a) <= 45.0:
        return "front"
    if abs(a) <= 135.0:
        return "side"
    return "back"


VIEW_WORDS = ("front", "side", "back", "overhead")

