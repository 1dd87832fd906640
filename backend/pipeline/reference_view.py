"""A reference view drawn from the guidance model itself: text → image → 3D.

DreamCraft3D (Sun et al. 2023) and Magic123 (Qian et al. 2023) first generate (or are given) one
image of the object, then optimise the 3D representation with a reconstruction loss in that image's
view and SDS in every other view. The reference commits the object to one silhouette from one side.
That breaks the symmetry a text-only SDS run starts from: every random view pulls the shape towards
the prior's average over the orientations it cannot tell apart, which for a prior that does not know
the camera's yaw is a rounded, star-like compromise between them.

Here the reference image is sampled from the guidance's own model (ancestral DDPM sampling, i.e. DDIM
with eta 1; Ho et al. 2020, Song et al. 2021) at a fixed front camera with classifier-free guidance, and
its foreground mask comes from the plain backdrop the image is drawn on (``foreground_mask``). The coarse
stage then adds ``reference_weight`` × the mean squared error between the rendered alpha and that mask
(the mask loss of Magic123 / DreamGaussian's image-to-3D stage). Colour still comes from SDS alone: the
reference carries the model's own shading, which the coarse stage's albedo does not. ``coarse.reference_model``
draws the reference from another model than the guidance's.

Measured on the ``cpu`` preset (session 19, docs/benchmarks.md): it lowers the mean IoU (0.748 → 0.650–0.728,
also with a 64 px prior drawing the reference), because the prior does not know the elevation or distance of the
image it drew. So it stays off.

Frames: the reference camera is ``backend.gaussians.cameras.orbit_cameras`` (world +Z up, azimuth 0 =
"front"); images are (1, 3, H, W) float32 in [0, 1], row 0 at the top; masks (1, 1, H, W) in [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from backend.gaussians.cameras import Cameras, orbit_cameras
from backend.guidance.base import GuidanceError

log = logging.getLogger(__name__)


@dataclass
class ReferenceView:
    """One generated image of the object and the camera it is taken to be seen from."""

    image: torch.Tensor       # (1, 3, H, W) float32 in [0, 1]
    mask: torch.Tensor        # (1, 1, H, W) float32 in [0, 1], 1 = object
    background: torch.Tensor  # (1, 3) the backdrop's colour
    cameras: Cameras          # one camera, width = height = H
    seed_offset: int          # which of the candidates was kept (0 = the first)

    def to(self, device: torch.device | str) -> ReferenceView:
        """The same view with its tensors and camera on ``device``."""
        return ReferenceView(self.image.to(device), self.mask.to(device), self.background.to(device),
                             self.cameras.to(device), self.seed_offset)


def frame_pixels(image: torch.Tensor) -> torch.Tensor:
    """The one-pixel frame of an image (C, H, W) as (C, 2H + 2W): top, bottom, left and right edges."""
    return torch.cat([image[:, 0, :], image[:, -1, :], image[:, :, 0], image[:, :, -1]], dim=1)


def image_side(guidance) -> int:
    """The side (pixels) of the images a guidance's model draws: ``resolution`` for a latent model, the
    UNet's ``sample_size`` for a pixel-space one."""
    return int(guidance.resolution) if guidance.is_latent else int(guidance.bundle.unet.config.sample_size)


def foreground_mask(image: torch.Tensor, low: float = 0.2, high: float = 0.45) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A soft object mask for an image (1, 3, H, W) in [0, 1] drawn on a plain backdrop.

    The backdrop's colour is the median of the one-pixel frame. Each pixel's RGB distance to it is
    divided by the image's contrast (the 95th percentile of those distances), and the mask rises
    linearly from 0 to 1 between ``low`` and ``high`` of it, so a dark shaded face of an object on a
    backdrop of a near colour still counts. Returns (mask (1, 1, H, W), background (1, 3), spread,
    contrast): ``spread`` is the frame's median distance from its colour (how plain the backdrop is)
    and ``contrast`` the percentile itself (how far the object stands out from it).
    """
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    frame = frame_pixels(image[0])
    bg = frame.median(dim=1).values
    spread = float((frame - bg[:, None]).norm(dim=0).median())
    dist = (image[0] - bg[:, None, None]).norm(dim=0)
    contrast = float(dist.flatten().quantile(0.95))
    rel = dist / max(contrast, 1e-6)
    mask = ((rel - low) / (high - low)).clamp(0.0, 1.0)
    return mask[None, None], bg[None], spread, contrast


@torch.no_grad()
def sample_image(guidance, cameras: Cameras, steps: int, cfg_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Sample B images (B, 3, H, W) in [0, 1] of the guidance's prompt, one per camera of ``cameras`` (its
    view word and, for a camera-conditioned model, its camera vector), by ancestral sampling over
    ``steps`` evenly spaced timesteps (DDIM with eta 1). H is the model's own side (latent models decode
    through their VAE; the guidance loader drops the decoder, so today a latent model raises ``GuidanceError``)."""
    if guidance.is_latent and getattr(guidance.bundle.vae, "decoder", None) is None:
        raise GuidanceError("coarse.reference_weight needs a model that can draw an image: this latent model was "
                            "loaded for SDS without its VAE decoder; use a pixel-space model or set "
                            "coarse.reference_weight=0")
    side = image_side(guidance) // 8 if guidance.is_latent else image_side(guidance)
    channels = int(guidance.bundle.unet.config.in_channels)
    device = guidance.device
    cond = guidance.view_embeddings(cameras.azimuth_deg, cameras.elevation_deg)
    camera = guidance.camera_labels(cameras.azimuth_deg, cameras.elevation_deg)
    T = guidance.bundle.num_train_timesteps
    ts = torch.linspace(T - 1, 0, max(int(steps), 1)).round().long()
    acp = guidance.bundle.alphas_cumprod
    B = len(cameras)
    x = torch.randn(B, channels, side, side, generator=generator).to(device)
    for k, t in enumerate(ts):
        t_b = t.view(1).expand(B).to(device)
        eps = guidance.predict_noise(x, t_b, cond, camera, cfg_scale)
        x0 = guidance.x0_estimate(x, t_b, eps)
        a_t = acp[t_b].view(-1, 1, 1, 1)
        eps = (x - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()
        if k + 1 == len(ts):
            x = x0
            break
        a_prev = acp[ts[k + 1].view(1).to(device)].view(1, 1, 1, 1).expand_as(a_t)
        sigma = ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).clamp_min(0.0).sqrt()
        noise = torch.randn(x.shape, generator=generator).to(device)
        x = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma ** 2).clamp_min(0.0).sqrt() * eps + sigma * noise
    if guidance.is_latent:
        vae = guidance.bundle.vae
        x = vae.decode((x / float(vae.config.scaling_factor)).to(next(vae.parameters()).dtype)).sample.float()
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


def reference_camera(config, side: int, count: int = 1, device: torch.device | str = "cpu") -> Cameras:
    """The reference's camera, ``count`` times: azimuth 0 ("front"), ``config.reference_elevation`` degrees
    up, at the middle of the coarse stage's distance and field-of-view ranges, ``side`` × ``side`` pixels."""
    dist = sum(config.distance_range) / 2.0
    fovy = sum(config.fovy_range) / 2.0
    return orbit_cameras([0.0] * count, [float(config.reference_elevation)] * count, dist, fovy, side, device=device)


def recentre(image: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift an image (1, 3, H, W) and its mask (1, 1, H, W) by whole pixels so that the mask's bounding box
    is centred in the frame (the object's centre, where the coarse stage's cameras look), filling what
    comes in with the backdrop's colour (1, 3). DreamGaussian's image preprocessing re-centres the same way."""
    ys, xs = torch.nonzero(mask[0, 0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        return image, mask
    H, W = mask.shape[-2:]
    dy = int(round((H - 1) / 2.0 - (int(ys.min()) + int(ys.max())) / 2.0))
    dx = int(round((W - 1) / 2.0 - (int(xs.min()) + int(xs.max())) / 2.0))
    out_img = background.view(1, 3, 1, 1).expand_as(image).clone()
    out_mask = torch.zeros_like(mask)
    ys0, ys1 = max(0, dy), min(H, H + dy)
    xs0, xs1 = max(0, dx), min(W, W + dx)
    out_img[..., ys0:ys1, xs0:xs1] = image[..., ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
    out_mask[..., ys0:ys1, xs0:xs1] = mask[..., ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
    return out_img, out_mask


def mask_extent(mask: torch.Tensor) -> float:
    """The larger side (pixels) of the bounding box of a mask's (1, 1, H, W) pixels above 0.5; 0 when empty."""
    ys, xs = torch.nonzero(mask[0, 0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        return 0.0
    return float(max(int(ys.max()) - int(ys.min()), int(xs.max()) - int(xs.min())) + 1)


def rescale(image: torch.Tensor, mask: torch.Tensor, background: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a centred image (1, 3, H, W) and its mask (1, 1, H, W) about the frame's centre by ``factor``
    (bilinear), filling what comes in with the backdrop (1, 3)."""
    H, W = mask.shape[-2:]
    theta = torch.tensor([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]], dtype=torch.float32)[None]
    grid = torch.nn.functional.affine_grid(theta, [1, 1, H, W], align_corners=False)
    stack = torch.cat([image - background.view(1, 3, 1, 1), mask], dim=1)
    out = torch.nn.functional.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :3] + background.view(1, 3, 1, 1), out[:, 3:].clamp(0.0, 1.0)


def draw_reference_view(guidance, config, generator: torch.Generator, candidates: int = 8) -> ReferenceView:
    """Sample ``candidates`` images from the reference camera and keep the first with a plain backdrop, an
    object that stands out from it (contrast ≥ 0.3) and covers between 3 % and 60 % of the frame without
    touching its border (the first otherwise). It is re-centred (``recentre``) and scaled so that its
    larger side is the median of the candidates' (``rescale``): the model's own typical framing of the
    object, which is what SDS pulls every other view towards (DreamGaussian scales its input to a fixed
    share of the frame for the same reason)."""
    side = image_side(guidance)
    n = max(int(candidates), 1)
    images = sample_image(guidance, reference_camera(config, side, n, guidance.device), int(config.reference_steps),
                          float(config.reference_cfg), generator)
    drawn = []
    for i in range(n):
        mask, bg, spread, contrast = foreground_mask(images[i:i + 1])
        cover = float(mask.mean())
        border = float(frame_pixels(mask[0]).mean())
        ok = spread < 0.05 and contrast >= 0.3 and 0.03 <= cover <= 0.6 and border < 0.02
        drawn.append((ok, i, images[i:i + 1], mask, bg))
    sizes = sorted(mask_extent(d[3]) for d in drawn if d[0]) or sorted(mask_extent(d[3]) for d in drawn)
    target = sizes[len(sizes) // 2]
    ok, i, image, mask, bg = next((d for d in drawn if d[0]), drawn[0])
    if not ok:
        log.warning("no reference candidate had a plain backdrop and a clear object; using the first")
    image, mask = recentre(image, mask, bg)
    extent = mask_extent(mask)
    if extent > 0 and target > 0:
        image, mask = rescale(image, mask, bg, target / extent)
    return ReferenceView(image, mask, bg, reference_camera(config, side), i)


def reference_mask_loss(model, ref: ReferenceView, backend: str) -> torch.Tensor:
    """Mean squared error between the Gaussians' alpha rendered from the reference camera and the
    reference's mask (scalar); ``ref`` on the Gaussians' device (``ReferenceView.to``)."""
    out = model.render(ref.cameras, ref.background, backend=backend)
    return (out.alpha - ref.mask).square().mean()
