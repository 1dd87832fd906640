"""Densify / prune schedule for short SDS runs (hundreds to a few thousand steps).

Between densify steps the view-space gradient of every Gaussian's projected centre is
accumulated (pixel units scaled by half the image size as gsplat's default strategy, averaged over
the views that saw it). At each densify step the ``fraction`` of Gaussians with the largest
average gradient grow: small ones (max std <= ``split_scale``, world units) are cloned, large ones
split into two samples of themselves with std / 1.6. Then Gaussians that are nearly transparent
(opacity < ``prune_opacity``), too large (max std > ``prune_scale``) or outside ``BOUND`` are pruned.
The settings are read from the coarse stage's config (``CoarseConfig``; see :class:`DensifySettings`).
Using a fraction instead of an absolute threshold keeps the schedule independent of the loss scale
(SDS, reference images).
"""

from __future__ import annotations

from typing import Protocol

import torch

from backend.gaussians.model import PARAM_NAMES, GaussianModel
from backend.gaussians.render import RenderOutput, quat_to_rotmat

#: Gaussians whose centre leaves [-BOUND, BOUND]^3 (world units) are pruned.
BOUND = 1.2
#: Pruning never leaves fewer Gaussians than this.
MIN_POINTS = 16


class DensifySettings(Protocol):
    """The densify/prune fields of ``backend.pipeline.presets.CoarseConfig`` (documented there)."""

    densify_fraction: float
    max_points: int
    prune_opacity: float
    prune_scale: float
    split_scale: float


class Densifier:
    """Accumulates view-space gradients and applies densify/prune to a :class:`GaussianModel`."""

    def __init__(self, config: DensifySettings, num_points: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.reset(num_points, device)

    def reset(self, num_points: int, device: torch.device | str = "cpu") -> None:
        self.grad_sum = torch.zeros(num_points, device=device)
        self.count = torch.zeros(num_points, device=device)

    @torch.no_grad()
    def accumulate(self, out: RenderOutput, width: int, height: int) -> None:
        """Add the view-space gradient norms of one backward pass (``out`` rendered with retain_means2d)."""
        if out.means2d is None or out.means2d.grad is None:
            return
        g = out.means2d.grad.clone()  # (C, N, 2)
        g[..., 0] *= width / 2.0
        g[..., 1] *= height / 2.0
        norm = g.norm(dim=-1)
        vis = out.visible.to(norm.dtype) if out.visible is not None else torch.ones_like(norm)
        self.grad_sum += (norm * vis).sum(0)
        self.count += vis.sum(0)

    @torch.no_grad()
    def step(self, model: GaussianModel, optimizer: torch.optim.Adam | None,
             generator: torch.Generator | None = None) -> dict[str, int]:
        """Densify then prune in place; returns counts {'cloned', 'split', 'pruned', 'points'}."""
        c = self.config
        n = len(model)
        g = model.activated()
        avg = self.grad_sum / self.count.clamp_min(1.0)
        budget = max(0, min(int(c.densify_fraction * n), c.max_points - n))
        cloned = split = 0
        if budget > 0 and bool((avg > 0).any()):
            k = min(budget, int((avg > 0).sum()))
            chosen = torch.topk(avg, k).indices
            big = g.scales[chosen].max(dim=-1).values > c.split_scale
            to_split, to_clone = chosen[big], chosen[~big]
            cloned, split = int(to_clone.numel()), int(to_split.numel())
            extra = {name: model.params[name].detach()[to_clone] for name in PARAM_NAMES}
            if split:
                R = quat_to_rotmat(g.quats[to_split])
                samples = torch.randn(2, split, 3, generator=generator).to(R)
                offsets = torch.einsum("nij,snj->sni", R, samples * g.scales[to_split][None])
                split_means = (g.means[to_split][None] + offsets).reshape(-1, 3)
                split_rows = {name: model.params[name].detach()[to_split].repeat(2, *[1] * (model.params[name].dim() - 1))
                              for name in PARAM_NAMES}
                split_rows["means"] = split_means
                split_rows["log_scales"] = split_rows["log_scales"] - torch.log(torch.tensor(1.6))
                extra = {name: torch.cat([extra[name], split_rows[name]], 0) for name in PARAM_NAMES}
            keep = torch.ones(n, dtype=torch.bool, device=model.device)
            keep[to_split] = False
            model.replace(optimizer, keep, extra)
        g = model.activated()
        prune = (g.opacities < c.prune_opacity) | (g.scales.max(dim=-1).values > c.prune_scale)
        prune |= (g.means.abs() > BOUND).any(dim=-1)
        if int((~prune).sum()) < MIN_POINTS:  # never wipe out the model
            prune[:] = False
        pruned = int(prune.sum())
        if pruned:
            model.replace(optimizer, ~prune)
        self.reset(len(model), model.device)
        return {"cloned": cloned, "split": split, "pruned": pruned, "points": len(model)}
