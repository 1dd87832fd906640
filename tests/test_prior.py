"""The bundled conjure-solids prior: renderer, tokenizer, judges, weights through the guidance, samples.

Fast tests plus ``slow`` ones: the sampled images judged for colour and shape, and the 3D mesh
scoring (the full text-to-3D pipeline on the cpu preset is judged strictly in ``test_quality_ci.py``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backend.gaussians.cameras import orbit_cameras, view_word
from backend.priors import BUNDLED_PRIOR_DIR, COLOURS, SHAPES, VIEWS, prompt_in_vocabulary
from backend.priors.solids import (
    CONE_BOTTOM,
    CONE_RADIUS,
    CONE_TOP,
    CUBE_HALF,
    CYL_HALF_HEIGHT,
    CYL_RADIUS,
    PYR_BOTTOM,
    PYR_HALF,
    PYR_TOP,
    SPHERE_RADIUS,
    TORUS_MAJOR,
    TORUS_MINOR,
    render_solid,
    solid_occupancy,
)

torch.set_num_threads(2)

HAVE_WEIGHTS = (BUNDLED_PRIOR_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="bundled prior weights not trained yet")

# ----------------------------------------------------------------------------- geometry / renderer

EXACT_VOLUMES = {
    "cube": (2 * CUBE_HALF) ** 3,
    "sphere": 4 / 3 * math.pi * SPHERE_RADIUS**3,
    "cylinder": math.pi * CYL_RADIUS**2 * 2 * CYL_HALF_HEIGHT,
    "cone": math.pi * CONE_RADIUS**2 * (CONE_TOP - CONE_BOTTOM) / 3,
    "torus": 2 * math.pi**2 * TORUS_MAJOR * TORUS_MINOR**2,
    "pyramid": (2 * PYR_HALF) ** 2 * (PYR_TOP - PYR_BOTTOM) / 3,
}


@pytest.mark.parametrize("shape", SHAPES)
def test_occupancy_volume_matches_the_exact_solid(shape):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(200_000, 3, generator=g) * 2.4 - 1.2
    vol = solid_occupancy(shape, pts).float().mean().item() * 2.4**3
    assert vol == pytest.approx(EXACT_VOLUMES[shape], rel=0.03)


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown solid 'dragon'"):
        solid_occupancy("dragon", torch.zeros(1, 3))


def test_sphere_silhouette_matches_its_projection():
    """Coverage of a sphere seen from distance d with focal f is a disc of radius f·r/sqrt(d²-r²)."""
    cams = orbit_cameras([0.0, 90.0], [0.0, 30.0], 3.0, 49.0, 64)
    img = render_solid("sphere", (1.0, 0.0, 0.0), cams, (1.0, 1.0, 1.0))
    f = cams.Ks[0, 0, 0].item()
    r_px = f * SPHERE_RADIUS / math.sqrt(3.0**2 - SPHERE_RADIUS**2)
    for k in range(2):
        assert img[k, ..., 3].sum().item() == pytest.approx(math.pi * r_px**2, rel=0.03)
    assert img.shape == (2, 64, 64, 4) and img.dtype == torch.float32


def test_cameras_follow_the_sds_convention():
    """A cone seen from the front at elevation 0: apex at the top of the image (row 0 = top), centred."""
    cams = orbit_cameras([0.0], [0.0], 3.0, 49.0, 64)
    a = render_solid("cone", (0.0, 0.0, 1.0), cams, (1.0, 1.0, 1.0))[0, ..., 3]
    rows = torch.nonzero(a.sum(1) > 0.5).flatten()
    widths = a.sum(1)
    assert widths[rows[0] + 2] < widths[rows[-1] - 2]  # narrow at the top, wide at the bottom
    cols = torch.nonzero(a.sum(0) > 0.5).flatten()
    assert abs((cols[0] + cols[-1]).item() / 2 - 31.5) <= 1.0
    # a pyramid's square base is wider seen at 45° azimuth (its diagonal) than from the front
    cams = orbit_cameras([0.0, 45.0], [0.0, 0.0], 3.0, 49.0, 64)
    p = render_solid("pyramid", (1.0, 1.0, 0.0), cams, (1.0, 1.0, 1.0))[..., 3]
    assert (p[1].sum(0) > 0.5).sum() >= (p[0].sum(0) > 0.5).sum() + 3  # perspective: ~1.1x, not sqrt(2)
    # the light comes from above: the top of a cube is brighter than its front
    cams = orbit_cameras([0.0], [40.0], 3.0, 49.0, 64)
    c = render_solid("cube", (1.0, 1.0, 1.0), cams, (0.0, 0.0, 0.0))[0]
    cols = torch.nonzero(c[..., 3].sum(0) > 0.5).flatten()
    mid = c[:, int(cols.float().mean()), 0]
    rows = torch.nonzero(c[:, int(cols.float().mean()), 3] > 0.99).flatten()
    assert mid[rows[1]] > mid[rows[-2]] + 0.1


def test_view_words_and_vocabulary():
    assert view_word(0, 10) == "front" and view_word(90, 10) == "side" and view_word(180, 0) == "back"
    assert set(VIEWS) == {"front", "side", "back", "overhead"}
    assert prompt_in_vocabulary("a red cube") == (True, [])
    assert prompt_in_vocabulary("An orange torus, side view") == (True, [])
    ok, unknown = prompt_in_vocabulary("a fluffy dragon")
    assert not ok and unknown == ["fluffy", "dragon"]


def test_tokenizer_knows_every_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from backend.priors.tokenizer import vocabulary_words, write_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    for w in vocabulary_words():
        if w.isalpha() or w == ",":
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("a red cube, side view", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.convert_ids_to_tokens(ids[:8]) == [
        "<|startoftext|>", "a</w>", "red</w>", "cube</w>", ",</w>", "side</w>", "view</w>", "<|endoftext|>"]
    # an out-of-world word still tokenizes (letters), no error
    assert len(tok("a dragon").input_ids) > 3


def test_view_sampling_draws_the_asked_share_of_high_elevations():
    from backend.priors.data import sample_view_params

    for frac in (0.0, 0.4, 1.0):
        _, el, _, _ = sample_view_params(4000, torch.Generator().manual_seed(3), frac)
        high = float((el > 45.0).float().mean())
        assert abs(high - frac) < 0.03, (frac, high)
        assert float(el.min()) >= -10.0 and float(el.max()) <= 85.0


def test_training_phase_five_resumes_bit_identically_and_uses_its_own_views(tmp_path):
    """Phase 5 restarts from the end of phase 4 on its own camera mix; resumed from a phase-4 folder it
    gives the same weights as one uninterrupted run, and a different mix gives different weights."""
    from safetensors.torch import load_file

    from backend.priors.train import TrainConfig, train

    def run(out, phase5_steps, resume=None, high=0.12):
        cfg = TrainConfig(steps=2, phase2_steps=1, phase3_steps=1, phase4_steps=1, phase5_steps=phase5_steps,
                          batch=4, warmup=1, phase2_warmup=1, phase3_warmup=1, phase4_warmup=1, phase5_warmup=1,
                          phase5_high_elevation_fraction=high, views_per_shape=6, save_every=100, log_every=100)
        train(cfg, out, log=lambda *_: None, resume=resume, resume_phase=5)

    torch.set_num_threads(1)
    run(tmp_path / "four", 0)
    run(tmp_path / "whole", 2, high=0.9)
    run(tmp_path / "resumed", 2, resume=tmp_path / "four", high=0.9)
    run(tmp_path / "other_mix", 2, resume=tmp_path / "four")

    def weights(name):
        return load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")

    a, b, c, d = weights("whole"), weights("resumed"), weights("four"), weights("other_mix")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # phase 5 trained
    assert any(not torch.equal(a[k], d[k]) for k in a)  # on its own views
    state = json.loads((tmp_path / "resumed" / "train_state.json").read_text())
    assert (state["step"], state["phase"]) == (7, 5)


def test_a_resolution_fine_tune_declares_its_sides_and_the_guidance_uses_them(tmp_path):
    """``--init-from`` starts from trained weights; ``--train-resolutions`` trains several sides, which the
    saved folder declares and the guidance then scores renders at (the largest side not above theirs)."""
    from backend.guidance import load_guidance
    from backend.guidance.loss import sds_loss_fn
    from backend.guidance.sample_sides import SAMPLE_SIDES_FILE
    from backend.pipeline.presets import get_preset
    from backend.priors.model import load_model
    from backend.priors.train import TrainConfig, train

    torch.set_num_threads(1)
    start = tmp_path / "start"
    zero = dict(phase2_steps=0, phase3_steps=0, phase4_steps=0, batch=4, views_per_shape=4,
                save_every=100, log_every=100, phase5_warmup=1)
    train(TrainConfig(**zero, steps=1, warmup=1, phase5_steps=0), start, log=lambda *_: None)
    out = tmp_path / "sides"
    train(TrainConfig(**zero, steps=0, phase5_steps=3, init_from=str(start), train_resolutions="16,32"), out,
          log=lambda *_: None)
    assert json.loads((out / SAMPLE_SIDES_FILE).read_text()) == {"sides": [16, 32]}
    tuned, first = load_model(out), load_model(start)
    assert tuned.sides == (16, 32) and first.sides is None
    assert int(tuned.unet.config.sample_size) == 32
    start_w = dict(first.unet.named_parameters())
    # started from the trained weights (close), and trained (not equal)
    diffs = [float((p - start_w[k]).detach().abs().max()) for k, p in tuned.unet.named_parameters()]
    assert 0 < max(diffs) < 0.05

    g = load_guidance(get_preset("cpu", {"guidance.model": str(out)}).guidance, "cpu")
    assert g.sides == (16, 32) and g.resolution == 32
    seen: list[int] = []
    g.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int((args[0] if args else kwargs["sample"]).shape[-1])), with_kwargs=True)
    g.set_prompt("a red cube")
    loss_fn = sds_loss_fn(g)
    for side, scored_at in ((16, 16), (24, 16), (40, 32)):
        seen.clear()
        imgs = torch.rand(1, 3, side, side, requires_grad=True)
        cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([3.0]), torch.tensor([40.0]), side)
        loss_fn(imgs, cams, torch.ones(1, 3), 0.5).backward()
        assert imgs.grad is not None and torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0
        assert set(seen) == {scored_at}

    from backend.priors.sample import sample_images

    assert sample_images(out, ["a red cube"], steps=2, side=16).shape == (1, 3, 16, 16)
    assert sample_images(out, ["a red cube"], steps=2).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="side 24 is not one the model was trained at"):
        sample_images(out, ["a red cube"], steps=2, side=24)

    for bad in ("18,32", "16,24", "16,x"):
        with pytest.raises(ValueError, match="--train-resolutions"):
            train(TrainConfig(**zero, steps=0, phase5_steps=1, train_resolutions=bad), tmp_path / "bad",
                  log=lambda *_: None)
    with pytest.raises(ValueError, match="exclusive"):
        train(TrainConfig(**zero, steps=0, phase5_steps=1, init_from=str(start)), tmp_path / "bad", log=lambda *_: None,
              resume=start, resume_phase=5)



def test_growing_a_unet_keeps_its_levels_and_starts_the_new_one_as_pool_and_upsample():
    """``grow_unet`` (progressive growing): the old weights move one level in, the bottleneck of the grown
    model at twice the side is the old one's, and the new outer level starts as 2x2 pooling in and
    nearest upsampling out."""
    from backend.priors.model import add_camera_conditioning, grow_unet, make_unet

    torch.manual_seed(0)
    old = make_unet(32).eval()
    new = grow_unet(old, 64).eval()
    assert int(new.config.sample_size) == 64 and len(new.down_blocks) == len(old.down_blocks) + 1
    new_w = dict(new.state_dict())
    for key, value in old.state_dict().items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            parts[1] = str(int(parts[1]) + 1)
        assert torch.equal(new_w[".".join(parts)], value), key

    sizes: dict[str, int] = {}

    def record(name):
        return lambda mod, args, out: sizes.__setitem__(name, int((out[0] if isinstance(out, tuple) else out).shape[-1]))

    handles = [old.mid_block.register_forward_hook(record("old")), new.mid_block.register_forward_hook(record("new"))]
    pooled: list[torch.Tensor] = []
    handles.append(new.down_blocks[0].register_forward_hook(lambda mod, args, out: pooled.append(out[0])))
    feats: list[torch.Tensor] = []
    handles.append(new.conv_in.register_forward_hook(lambda mod, args, out: feats.append(out)))
    ups: list[torch.Tensor] = []
    handles.append(new.up_blocks[-2].register_forward_hook(lambda mod, args, out: ups.append(out)))
    outer: list[torch.Tensor] = []
    handles.append(new.up_blocks[-1].register_forward_hook(lambda mod, args, out: outer.append(out)))
    text = torch.randn(2, 16, 64)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        old(torch.randn(2, 3, 32, 32), t, text)
        new(torch.randn(2, 3, 64, 64), t, text)
    for h in handles:
        h.remove()
    assert sizes["old"] == sizes["new"] == 8
    # the outer down block's output is the 2x2 average of conv_in's features
    assert torch.allclose(pooled[0], torch.nn.functional.avg_pool2d(feats[0], 2), atol=1e-5)
    # and the outer up block passes the old last up block's (already upsampled) features through
    assert ups[0].shape[-1] == 64 and torch.allclose(outer[0], ups[0], atol=1e-5)
    with pytest.raises(ValueError, match="text-only"):
        grow_unet(add_camera_conditioning(old, "orbit-sincos"), 64)


def test_training_with_grow_from_saves_a_grown_model_the_guidance_loads(tmp_path):
    """``--grow-from`` trains the grown UNet at the new sides and saves a folder that declares them."""
    from backend.guidance.sample_sides import SAMPLE_SIDES_FILE
    from backend.priors.model import load_model
    from backend.priors.train import TrainConfig, train

    torch.set_num_threads(1)
    start = tmp_path / "start"
    zero = dict(phase2_steps=0, phase3_steps=0, phase4_steps=0, batch=2, views_per_shape=2,
                save_every=100, log_every=100, phase5_warmup=1)
    train(TrainConfig(**zero, steps=1, warmup=1, phase5_steps=0, resolution=16), start, log=lambda *_: None)
    out = tmp_path / "grown"
    train(TrainConfig(**zero, steps=0, phase5_steps=2, resolution=32, grow_from=str(start),
                      train_resolutions="24,32"), out, log=lambda *_: None)
    grown = load_model(out)
    assert grown.sides == (24, 32) and json.loads((out / SAMPLE_SIDES_FILE).read_text()) == {"sides": [24, 32]}
    assert int(grown.unet.config.sample_size) == 32 and len(grown.unet.down_blocks) == 4
    with pytest.raises(ValueError, match="exclusive"):
        train(TrainConfig(**zero, steps=0, phase5_steps=1, init_from=str(start), grow_from=str(start)),
              tmp_path / "bad", log=lambda *_: None)

# ----------------------------------------------------------------------------- judges

def test_colour_judge_on_renders():
    from backend.priors.data import COLOUR_NAMES, build_geometry_bank, sample_batch
    from backend.priors.evaluate import judge_colour

    bank = build_geometry_bank(8, 32, seed=4321, supersample=2)
    b = sample_batch(bank, 160, torch.Generator().manual_seed(0))
    right = sum(judge_colour(img) == COLOUR_NAMES[int(c)] for img, c in zip(b.images, b.colour_idx))
    assert right / 160 >= 0.95


def test_shape_classifier_on_fresh_renders():
    from backend.priors.data import build_geometry_bank, sample_batch
    from backend.priors.evaluate import CLASSIFIER_PATH, judge_shapes

    if not CLASSIFIER_PATH.is_file():
        pytest.skip("shape classifier not trained yet")
    bank = build_geometry_bank(8, 32, seed=98765, supersample=2)
    b = sample_batch(bank, 96, torch.Generator().manual_seed(1))
    judged = judge_shapes(b.images)
    acc = np.mean([j == SHAPES[int(s)] for j, s in zip(judged, b.shape_idx)])
    assert acc >= 0.9


# ----------------------------------------------------------------------------- the bundled model

@needs_weights
def test_bundled_prior_loads_through_the_guidance():
    from backend.guidance import load_guidance
    from backend.pipeline.presets import get_preset

    cfg = get_preset("cpu").guidance
    g = load_guidance(cfg, "cpu")
    assert not g.is_latent and g.resolution == 32
    assert "conjure-solids" in g.description
    assert {"cube", "red", "side"} <= set(g.vocabulary)
    g.set_prompt("a red cube")
    imgs = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss = g.sds_loss(imgs, torch.tensor([0.0, 90.0]), torch.tensor([10.0, 20.0]), 0.3)
    loss.backward()
    assert torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0


@pytest.mark.slow  # 180 s on the loaded 2-core machine (2026-11-30)
@needs_weights
def test_prior_samples_pass_the_independent_judges():
    """One sample for six (shape, colour) pairs, each shape once, judged by colour hue and classifier."""
    from backend.priors.evaluate import CLASSIFIER_PATH, evaluate_prior

    if not CLASSIFIER_PATH.is_file():
        pytest.skip("shape classifier not trained yet")
    colours = list(COLOURS)
    pairs = [(s, colours[(3 * i + 1) % len(colours)]) for i, s in enumerate(SHAPES)]
    res = evaluate_prior(BUNDLED_PRIOR_DIR, pairs=pairs, samples_per_pair=2, steps=20, cfg=3.0, eta=1.0, seed=0)
    assert res["images"].shape == (12, 3, 32, 32)
    assert res["colour_acc"] >= 10 / 12, res["rows"]
    assert res["shape_acc"] >= 9 / 12, res["rows"]


def test_sample_images_rejects_bad_arguments():
    from backend.priors.sample import sample_images

    with pytest.raises(ValueError):
        sample_images(BUNDLED_PRIOR_DIR, [], steps=5)
    with pytest.raises(ValueError):
        sample_images(BUNDLED_PRIOR_DIR, ["a red cube"], steps=0)


@pytest.mark.slow  # 39 s on the loaded 2-core machine (2026-11-30)
def test_mesh_scoring_recognises_canonical_meshes():
    """score3d on marching-cubes meshes of the solids: the right shape wins, IoU high; colour named."""
    from skimage.measure import marching_cubes

    from backend.priors.score3d import judge_mesh
    from protocol.mesh import MeshPayload

    n = 40
    ax = np.linspace(-1.1, 1.1, n)
    P = torch.as_tensor(np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3), dtype=torch.float32)
    for shape, scale, colour in (("cone", 0.8, "red"), ("cube", 0.6, "blue")):
        from backend.priors.solids import solid_sdf

        # a rotated, rescaled, shifted copy must still be recognised
        t = math.radians(20)
        R = torch.tensor([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])
        q = ((P - torch.tensor([0.1, 0.0, 0.05])) / scale) @ R
        sdf = solid_sdf(shape, q).numpy().reshape(n, n, n)
        verts, faces, _, _ = marching_cubes(sdf, 0.0, spacing=(ax[1] - ax[0],) * 3)
        verts = verts - 1.1
        rgb = (np.array(COLOURS[colour]) * 200).astype(np.uint8)
        mesh = MeshPayload(positions=verts.astype(np.float32), faces=faces[:, ::-1].astype(np.uint32),
                           colors=np.tile(np.r_[rgb, 255], (len(verts), 1)).astype(np.uint8))
        j = judge_mesh(mesh)
        assert j["shape"] == shape, j["ious"]
        assert j["ious"][shape] > 0.8
        assert j["colour"] == colour
