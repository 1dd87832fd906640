"""The reference view (text → image → 3D): its mask, framing, sampler, loss and run_job wiring."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backend.guidance import load_guidance
from backend.guidance.base import GuidanceError
from backend.pipeline.coarse import run_coarse_stage
from backend.pipeline.events import JobContext
from backend.pipeline.presets import CoarseConfig, GuidanceConfig
from backend.pipeline.reference_view import (
    ReferenceView,
    foreground_mask,
    mask_extent,
    recentre,
    reference_camera,
    reference_mask_loss,
    rescale,
    sample_image,
)
from backend.pipeline.run import run_job
from tests.test_coarse_sds import SMALL, draft_params

BACKDROP = torch.tensor([0.2, 0.6, 0.3])


def square_image(top: int, left: int, size: int, side: int = 32) -> torch.Tensor:
    img = BACKDROP.view(1, 3, 1, 1).repeat(1, 1, side, side)
    img[:, :, top:top + size, left:left + size] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    img[:, :, top:top + size // 2, left:left + size] *= 0.6  # a darker, shaded half still counts
    return img


def test_the_mask_follows_the_object_and_the_framing_centres_and_scales_it():
    img = square_image(3, 4, 10)
    mask, bg, spread, contrast = foreground_mask(img)
    assert torch.allclose(bg[0], BACKDROP) and spread < 1e-6 and contrast > 0.5
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[3:13, 4:14] = True
    assert (mask[0, 0][inside] == 1).all() and (mask[0, 0][~inside] == 0).all()
    assert mask_extent(mask) == 10.0

    img2, mask2 = recentre(img, mask, bg)
    ys, xs = torch.nonzero(mask2[0, 0] > 0.5, as_tuple=True)
    assert (int(ys.min()) + int(ys.max())) / 2 in (15.0, 15.5, 16.0)
    assert (int(xs.min()) + int(xs.max())) / 2 in (15.0, 15.5, 16.0)
    assert torch.allclose(img2[0, :, 0, 0], BACKDROP)  # what came in is the backdrop
    assert float(mask2.sum()) == float(mask.sum())  # nothing was cut off

    img3, mask3 = rescale(img2, mask2, bg, 1.6)
    assert abs(mask_extent(mask3) - 16.0) <= 1.0
    assert torch.allclose(img3[0, :, 0, 0], BACKDROP, atol=1e-6)


def test_a_busy_backdrop_is_reported():
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, _, spread, _ = foreground_mask(noisy)
    assert spread > 0.2


def test_the_sampler_draws_reproducible_images_and_refuses_a_model_without_a_decoder(tiny_models):
    torch.set_num_threads(1)
    latent = load_guidance(GuidanceConfig(model=str(tiny_models["latent"])), "cpu")
    latent.set_prompt("a red cube")
    with pytest.raises(GuidanceError, match="without its VAE decoder"):
        sample_image(latent, reference_camera(CoarseConfig(), 32), 4, 3.0, torch.Generator().manual_seed(1))
    for kind in ("pixel",):
        guidance = load_guidance(GuidanceConfig(model=str(tiny_models[kind]), cfg_scale=3.0), "cpu")
        guidance.set_prompt("a red cube")
        cams = reference_camera(CoarseConfig(), 32)
        a = sample_image(guidance, cams, 4, 3.0, torch.Generator().manual_seed(1))
        b = sample_image(guidance, cams, 4, 3.0, torch.Generator().manual_seed(1))
        c = sample_image(guidance, cams, 4, 3.0, torch.Generator().manual_seed(2))
        assert a.shape[:2] == (1, 3) and a.shape[-1] == a.shape[-2]
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, b) and not torch.equal(a, c), kind


def test_the_coarse_stage_fits_its_silhouette_to_the_reference_mask():
    """With no other loss, the stage's mask term alone makes the Gaussians' alpha in the reference camera
    approach a disc they did not start as."""
    torch.set_num_threads(1)
    side = 32
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 8.0 ** 2).float()[None, None]
    config = replace(SMALL, steps=40, densify_until=0.0, preview_every=0, reference_weight=1.0)
    ref = ReferenceView(disc.repeat(1, 3, 1, 1), disc, torch.zeros(1, 3), reference_camera(config, side), 0)

    def no_guidance(images, cams, bg, ratio):
        return images.sum() * 0.0

    start = run_coarse_stage(no_guidance, replace(config, steps=0), JobContext(out_dir=None),
                             generator=torch.Generator().manual_seed(0))
    before = float(reference_mask_loss(start.gaussians, ref, "torch").detach())
    end = run_coarse_stage(no_guidance, config, JobContext(out_dir=None), generator=torch.Generator().manual_seed(0),
                           reference=ref)
    after = float(reference_mask_loss(end.gaussians, ref, "torch").detach())
    assert after < 0.5 * before, (before, after)


def test_run_job_draws_a_reference_writes_it_and_uses_it(tiny_models, tmp_path):
    off = run_job(draft_params(tiny_models["pixel"]), JobContext(out_dir=tmp_path / "off"))
    assert not (tmp_path / "off" / "reference.png").exists()
    params = draft_params(tiny_models["pixel"], overrides={"coarse.reference_weight": 100.0,
                                                           "coarse.reference_steps": 4})
    on = run_job(params, JobContext(out_dir=tmp_path / "on"))
    assert (tmp_path / "on" / "reference.png").is_file()
    assert on.info["preset"]["coarse"]["reference_weight"] == 100.0
    assert on.mesh.positions.shape != off.mesh.positions.shape or not (on.mesh.positions == off.mesh.positions).all()


def test_the_reference_can_come_from_another_model_and_a_missing_one_is_named(tiny_models, tmp_path):
    params = draft_params(tiny_models["latent"], overrides={"coarse.reference_weight": 100.0,
                                                            "coarse.reference_steps": 4,
                                                            "coarse.reference_model": str(tiny_models["pixel"])})
    result = run_job(params, JobContext(out_dir=tmp_path / "other"))
    assert (tmp_path / "other" / "reference.png").is_file()
    assert result.info["preset"]["coarse"]["reference_model"] == str(tiny_models["pixel"])
    missing = draft_params(tiny_models["pixel"], overrides={"coarse.reference_weight": 100.0,
                                                            "coarse.reference_model": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        run_job(missing, JobContext(out_dir=tmp_path / "missing"))
    assert not (tmp_path / "missing" / "asset.glb").exists()
