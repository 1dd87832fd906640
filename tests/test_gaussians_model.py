"""Gaussian parameters, initialisation, per-parameter Adam and densify/prune bookkeeping."""

from __future__ import annotations

import torch

from backend.gaussians.cameras import orbit_cameras
from backend.gaussians.densify import Densifier
from backend.gaussians.model import PARAM_NAMES, GaussianModel
from backend.pipeline.presets import CoarseConfig


def test_init_shapes_and_ranges():
    gen = torch.Generator().manual_seed(0)
    m = GaussianModel.init_random(500, radius=0.5, shape="sphere", scale=0.03, opacity=0.1, generator=gen)
    g = m.activated()
    assert g.means.shape == (500, 3) and g.quats.shape == (500, 4) and g.scales.shape == (500, 3)
    assert g.opacities.shape == (500,) and g.colors.shape == (500, 3)
    r = g.means.norm(dim=-1)
    assert r.max() <= 0.5 + 1e-6 and r.min() < 0.3  # filled ball
    assert torch.allclose(g.scales, torch.full_like(g.scales, 0.03))
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.1))
    shell = GaussianModel.init_random(100, radius=0.4, shape="shell").activated()
    assert torch.allclose(shell.means.norm(dim=-1), torch.full((100,), 0.4), atol=1e-5)


def test_per_parameter_learning_rates():
    m = GaussianModel.init_random(10)
    lrs = {"means": 1e-3, "log_scales": 2e-3, "quats": 3e-3, "opacity_logits": 4e-3, "color_logits": 5e-3}
    opt = m.make_optimizer(lrs)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == lrs


def test_densify_clone_split_prune_keeps_adam_state():
    gen = torch.Generator().manual_seed(0)
    m = GaussianModel.init_random(100, radius=0.4, scale=0.03, opacity=0.5, generator=gen)
    with torch.no_grad():
        m.params["log_scales"][:10] = torch.log(torch.tensor(0.08))  # big ones get split
        m.params["opacity_logits"][90:] = -10.0                       # transparent ones get pruned
    opt = m.make_optimizer({n: 1e-3 for n in PARAM_NAMES})
    dens = Densifier(CoarseConfig(num_points=100, densify_fraction=0.2, max_points=1000, prune_opacity=0.01,
                                 split_scale=0.05), len(m))
    cams = orbit_cameras([0.0, 90.0], [10.0, 10.0], 3.0, 49.0, width=32)
    out = m.render(cams, torch.ones(3), backend="torch", retain_means2d=True)
    (out.image * torch.rand_like(out.image)).sum().backward()
    opt.step()
    dens.accumulate(out, 32, 32)
    assert dens.count.sum() > 0 and dens.grad_sum.sum() > 0
    info = dens.step(m, opt, gen)
    assert info["cloned"] + info["split"] == 20
    assert info["pruned"] >= 10
    assert info["points"] == len(m) == 100 + info["cloned"] + info["split"] - info["pruned"]
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is m.params[group["name"]]
        assert opt.state[p]["exp_avg"].shape == p.shape
    assert (m.activated().opacities >= 0.01).all()
    # the optimiser still works after the surgery
    out = m.render(cams, torch.ones(3), backend="torch")
    out.image.sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.params.values())


def test_state_dict_roundtrip():
    m = GaussianModel.init_random(20)
    m2 = GaussianModel.from_state_dict(m.state_dict())
    for n in PARAM_NAMES:
        assert torch.equal(m.params[n], m2.params[n])
    m3 = GaussianModel.from_gaussians(m.activated().detach())
    assert torch.allclose(m3.activated().opacities, m.activated().opacities, atol=1e-5)


def test_opacity_reset_lowers_every_opacity_and_clears_its_adam_moments():
    """3D Gaussian Splatting's opacity reset: opacities ≤ the ceiling, moments zeroed, others untouched."""
    model = GaussianModel.init_random(50, 0.5, "sphere", 0.03, 0.9, torch.Generator().manual_seed(0), "cpu")
    opt = model.make_optimizer({n: 1e-2 for n in model.params})
    (model.activated().opacities.sum() + model.params["means"].square().sum()).backward()
    opt.step()
    means = model.params["means"].detach().clone()
    model.reset_opacity(opt, ceiling=0.05)
    assert float(model.activated().opacities.detach().max()) <= 0.05 + 1e-6
    state = opt.state[model.params["opacity_logits"]]
    assert float(state["exp_avg"].abs().max()) == 0.0 and float(state["exp_avg_sq"].abs().max()) == 0.0
    assert float(opt.state[model.params["means"]]["exp_avg_sq"].abs().max()) > 0.0
    assert torch.equal(model.params["means"].detach(), means)
