"""Camera conditioning of the prior (MVDream-style; ``backend.camera_conditioning``): the encoding, the
zero-initialised embedding, the model folder's declaration, SDS passing each view's camera, and the
training phase that teaches it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backend import camera_conditioning as cc
from backend.guidance import GuidanceError, load_guidance
from backend.pipeline.presets import GuidanceConfig
from backend.priors.model import add_camera_conditioning, load_model


def test_orbit_sincos_encodes_azimuth_and_elevation():
    v = cc.encode_cameras("orbit-sincos", torch.tensor([0.0, 90.0, 180.0]), torch.tensor([0.0, 30.0, 90.0]))
    assert v.shape == (3, 4)
    expect = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.5, 3 ** 0.5 / 2], [0.0, -1.0, 1.0, 0.0]])
    assert torch.allclose(v, expect, atol=1e-6)
    with pytest.raises(ValueError, match="unknown camera encoding"):
        cc.encode_cameras("c2w-16", torch.zeros(1), torch.zeros(1))


def _camera_model(tiny_models, tmp_path, train_embedding: bool):
    """The tiny pixel-space model with a camera embedding (random output layer when ``train_embedding``)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "camera-model"
    shutil.copytree(tiny_models["pixel"], folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    new = add_camera_conditioning(unet, "orbit-sincos")
    if train_embedding:
        torch.manual_seed(3)
        with torch.no_grad():
            new.class_embedding.linear_2.weight.normal_(std=0.5)
    new.save_pretrained(folder / "unet")
    return folder, unet


def test_added_embedding_starts_at_zero_so_predictions_are_unchanged(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    folder, old = _camera_model(tiny_models, tmp_path, train_embedding=False)
    new = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert new.config.class_embed_type == "projection" and new.config.projection_class_embeddings_input_dim == 4
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    emb = torch.randn(2, 8, old.config.cross_attention_dim)
    cams = cc.encode_cameras("orbit-sincos", torch.tensor([0.0, 120.0]), torch.tensor([10.0, 60.0]))
    with torch.no_grad():
        assert torch.allclose(new(x, t, emb, class_labels=cams).sample, old(x, t, emb).sample, atol=1e-5)
    with pytest.raises(ValueError, match="already has a class embedding"):
        add_camera_conditioning(new, "orbit-sincos")


def test_guidance_refuses_a_class_conditioned_unet_without_a_declaration(tiny_models, tmp_path):
    folder, _ = _camera_model(tiny_models, tmp_path, train_embedding=True)
    with pytest.raises(GuidanceError, match="camera_conditioning.json"):
        load_guidance(GuidanceConfig(model=str(folder)), "cpu")
    (folder / cc.CAMERA_CONDITIONING_FILE).write_text(json.dumps({"encoding": "orbit-sincos", "dim": 16}))
    with pytest.raises(GuidanceError, match="dim 4"):
        load_guidance(GuidanceConfig(model=str(folder), cfg_scale=7.5), "cpu")


def test_sds_passes_each_views_camera_to_a_camera_conditioned_model(tiny_models, tmp_path):
    """The SDS gradient equals an independent UNet call given the views' cameras, and changes with the
    azimuth for a camera-conditioned model (the text-only model gets no camera)."""
    folder, _ = _camera_model(tiny_models, tmp_path, train_embedding=True)
    cc.write_declaration(folder, "orbit-sincos")
    g = load_guidance(GuidanceConfig(model=str(folder), cfg_scale=5.0), "cpu")
    assert g.bundle.camera_encoding == "orbit-sincos"
    g.set_prompt("a red cube")
    images = torch.rand(2, 3, 32, 32)
    el = torch.tensor([10.0, 10.0])

    def grad(az):
        x = images.clone().requires_grad_(True)
        torch.manual_seed(7)
        g.sds_loss(x, az, el, 0.3).backward()
        return x.grad, g.last["t"]

    g_front, t = grad(torch.tensor([0.0, 0.0]))
    g_front2, _ = grad(torch.tensor([0.0, 0.0]))
    assert torch.equal(g_front, g_front2)
    # an independent call: cond and uncond both see the camera
    torch.manual_seed(7)
    lo, hi = g.timestep_range(0.3)
    assert torch.equal(torch.randint(lo, hi + 1, (2,)), t)
    z = images * 2 - 1
    noise = torch.randn_like(z)
    a = g.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    az = torch.tensor([0.0, 0.0])
    cams = cc.encode_cameras("orbit-sincos", az, el)
    with torch.no_grad():
        unet = g.bundle.unet
        e_c = unet(z_t, t, encoder_hidden_states=g.view_embeddings(az, el), class_labels=cams).sample
        e_u = unet(z_t, t, encoder_hidden_states=g._uncond.expand(2, -1, -1), class_labels=cams).sample
    expected = (1 - a) * (e_u + 5.0 * (e_c - e_u) - noise) / 2 * 2
    assert torch.allclose(g_front, expected, atol=1e-4, rtol=1e-3)
    # two front views 10° apart: the same view word, so only the camera can change the gradient
    g_a, _ = grad(torch.tensor([0.0, 0.0]))
    g_b, _ = grad(torch.tensor([30.0, 30.0]))
    assert g.view_embeddings(torch.tensor([0.0]), el[:1]).equal(g.view_embeddings(torch.tensor([30.0]), el[:1]))
    assert (g_a - g_b).abs().max() > 1e-4
    # the text-only model: no camera, the azimuth within a view word changes nothing
    plain = load_guidance(GuidanceConfig(model=str(tiny_models["pixel"]), cfg_scale=5.0), "cpu")
    assert plain.bundle.camera_encoding is None
    plain.set_prompt("a red cube")
    grads = []
    for az in (torch.tensor([0.0, 0.0]), torch.tensor([30.0, 30.0])):
        x = images.clone().requires_grad_(True)
        torch.manual_seed(7)
        plain.sds_loss(x, az, el, 0.3).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def _train(out, resume=None, camera_steps=3, views=6):
    from backend.priors.train import TrainConfig, train

    cfg = TrainConfig(steps=2, phase2_steps=1, phase3_steps=1, phase4_steps=camera_steps, phase5_steps=0, batch=4, warmup=1,
                      phase2_warmup=1, phase3_warmup=1, phase4_warmup=1, camera_encoding="orbit-sincos",
                      views_per_shape=views, save_every=100, log_every=100)
    train(cfg, out, log=lambda *_: None, resume=resume, resume_phase=4)
    return cfg


def test_training_phase_four_adds_the_camera_and_resumes_bit_identically(tmp_path):
    """Phase 4 turns the text-only model camera-conditioned (declaration written, embedding trained
    away from zero); resuming at phase 4 from the end of phase 3 gives the same weights as one run."""
    _camera_phase_resumes_bit_identically(_train, tmp_path, "orbit-sincos")


def _camera_phase_resumes_bit_identically(train_fn, tmp_path, encoding: str) -> None:
    """``train_fn(out, resume=None, camera_steps=…)`` run whole, text-only (no camera steps) and resumed
    from the text-only folder: the camera phase is declared and trained, and resuming is bit-identical."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    train_fn(tmp_path / "whole")
    train_fn(tmp_path / "text", camera_steps=0)
    assert not (tmp_path / "text" / cc.CAMERA_CONDITIONING_FILE).exists()
    assert load_model(tmp_path / "text").camera_encoding is None
    train_fn(tmp_path / "resumed", resume=tmp_path / "text")
    whole = load_model(tmp_path / "whole")
    assert whole.camera_encoding == encoding
    assert whole.unet.class_embedding.linear_2.weight.abs().max() > 0
    a = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_refuses_an_unknown_camera_encoding_before_it_starts(tmp_path):
    from backend.priors.train import TrainConfig, train

    with pytest.raises(ValueError, match="unknown camera encoding 'sincos'"):
        train(TrainConfig(camera_encoding="sincos"), tmp_path / "never", log=lambda *_: None)
    assert not (tmp_path / "never").exists()  # refused before the geometry bank or any checkpoint


def test_training_refuses_to_resume_after_the_camera_phase_with_a_camera(tmp_path):
    from backend.priors.train import TrainConfig, train

    with pytest.raises(ValueError, match="resume at phase 4"):
        train(TrainConfig(camera_encoding="orbit-sincos"), tmp_path / "never", log=lambda *_: None,
              resume=tmp_path / "phase4", resume_phase=5)
    assert not (tmp_path / "never").exists()


def test_orbit_fourier4_gives_the_azimuths_harmonics():
    """sin/cos of k·azimuth for k = 1..4, then the elevation's: a quarter turn changes the first
    harmonic and leaves the fourth alone (what a four-fold symmetric object looks like)."""
    v = cc.encode_cameras("orbit-fourier4", torch.tensor([0.0, 90.0, 30.0]), torch.tensor([0.0, 30.0, 90.0]))
    assert v.shape == (3, cc.ENCODINGS["orbit-fourier4"]) == (3, 10)
    assert torch.allclose(v[:, 8:], cc.encode_cameras("orbit-sincos", torch.zeros(3),
                                                      torch.tensor([0.0, 30.0, 90.0]))[:, 2:], atol=1e-6)
    assert torch.allclose(v[0, 6:8], v[1, 6:8], atol=1e-6)  # k = 4: (sin 0, cos 0) == (sin 360°, cos 360°)
    assert not torch.allclose(v[0, 0:2], v[1, 0:2], atol=0.5)  # k = 1: a quarter turn apart
    k = torch.arange(1, 5, dtype=torch.float32) * torch.deg2rad(torch.tensor(30.0))
    assert torch.allclose(v[2, :8], torch.stack([k.sin(), k.cos()], dim=-1).reshape(-1), atol=1e-6)
    assert cc.declaration("orbit-fourier4")["dim"] == 10


def _train_late(out, resume=None, camera_steps=2):
    """A tiny run whose camera embedding arrives in phase 6, after a finished text-only phase 5."""
    from backend.priors.train import TrainConfig, train

    cfg = TrainConfig(steps=1, phase2_steps=1, phase3_steps=1, phase4_steps=1, phase5_steps=1, phase6_steps=camera_steps,
                      batch=4, warmup=1, phase2_warmup=1, phase3_warmup=1, phase4_warmup=1, phase5_warmup=1,
                      phase6_warmup=1, camera_encoding="orbit-fourier4", camera_phase=6, views_per_shape=6,
                      save_every=100, log_every=100)
    train(cfg, out, log=lambda *_: None, resume=resume, resume_phase=6)


def test_a_sixth_phase_adds_the_camera_to_a_finished_model_and_resumes_bit_identically(tmp_path):
    """``camera_phase`` 6 fine-tunes the finished text-only model (the end of phase 5) with the camera,
    on phase 5's camera mix; resumed from that model it equals one uninterrupted run. Its
    ``camera_gap`` is then measurable, while a text-only model's is exactly 0."""
    from backend.priors.evaluate import camera_gap

    _camera_phase_resumes_bit_identically(_train_late, tmp_path, "orbit-fourier4")
    text = camera_gap(tmp_path / "text", shapes=("cube",), images_per_shape=4, bands=((500, 1000),))
    assert text["encoding"] is None and all(v == r["mse"] for r in text["rows"] for v in r["turned"].values())
    cam = camera_gap(tmp_path / "whole", shapes=("cube",), images_per_shape=4, bands=((500, 1000),))
    assert cam["encoding"] == "orbit-fourier4" and len(cam["rows"]) == 1
    assert any(v != cam["rows"][0]["mse"] for v in cam["rows"][0]["turned"].values())


def test_training_refuses_a_camera_phase_that_is_not_a_restart_and_timesteps_out_of_range(tmp_path):
    from backend.priors.train import TrainConfig, train

    for phase in (1, 7):
        with pytest.raises(ValueError, match="--camera-phase must be 2 to 6"):
            train(TrainConfig(camera_encoding="orbit-sincos", camera_phase=phase), tmp_path / "never",
                  log=lambda *_: None)
    with pytest.raises(ValueError, match="--phase6-t-min must be 0 to 999"):
        train(TrainConfig(phase6_steps=10, phase6_t_min=1000), tmp_path / "never", log=lambda *_: None)
    assert not (tmp_path / "never").exists()
