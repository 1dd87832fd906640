"""Camera conditioning of a diffusion prior (MVDream, Shi et al. 2023, "MVDream: Multi-view Diffusion
for 3D Generation", §3.1; the camera-to-image idea of Zero-1-to-3, Liu et al. 2023).

A text prompt alone does not say from where an object is seen: "a cube, front view" covers every yaw
within ±45° of the front, so SDS pulls each rendered view towards a cube at *some* yaw and the views
disagree about which (Janus-like superpositions: a cube grows horns, a pyramid becomes a four-pointed
star). MVDream adds the camera to the diffusion model: a small MLP embeds the camera and the result is
added to the UNet's timestep embedding, and the model is fine-tuned on renders with their cameras. SDS
then passes each rendered view's own camera, and every view agrees on one 3D orientation.

Here a camera-conditioned model is a diffusers ``UNet2DConditionModel`` with
``class_embed_type="projection"`` (its ``class_embedding`` is the MLP: Linear-SiLU-Linear into the
timestep embedding, exactly MVDream's design) whose folder declares the camera encoding in
``camera_conditioning.json`` (``{"encoding": "orbit-sincos", "dim": 4, ...}``). Models without the
file (Stable Diffusion) get no camera.

Encoding ``"orbit-sincos"`` (dim 4): ``(sin az, cos az, sin el, cos el)`` per view, with the azimuth
and elevation of ``backend.gaussians.cameras`` (world frame: Blender's, +Z up, the object's front
faces −Y; azimuth about +Z from the front, +90° at +X; elevation above the XY plane). Distance and
field of view are left out: they only scale the object in the image.

Encoding ``"orbit-fourier4"`` (dim 10): ``(sin k·az, cos k·az)`` for k = 1..4, then ``(sin el, cos el)``
(``orbit_fourier``): the same angles with the azimuth's harmonics up to the fourth, so an object's
four-fold symmetry (a box seen at yaw 0° and 90°) is one feature away for the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The file in a model folder that declares its camera encoding.
CAMERA_CONDITIONING_FILE = "camera_conditioning.json"

#: Known encodings → vector length.
ENCODINGS = {"orbit-sincos": 4, "orbit-fourier4": 10}

#: Azimuth harmonics of ``"orbit-fourier4"``: sin/cos of k·azimuth for k = 1..4.
FOURIER_HARMONICS = 4


def orbit_fourier(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                  harmonics: int = FOURIER_HARMONICS) -> torch.Tensor:
    """(B, 2 * harmonics + 2) float32 ``(sin az, cos az, sin 2az, cos 2az, …, sin el, cos el)`` for (B,)
    angles in degrees: the azimuth's Fourier features (the positional encoding of NeRF, Mildenhall et
    al. 2020; Tancik et al. 2020 show why a small MLP learns a high-frequency function of its input
    only when it is given such features). An object with n-fold symmetry about +Z looks the same at
    azimuths a and a + 360°/n, so what a view shows of it is a function of the n-th harmonic; with the
    first harmonic alone the embedding MLP has to synthesise that frequency itself."""
    az = torch.deg2rad(azimuth_deg.float().reshape(-1))
    el = torch.deg2rad(elevation_deg.float().reshape(-1))
    k = torch.arange(1, harmonics + 1, dtype=torch.float32)
    kaz = az[:, None] * k[None, :]
    feats = torch.stack([kaz.sin(), kaz.cos()], dim=-1).reshape(az.shape[0], 2 * harmonics)
    return torch.cat([feats, torch.stack([el.sin(), el.cos()], dim=-1)], dim=-1)


def orbit_sincos(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor:
    """(B, 4) float32 ``(sin az, cos az, sin el, cos el)`` for (B,) angles in degrees: ``orbit_fourier``
    with the first harmonic only."""
    return orbit_fourier(azimuth_deg, elevation_deg, harmonics=1)


def encode_cameras(encoding: str, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor:
    """(B, ENCODINGS[encoding]) camera vectors for (B,) azimuths/elevations in degrees."""
    if encoding == "orbit-sincos":
        return orbit_sincos(azimuth_deg, elevation_deg)
    if encoding == "orbit-fourier4":
        return orbit_fourier(azimuth_deg, elevation_deg)
    raise ValueError(f"unknown camera encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


_INPUTS = {
    "orbit-sincos": "sin(azimuth), cos(azimuth), sin(elevation), cos(elevation)",
    "orbit-fourier4": "sin(k azimuth), cos(k azimuth) for k = 1..4, then sin(elevation), cos(elevation)",
}


def declaration(encoding: str) -> dict:
    """The JSON object written to ``camera_conditioning.json`` for ``encoding``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown camera encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return {
        "encoding": encoding,
        "dim": ENCODINGS[encoding],
        "inputs": _INPUTS[encoding],
        "frame": "world +Z up, object front faces -Y; azimuth about +Z from the front (+90 deg at +X), "
                 "elevation above the XY plane (backend.gaussians.cameras)",
        "unet": "class_embed_type='projection': the vector is embedded and added to the timestep embedding "
                "(MVDream, Shi et al. 2023)",
    }


def write_declaration(folder: str | Path, encoding: str) -> Path:
    path = Path(folder) / CAMERA_CONDITIONING_FILE
    path.write_text(json.dumps(declaration(encoding), indent=1) + "\n")
    return path


def parse_declaration(text: str, source: str) -> str:
    """The encoding named by a ``camera_conditioning.json`` text; ValueError naming ``source`` if bad."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    encoding = data.get("encoding") if isinstance(data, dict) else None
    if encoding not in ENCODINGS:
        raise ValueError(f"{source} names camera encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if data.get("dim", ENCODINGS[encoding]) != ENCODINGS[encoding]:
        raise ValueError(f"{source}: encoding {encoding!r} has dim {ENCODINGS[encoding]}, not {data.get('dim')}")
    return encoding


def read_declaration(folder: str | Path | None) -> str | None:
    """The camera encoding declared in a local model folder, or None when it declares none."""
    if folder is None:
        return None
    path = Path(folder) / CAMERA_CONDITIONING_FILE
    if not path.is_file():
        return None
    return parse_declaration(path.read_text(), str(path))


def check_unet(unet: torch.nn.Module, encoding: str | None, source: str) -> None:
    """ValueError when the UNet's class embedding and the declared camera encoding disagree."""
    cfg = unet.config
    kind = getattr(cfg, "class_embed_type", None)
    if encoding is None:
        if kind is not None or getattr(cfg, "num_class_embeds", None):
            raise ValueError(f"{source}: the UNet expects class labels ({kind or 'num_class_embeds'}) but the "
                             f"model declares no camera encoding ({CAMERA_CONDITIONING_FILE} missing)")
        return
    dim = getattr(cfg, "projection_class_embeddings_input_dim", None)
    if kind != "projection" or dim != ENCODINGS[encoding]:
        raise ValueError(f"{source}: {CAMERA_CONDITIONING_FILE} declares {encoding!r} (dim {ENCODINGS[encoding]}) "
                         f"but the UNet has class_embed_type={kind!r}, input dim {dim}")
