"""3D Gaussian parameters, initialisation and their Adam optimiser.

World frame: Blender's (metres, +Z up, front -Y); the object lives in the cube [-1, 1]^3.

Raw parameters (``torch.nn.Parameter``, float32, N Gaussians):
    means (N, 3) world positions; log_scales (N, 3) log standard deviations (world units);
    quats (N, 4) unnormalised rotations (w, x, y, z); opacity_logits (N,) (sigmoid → opacity);
    color_logits (N, 3) (sigmoid → RGB in [0, 1], the colour the diffusion prior sees, sRGB).
``activated()`` returns the rendered quantities as a :class:`Gaussians`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backend.gaussians.cameras import Cameras
from backend.gaussians.render import RenderOutput, render_gaussians

PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "color_logits")


@dataclass
class Gaussians:
    """Activated Gaussians: means (N,3), quats (N,4) unit, scales (N,3) > 0, opacities (N,), colors (N,3)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def detach(self) -> Gaussians:
        return Gaussians(*(t.detach() for t in (self.means, self.quats, self.scales, self.opacities, self.colors)))

    def to(self, device) -> Gaussians:
        return Gaussians(*(t.to(device) for t in (self.means, self.quats, self.scales, self.opacities, self.colors)))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class GaussianModel:
    """Trainable Gaussians; ``params`` maps each name in ``PARAM_NAMES`` to its Parameter."""

    def __init__(self, means, log_scales, quats, opacity_logits, color_logits) -> None:
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, value in zip(PARAM_NAMES, (means, log_scales, quats, opacity_logits, color_logits)):
            self.params[name] = torch.nn.Parameter(value.detach().float().contiguous())

    # ---------------------------------------------------------------- construction
    @classmethod
    def init_random(cls, num_points: int, radius: float = 0.5, shape: str = "sphere", scale: float = 0.03,
                    opacity: float = 0.1, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> GaussianModel:
        """``num_points`` Gaussians uniform in a ball (``shape="sphere"``) or on a sphere ("shell") of
        ``radius``, isotropic std ``scale``, opacity ``opacity``, grey-ish random colours."""
        if num_points < 1:
            raise ValueError("num_points must be >= 1")
        if shape not in ("sphere", "shell"):
            raise ValueError(f"unknown init shape {shape!r}; expected 'sphere' or 'shell'")
        d = torch.randn(num_points, 3, generator=generator)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        if shape == "sphere":
            r = radius * torch.rand(num_points, 1, generator=generator) ** (1.0 / 3.0)
        else:
            r = torch.full((num_points, 1), float(radius))
        means = d * r
        log_scales = torch.full((num_points, 3), math.log(scale))
        quats = torch.zeros(num_points, 4)
        quats[:, 0] = 1.0
        opacity_logits = torch.full((num_points,), _logit(opacity))
        colors = 0.5 + 0.1 * (torch.rand(num_points, 3, generator=generator) - 0.5)
        color_logits = torch.log(colors / (1.0 - colors))
        return cls(*(t.to(device) for t in (means, log_scales, quats, opacity_logits, color_logits)))

    @classmethod
    def from_gaussians(cls, g: Gaussians) -> GaussianModel:
        """Trainable copy of activated Gaussians (opacities/colours clamped away from 0 and 1)."""
        op = g.opacities.clamp(1e-4, 1 - 1e-4)
        col = g.colors.clamp(1e-4, 1 - 1e-4)
        return cls(g.means, g.scales.clamp_min(1e-8).log(), g.quats, torch.log(op / (1 - op)),
                   torch.log(col / (1 - col)))

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.params["means"].shape[0])

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    @property
    def means(self) -> torch.Tensor:
        return self.params["means"]

    def activated(self) -> Gaussians:
        p = self.params
        quats = p["quats"] / p["quats"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return Gaussians(p["means"], quats, torch.exp(p["log_scales"]), torch.sigmoid(p["opacity_logits"]),
                         torch.sigmoid(p["color_logits"]))

    def render(self, cameras: Cameras, background: torch.Tensor | None = None, backend: str = "auto",
               retain_means2d: bool = False, depth_variance: bool = False) -> RenderOutput:
        g = self.activated()
        return render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, cameras, background,
                                backend=backend, retain_means2d=retain_means2d, depth_variance=depth_variance)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device="cpu") -> GaussianModel:
        return cls(*(state[k].to(device) for k in PARAM_NAMES))

    # ---------------------------------------------------------------- optimiser
    def make_optimizer(self, lrs: dict[str, float]) -> torch.optim.Adam:
        """Adam with one param group per parameter (group ``name`` = parameter name)."""
        groups = [{"params": [self.params[n]], "lr": float(lrs[n]), "name": n} for n in PARAM_NAMES]
        return torch.optim.Adam(groups, eps=1e-15)

    @torch.no_grad()
    def reset_opacity(self, optimizer: torch.optim.Adam | None, ceiling: float = 0.05) -> None:
        """Lower every opacity to at most ``ceiling`` and clear its Adam moments (3D Gaussian
        Splatting's opacity reset, Kerbl et al. 2023 §5.2): Gaussians the loss needs grow back, the
        rest (films, floaters) stay faint and are pruned."""
        logits = self.params["opacity_logits"]
        logits.clamp_(max=_logit(ceiling))
        if optimizer is not None:
            state = optimizer.state.get(logits)
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    def replace(self, optimizer: torch.optim.Adam | None, keep: torch.Tensor,
                extra: dict[str, torch.Tensor] | None = None) -> None:
        """Keep rows ``keep`` (bool (N,) or indices) and append ``extra`` rows to every parameter,
        carrying Adam moments along (zeros for new rows)."""
        for name in PARAM_NAMES:
            old = self.params[name]
            new_value = old.detach()[keep]
            if extra is not None:
                new_value = torch.cat([new_value, extra[name].to(new_value)], dim=0)
            new_param = torch.nn.Parameter(new_value.contiguous())
            if optimizer is not None:
                for group in optimizer.param_groups:
                    if group["params"][0] is old:
                        state = optimizer.state.pop(old, None)
                        if state:
                            for key in ("exp_avg", "exp_avg_sq"):
                                v = state[key][keep]
                                if extra is not None:
                                    v = torch.cat([v, torch.zeros_like(extra[name]).to(v)], dim=0)
                                state[key] = v.contiguous()
                            optimizer.state[new_param] = state
                        group["params"][0] = new_param
            self.params[name] = new_param
