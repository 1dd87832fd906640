"""Score Distillation Sampling with a diffusers UNet (latent Stable Diffusion or a pixel-space UNet).

SDS (DreamFusion; threestudio's form): for a rendered batch x (latents z = E(x) for latent models,
z = 2x - 1 for pixel-space models), a timestep t ~ U[t_min, t_max] (annealed over the run) and noise
eps, the UNet predicts eps_hat on z_t = sqrt(a_t) z + sqrt(1 - a_t) eps with classifier-free guidance

    eps_hat = eps_uncond + cfg * (eps_cond - eps_uncond)
    grad    = w(t) * (eps_hat - eps)                 (optionally clamped to ±grad_clip)
    loss    = 0.5 * sum((z - (z - grad).detach())^2) / B

so d loss / d z = grad / B, and the gradient reaches the images through the VAE encoder / the
resize. ``eps_cond`` uses the view-dependent prompt of each camera ("<prompt>, front view", ...).
A camera-conditioned model (MVDream-style, ``backend.camera_conditioning``; the bundle's
``camera_encoding``) also gets each view's own camera, in both the conditional and the
unconditional pass, so every view is denoised towards the same 3D orientation.

For latent models the VAE encoder's backward runs inside ``sds_loss`` (a vector-Jacobian product on
a detached copy of the images), so the encoder's activations are freed before the renderer's
backward and, with ``cpu_offload``, the encoder is on the compute device for both passes. The step
keeps every value on the device: no host synchronisation (``.item()``, ``.cpu()``) per step.

Options (``GuidanceConfig``):

* ``t_sampling="dreamtime"``: instead of t ~ U[t_lo, t_hi], a monotonically decreasing,
  time-prioritised t(step_ratio) (DreamTime, Huang et al. 2023; ``backend.schedule.dreamtime_timestep``)
  within [t_min, t_max], jittered by ±``t_jitter``.
* ``sds_form="x0"``: SDS as reconstruction (StableDreamer, Guo et al. 2023): the one-step denoised
  estimate x0_hat = (z_t − sqrt(1 − a_t)·eps_hat) / sqrt(a_t) (clamped to [−1, 1] for pixel-space
  models) is a target and loss = 0.5·x0_weight·sum((z − x0_hat)^2) / B; with a decreasing t the
  target's noise level is annealed.
* ``sds_form="multistep"``: the target is a multi-step denoised image (DreamGaussian, Tang et al.
  2023, stage 2: the render is noised to t and denoised with several DDIM steps, and the render is
  pulled toward the result with an MSE loss): z_t is denoised by ``denoise_steps`` deterministic DDIM
  steps (eta 0) from t to 0, each with classifier-free guidance, and loss = 0.5·x0_weight·sum((z −
  x0)^2) / B. One step is the x0 form; more steps give a sample of the prior near the render (a sharp
  mode) instead of the one-step posterior mean (a blur over every image the noisy render could have
  come from). Costs ``denoise_steps`` UNet passes per view instead of one.
* ``sds_form="ism"``: Interval Score Matching (LucidDreamer, Liang et al. 2024). The render is not
  noised with fresh random noise: it is carried to s = t − ``ism_interval`` by deterministic DDIM
  inversion (eta 0, the unconditional prediction, steps of at most ``ism_inversion_stride`` timesteps
  from t = 0), and from s to t by one more inversion step. The gradient is w(t)·(eps_hat(z_t, t) −
  eps_uncond(z_s, s)): the guided score at t against the unconditional one a short interval below on
  the same trajectory, in place of SDS's random eps. So z_t keeps the render's own layout (its pose,
  its yaw) at every noise level, and the target carries no noise of its own. Costs
  ceil(s / ``ism_inversion_stride``) + 1 unconditional UNet passes per view on top of the guided one.
  Measured on the cpu preset (docs/benchmarks.md, session 20): better cones and pyramids, worse red
  cylinders and cubes, the same IoU passes, and about 1.7× the time a job; off. ``ism_until`` < 1 uses
  ISM for that fraction of the run only and SDS's fresh noise after it.
* ``sds_form="csd"``: Classifier Score Distillation (Yu et al. 2024, "Text-to-3D with Classifier Score
  Distillation"): grad = w(t)·cfg·(eps_cond − eps_uncond), the classifier-free guidance term alone. SDS's
  other term, eps_uncond − eps, pulls the render toward any image of the prior at that noise (the
  unconditional score minus the noise that was added: high variance, and the paper finds it adds little).
  The same UNet passes as SDS; ``cfg_scale`` is the term's weight, so the learning rates keep their scale.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from backend.camera_conditioning import encode_cameras
from backend.guidance.base import Guidance, GuidanceError
from backend.guidance.loader import ModelBundle, encode_texts, on_compute_device
from backend.schedule import anneal, dreamtime_timestep

log = logging.getLogger(__name__)


VIEW_ORDER = ("front", "side", "back", "overhead")


def view_word_index(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor:
    """(B,) long index into ``VIEW_ORDER`` per camera; the tensor twin of ``cameras.view_word`` (no host sync)."""
    a = torch.remainder(azimuth_deg.float() + 180.0, 360.0) - 180.0
    idx = torch.where(a.abs() <= 45.0, 0, torch.where(a.abs() <= 135.0, 1, 2))
    return torch.where(elevation_deg.float() > 60.0, 3, idx).long()


def view_prompt(prompt: str, word: str) -> str:
    """The view-dependent prompt: ``"<prompt>, <word> view"``."""
    return f"{prompt}, {word} view"


class DiffusionGuidance(Guidance):
    """SDS guidance from a resident :class:`ModelBundle` and a ``GuidanceConfig``."""

    def __init__(self, bundle: ModelBundle, config, description: str = "") -> None:
        self.bundle = bundle
        self.config = config
        self.model_id = bundle.model_id
        self.resolution = bundle.resolution
        self.sides = bundle.sides
        self.vocabulary = bundle.vocabulary
        self.description = description or f"using model {bundle.model_id}"
        self.device = bundle.device
        self.unet = bundle.unet
        self.text_encoder = None  # released: lives in the bundle on the CPU between prompts
        self._cond: dict[str, torch.Tensor] = {}
        self._uncond: torch.Tensor | None = None
        self.prompt: str | None = None
        self.last: dict = {}

    @property
    def is_latent(self) -> bool:
        return self.bundle.is_latent

    def with_config(self, **changes) -> DiffusionGuidance:
        """A guidance sharing this one's model and prompt embeddings with ``GuidanceConfig`` fields
        changed (e.g. the fine stage's own t_max / cfg_scale)."""
        import copy
        import dataclasses

        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        return other

    # ------------------------------------------------------------------ prompts
    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise GuidanceError("the prompt is empty")
        prompt = prompt.strip()
        negative = (negative_prompt or self.config.negative_prompt or "").strip()
        words = ("front", "side", "back", "overhead")
        texts = {w: view_prompt(prompt, w) if self.config.view_dependent else prompt for w in words}
        embeds = encode_texts(self.bundle, list(texts.values()) + [negative], offload=self.config.cpu_offload)
        dtype = self.bundle.dtype
        self._cond = {w: embeds[t].to(self.device, dtype) for w, t in texts.items()}
        self._cond_stack = torch.cat([self._cond[w] for w in VIEW_ORDER], dim=0)  # (4, L, D)
        self._uncond = embeds[negative].to(self.device, dtype)
        self.prompt = prompt

    def view_embeddings(self, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor:
        """(B, L, D) conditional embeddings, one view word per camera."""
        if self._uncond is None:
            raise GuidanceError("call set_prompt() before sds_loss()")
        index = view_word_index(azimuth_deg.detach(), elevation_deg.detach()).to(self._cond_stack.device)
        return self._cond_stack.index_select(0, index)

    # ------------------------------------------------------------------ SDS
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → the UNet's input space (latents or [-1, 1] RGB), float32.
        A pixel-space model keeps a square image at any side it declares (``bundle.sides``); anything
        else is resized to the model's ``resolution``."""
        size = self.bundle.unet.config.sample_size if not self.is_latent else self.resolution
        if not self.is_latent and images.shape[-1] == images.shape[-2] and images.shape[-1] in self.bundle.sides:
            size = images.shape[-1]
        x = images
        if x.shape[-2:] != (size, size):
            down = x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
        x = x * 2.0 - 1.0
        if not self.is_latent:
            return x.float()
        vae = self.bundle.vae
        vae_dtype = next(vae.parameters()).dtype
        encoded = vae.encode(x.to(self.device, vae_dtype))
        if self.bundle.vae_kind == "taesd":  # AutoencoderTiny: deterministic latents, already SD-scaled
            latents = encoded.latents * float(vae.config.scaling_factor)
        else:
            latents = encoded.latent_dist.sample() * float(vae.config.scaling_factor)
        return latents.float()

    def sample_timesteps(self, batch: int, step_ratio: float, lo: int, hi: int) -> tuple[torch.Tensor, int, int]:
        """Timesteps (B,) long on the device, and the (lo, hi) range they were drawn from.

        ``t_sampling="uniform"``: t ~ U[lo, hi] (the annealed range). ``"dreamtime"``: the
        time-prioritised, monotonically decreasing t(step_ratio) of DreamTime (Huang et al. 2023)
        within [t_min, t_max], jittered by ±``t_jitter``; drawn on the host, so no device sync.
        """
        c = self.config
        if c.t_sampling != "dreamtime":
            return torch.randint(lo, hi + 1, (batch,), device=self.device, dtype=torch.long), lo, hi
        T = self.bundle.num_train_timesteps
        centre = dreamtime_timestep(step_ratio, c.t_min, c.t_max, c.dreamtime_m1, c.dreamtime_m2,
                                    c.dreamtime_s1, c.dreamtime_s2) * T
        jitter = (torch.rand(batch) * 2.0 - 1.0) * float(c.t_jitter) * T
        t = (centre + jitter).round().long().clamp(1, T - 1)
        return t.to(self.device), int(t.min()), int(t.max())

    def timestep_range(self, step_ratio: float) -> tuple[int, int]:
        """Annealed [t_lo, t_hi] (integer timesteps) at ``step_ratio``."""
        c = self.config
        T = self.bundle.num_train_timesteps
        t_min = anneal(c.t_min, c.t_min_end, step_ratio, c.t_anneal)
        t_max = anneal(c.t_max, c.t_max_end, step_ratio, c.t_anneal)
        lo = int(round(min(t_min, t_max) * T))
        hi = int(round(max(t_min, t_max) * T))
        lo = min(max(lo, 1), T - 1)
        hi = min(max(hi, lo), T - 1)
        return lo, hi

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        a = self.bundle.alphas_cumprod[t]
        if self.config.weighting == "sds":
            return 1.0 - a
        if self.config.weighting == "uniform":
            return torch.ones_like(a)
        if self.config.weighting == "fantasia3d":
            return a.sqrt() * (1.0 - a)
        if self.config.weighting == "sigma":  # LucidDreamer's w(t) for interval score matching
            return ((1.0 - a) / a).sqrt()
        raise GuidanceError(f"unknown SDS weighting {self.config.weighting!r}")

    def camera_labels(self, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor | None:
        """(B, D) camera vectors for a camera-conditioned model (``backend.camera_conditioning``), else None."""
        encoding = self.bundle.camera_encoding
        if encoding is None:
            return None
        return encode_cameras(encoding, azimuth_deg.detach(), elevation_deg.detach()).to(self.device, self.bundle.dtype)

    def cfg_scale_at(self, step_ratio: float) -> float:
        """The classifier-free guidance scale at ``step_ratio``: ``cfg_scale``, or annealed linearly
        from it to ``cfg_scale_end`` over the run when that is set."""
        c = self.config
        if c.cfg_scale_end is None:
            return float(c.cfg_scale)
        return anneal(float(c.cfg_scale), float(c.cfg_scale_end), step_ratio, "linear")

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      camera: torch.Tensor | None = None, cfg_scale: float | None = None) -> torch.Tensor:
        """CFG noise prediction (B, C, h, w) float32 for noisy inputs ``z_t`` at timesteps ``t``;
        ``camera`` (B, D): the views' camera vectors for a camera-conditioned model (both passes);
        ``cfg_scale``: the guidance scale (None: the config's ``cfg_scale``)."""
        eps_cond, eps_uncond = self.noise_pair(z_t, t, cond, camera)
        scale = self.config.cfg_scale if cfg_scale is None else cfg_scale
        return eps_uncond + scale * (eps_cond - eps_uncond)

    def noise_pair(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   camera: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond), each (B, C, h, w) float32: the conditional and the unconditional noise
        predictions for ``z_t`` at timesteps ``t`` (B,), in one batched UNet pass."""
        B = z_t.shape[0]
        uncond = self._uncond.expand(B, -1, -1)
        labels = None if camera is None else torch.cat([camera, camera], dim=0)
        out = self.unet_noise(torch.cat([z_t, z_t], dim=0), torch.cat([t, t], dim=0), torch.cat([cond, uncond], 0),
                              labels)
        eps_cond, eps_uncond = out.chunk(2)
        return eps_cond, eps_uncond

    def unet_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                   camera: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet pass: the noise (B, C, h, w) float32 it predicts for ``z_t`` at timesteps ``t`` (B,) under
        text ``embeddings`` (B, L, D) and camera vectors (B, D) or None, whatever its prediction type."""
        with on_compute_device(self.bundle, self.bundle.unet):
            out = self.bundle.unet(z_t.to(self.bundle.dtype), t, encoder_hidden_states=embeddings,
                                   class_labels=camera).sample
        out = out.float()
        a = self.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
        zz = z_t.float()
        ptype = self.bundle.prediction_type
        if ptype == "v_prediction":
            return a.sqrt() * out + (1.0 - a).sqrt() * zz
        if ptype == "sample":
            return (zz - a.sqrt() * out) / (1.0 - a).sqrt()
        if ptype != "epsilon":
            raise GuidanceError(f"unsupported prediction_type {ptype!r}")
        return out

    def x0_estimate(self, z_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """The one-step denoised estimate (B, C, h, w) of ``z_t`` at timesteps ``t`` (B,) given its noise
        prediction; clamped to [-1, 1] for pixel-space models (their images' range)."""
        a = self.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (z_t - (1.0 - a).sqrt() * eps_hat) / a.sqrt()
        return x0 if self.is_latent else x0.clamp(-1.0, 1.0)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor, cond: torch.Tensor,
                camera: torch.Tensor | None, steps: int, cfg_scale: float | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta 0; Song et al. 2021) from ``z_t`` at timesteps ``t`` (B,) down to a clean
        sample (B, C, h, w) in ``steps`` evenly spaced steps per view; ``eps_hat`` is the CFG noise
        prediction already made at ``t`` (reused as the first step's). Used by ``sds_form="multistep"``."""
        steps = max(int(steps), 1)
        x, t_k, eps = z_t, t, eps_hat
        for k in range(1, steps):
            x0 = self.x0_estimate(x, t_k, eps)
            a = self.bundle.alphas_cumprod[t_k].view(-1, 1, 1, 1)
            eps = (x - a.sqrt() * x0) / (1.0 - a).sqrt()  # consistent with a clamped x0 (as diffusers' DDIM)
            t_k = (t.float() * (1.0 - k / steps)).round().long().clamp_min(1)
            a_next = self.bundle.alphas_cumprod[t_k].view(-1, 1, 1, 1)
            x = a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * eps
            eps = self.predict_noise(x, t_k, cond, camera, cfg_scale)
        return self.x0_estimate(x, t_k, eps)

    def invert(self, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, steps: int,
               camera: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM inversion (eta 0; Song et al. 2021, run forward in t) of clean inputs ``z`` (B, C, h, w) with
        the unconditional prediction: ``steps`` equal steps from t = 0 up to ``s`` (B,), then one from ``s``
        to ``t`` (B,). Returns (z_t, eps_uncond(z_s, s)), the noisy input at ``t`` and the last step's
        noise prediction, which is Interval Score Matching's target (LucidDreamer, Liang et al. 2024)."""
        alphas = self.bundle.alphas_cumprod
        steps = max(int(steps), 1)
        # t = 0: the render at the schedule's first level. LucidDreamer also adds that level's tiny noise,
        # sqrt(1 - alpha_bar_0)·eps; without it the whole trajectory is deterministic.
        x = alphas[0].sqrt() * z
        t_k = torch.zeros_like(s)
        eps = None
        marks = [(s.float() * k / steps).round().long() for k in range(1, steps + 1)] + [t]
        for t_next in marks:
            eps = self.unet_noise(x, t_k, self._uncond.expand(x.shape[0], -1, -1), camera)
            x = self.ddim_step(x, eps, t_k, t_next)
            t_k = t_next
        return x, eps

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step (eta 0; Song et al. 2021) of ``x`` (B, C, h, w) from timesteps ``t_from``
        to ``t_to`` (B,), given the noise ``eps`` predicted at ``t_from``, with the clean estimate unclamped.
        Up in t it is DDIM inversion (``invert``), down it denoises."""
        a = self.bundle.alphas_cumprod[t_from].view(-1, 1, 1, 1)
        a_next = self.bundle.alphas_cumprod[t_to].view(-1, 1, 1, 1)
        x0 = (x - (1.0 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * eps

    def sds_loss(self, images: torch.Tensor, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                 step_ratio: float) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise GuidanceError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        B = images.shape[0]
        cond = self.view_embeddings(azimuth_deg, elevation_deg)
        camera = self.camera_labels(azimuth_deg, elevation_deg)
        x = images.to(self.device)
        latent = self.is_latent
        lo, hi = self.timestep_range(step_ratio)
        vae_ctx = on_compute_device(self.bundle, self.bundle.vae) if latent else contextlib.nullcontext()
        with vae_ctx:
            if latent:
                x_in = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    z = self.encode_images(x_in)
            else:
                z = self.encode_images(x)
            t, lo, hi = self.sample_timesteps(B, step_ratio, lo, hi)  # after encoding: same RNG order as before
            with torch.no_grad():
                if self.config.sds_form == "ism" and step_ratio < float(self.config.ism_until):
                    s = (t - int(self.config.ism_interval)).clamp_min(0)
                    steps = -(-max(hi - int(self.config.ism_interval), 0) // int(self.config.ism_inversion_stride))
                    z_t, noise = self.invert(z.detach(), s, t, steps, camera)
                else:
                    noise = torch.randn_like(z)
                    a = self.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
                    z_t = a.sqrt() * z.detach() + (1.0 - a).sqrt() * noise
                scale = self.cfg_scale_at(step_ratio)
                if self.config.sds_form == "csd":  # the guidance term alone; no noise is subtracted
                    eps_cond, eps_uncond = self.noise_pair(z_t, t, cond, camera)
                    grad = self.weight(t).view(-1, 1, 1, 1) * scale * (eps_cond - eps_uncond)
                else:
                    eps_hat = self.predict_noise(z_t, t, cond, camera, scale)
                    if self.config.sds_form == "multistep":
                        x0 = self.denoise(z_t, t, eps_hat, cond, camera, int(self.config.denoise_steps), scale)
                        grad = float(self.config.x0_weight) * (z.detach() - x0)
                    elif self.config.sds_form == "x0":
                        grad = float(self.config.x0_weight) * (z.detach() - self.x0_estimate(z_t, t, eps_hat))
                    else:
                        grad = self.weight(t).view(-1, 1, 1, 1) * (eps_hat - noise)
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                if self.config.grad_clip > 0:
                    grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
            if latent:
                # d loss / d z = grad / B; push it through the encoder now (on the compute device)
                (g_x,) = torch.autograd.grad(z, x_in, grad_outputs=grad / B)
        if latent:
            value = 0.5 * grad.square().sum() / B  # = 0.5 * |z - (z - grad)|^2 / B
            surrogate = (x * g_x.detach()).sum()
            loss = surrogate - surrogate.detach() + value
        else:
            target = (z - grad).detach()
            loss = 0.5 * F.mse_loss(z, target, reduction="sum") / B
        self.last = {"t": t.detach(), "grad_norm": grad.detach().norm(), "t_range": (lo, hi)}
        return loss
