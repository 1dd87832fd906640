"""Train the bundled conjure-solids prior (one reproducible command, fixed seeds).

    python -m backend.priors.train --out backend/priors/weights/conjure-solids

A resolution fine-tune of a trained model (``init_from``, ``train_resolutions``; session 15's 64 px
experiment, not the bundled model)::

    python -m backend.priors.train --out DIR --init-from backend/priors/weights/conjure-solids \
        --resolution 64 --train-resolutions 32,48,64 --steps 0 --phase2-steps 0 --phase3-steps 0 \
        --phase4-steps 0 --phase5-steps 1500 --phase5-lr 2e-4

starts from the 32 px weights and trains phase 5 again on images of 32, 48 and 64 px (each step draws
one side and area-downsamples the 64 px renders to it; 1.8 s/step on one thread, 45 min), so one fully
convolutional UNet serves all three. The folder declares them in ``sample_sides.json`` and SDS then
scores each render at the largest side that fits it (``backend.guidance.sample_sides``; coarse-to-fine
guidance resolution as in Magic3D). Measured in docs/benchmarks.md "A 64 px prior (session 15)": cubes
and some cones and pyramids come out sharper, but cylinders come out waisted and tori's holes fill (6 of
12 prompts pass at seed 0 against 9), and a job takes 1.4x as long (1.8x with the coarse stage's renders
ending at 64 px); the fine-tuned model draws poor shapes at 48 and 64 px.

Progressive growing (``grow_from``; session 16, not the bundled model either)::

    python -m backend.priors.train --out DIR --grow-from backend/priors/weights/conjure-solids \
        --resolution 64 --train-resolutions 48,64 --steps 0 --phase2-steps 0 --phase3-steps 0 \
        --phase4-steps 0 --phase5-steps 1500 --phase5-lr 3e-4 --threads 2

adds one outer level to the trained 32 px UNet (``model.grow_unet``), so at 64 px its bottleneck is
the 8x8 the 32 px model learnt at, and fine-tunes the whole at 48 and 64 px (0.46 s/step on two threads,
12 min). Measured in docs/benchmarks.md "A grown 64 px prior (session 16)": 5 of 12 prompts pass at
seed 0 against 9 for the bundled model; cubes come out with concave faces and pyramids with flared feet.

Defaults (documented in ``TrainConfig``) are sized for 2 CPU cores: 11500 steps of batch 16, about
two hours of wall time with ``torch.set_num_threads(1)`` while another job used the second core (65 min
for the first 6000 steps, 24 for phase 4, 26 for phase 5). The
UNet and the text encoder train jointly on epsilon-MSE with Min-SNR weighting (gamma 5: a step at
timestep t counts min(SNR_t, 5) / SNR_t, so the noisy steps that decide colour and shape are not
drowned by the nearly clean ones) and 10 % empty captions (classifier-free guidance dropout); an
exponential moving average (EMA) of the weights is what gets saved. Five phases: ``steps`` at a
constant ``lr`` (after warm-up), then ``phase2_steps`` restarted from the EMA weights with a fresh
AdamW at ``phase2_lr`` and a new data seed, then ``phase3_steps`` the same way at ``phase3_lr``, then
``phase4_steps`` the same way at ``phase4_lr``, then ``phase5_steps`` at ``phase5_lr`` on views of which
``phase5_high_elevation_fraction`` (40 %, phases 1-4: 12 %) look from 45-85 deg above the horizon: the
SDS cameras of every preset reach 80 deg (uniform over -10..80 deg, 39 % above 45 deg), so phase 5 teaches
the prior the views SDS asks it about most often and it knew least (tori keep open holes, cones and
cubes come out truer; docs/benchmarks.md "The prior's camera mix, a fifth training phase, and
densification (session 5)"). With ``camera_encoding`` set (e.g. "orbit-sincos"),
phase 4 is camera conditioning instead (MVDream, Shi et al. 2023; ``backend.camera_conditioning``):
the UNet gains a camera embedding whose output starts at zero and every image is shown with its
view's camera. The bundled model is text-only ("none"): its phase 4 is one more text-only phase
(2500 steps: cubes and pyramids come out boxier in 3D; 2500 steps of camera conditioning did not
teach the model the camera; docs/benchmarks.md "Camera conditioning and a longer prior run (session 3)"
and "Issue 12 — after (session 4)"). An optional sixth phase (``phase6_steps``, default 0) restarts once more
on phase 5's camera mix; with ``--camera-phase 6`` it adds the camera to a finished text-only model
(session 10: with ``orbit-fourier4`` the model still learnt no yaw, ``evaluate --camera-gap``; docs/benchmarks.md
"Camera conditioning, again"). No
phase depends on its own length, so the checkpoint at step k of a phase equals the end of a run whose
phase has k steps, and ``--resume DIR --resume-phase K`` continues bit-identically from a folder
saved at the end of phase K-1 (the bundled weights are phase 5 resumed from session 4's 8500-step bundled
model, the end of phase 4: ``--resume DIR --resume-phase 5``, 26 min). A checkpoint of the EMA weights is written into ``--out`` every
``--save-every`` steps (with ``train_state.json``), so a run stopped early still leaves a complete,
loadable model folder. Uses CUDA when available (same seeds; results differ only numerically).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from backend import camera_conditioning
from backend.camera_conditioning import ENCODINGS, encode_cameras
from backend.priors import BUNDLED_PRIOR_DIR
from backend.priors.data import HIGH_ELEVATION_FRACTION, build_geometry_bank, sample_batch
from backend.priors.model import (
    RESOLUTION,
    SolidsModel,
    add_camera_conditioning,
    grow_unet,
    make_scheduler,
    new_model,
    save_model,
)


@dataclass
class TrainConfig:
    steps: int = 3000  # phase-1 optimiser steps
    batch: int = 16  # images per step
    lr: float = 1e-3  # AdamW peak learning rate (constant after warm-up)
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0
    ema_decay: float = 0.995  # EMA of weights (with 1+n / 10+n warm-up)
    p_empty: float = 0.1  # classifier-free guidance caption dropout
    min_snr_gamma: float = 5.0  # > 0: Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023); 0 = plain MSE
    views_per_shape: int = 600  # cached geometry renders per shape
    resolution: int = RESOLUTION
    seed: int = 1234
    threads: int = 1
    save_every: int = 100
    log_every: int = 20
    # phase 2: restart the raw weights from the EMA, fresh AdamW at a lower learning rate, new data seed
    phase2_steps: int = 1500
    phase2_lr: float = 4e-4
    phase2_warmup: int = 20
    # phase 3: the same restart again at a still lower learning rate
    phase3_steps: int = 1500
    phase3_lr: float = 2.5e-4
    phase3_warmup: int = 20
    # phase 4: the same restart again; text-only, or camera conditioning (MVDream) with a camera_encoding
    phase4_steps: int = 2500
    phase4_lr: float = 4e-4
    phase4_warmup: int = 50
    # phase 5: one more restart from the EMA at a lower learning rate, on its own camera mix
    phase5_steps: int = 3000
    phase5_lr: float = 1.5e-4
    phase5_warmup: int = 50
    # phase 5's data: this fraction of the views from 45-85 deg elevation (phases 1-4: HIGH_ELEVATION_FRACTION)
    phase5_high_elevation_fraction: float = 0.4
    # phase 6 (off by default): one more restart from the EMA on phase 5's camera mix; with a
    # camera_encoding and camera_phase 6 it fine-tunes a finished text-only model with the camera (MVDream)
    phase6_steps: int = 0
    phase6_lr: float = 1.5e-4
    phase6_warmup: int = 50
    phase6_t_min: int = 0  # phase 6 draws its timesteps from [phase6_t_min, num_train_timesteps)
    camera_encoding: str = "none"  # e.g. "orbit-sincos": phase camera_phase adds a zero-initialised camera embedding
    camera_phase: int = 4  # the phase that adds the camera embedding (MVDream) when camera_encoding is set
    # a resolution fine-tune: start from this trained text-only model folder's weights instead of fresh ones
    init_from: str = ""
    # comma-separated image sides, e.g. "32,48,64": each step draws one and area-downsamples the batch from
    # ``resolution`` (the bank's side) to it, so one model serves every side; "" = ``resolution`` only
    train_resolutions: str = ""
    # progressive growing: start from this trained text-only model folder with one more outer UNet level
    # (``model.grow_unet``) for ``resolution`` px images; exclusive with init_from
    grow_from: str = ""


#: The number of phases (``phase_schedule``); a phase of 0 steps is skipped.
PHASES = 6


def phase_schedule(cfg: TrainConfig) -> list[tuple[int, int, float, int, int]]:
    """(first step, last step, peak lr, warm-up steps, data seed) of phases 1-6; steps count from 1
    across phases, so a phase's last step is the sum of its and the earlier phases' lengths."""
    specs = [(cfg.steps, cfg.lr, cfg.warmup), (cfg.phase2_steps, cfg.phase2_lr, cfg.phase2_warmup),
             (cfg.phase3_steps, cfg.phase3_lr, cfg.phase3_warmup), (cfg.phase4_steps, cfg.phase4_lr, cfg.phase4_warmup),
             (cfg.phase5_steps, cfg.phase5_lr, cfg.phase5_warmup), (cfg.phase6_steps, cfg.phase6_lr, cfg.phase6_warmup)]
    schedule, end = [], 0
    for k, (steps, lr, warmup) in enumerate(specs, start=1):
        schedule.append((end + 1, end + steps, lr, warmup, cfg.seed + k))
        end += steps
    return schedule


def training_sides(cfg: TrainConfig) -> list[int]:
    """The image sides a step may train at (``train_resolutions``), each a multiple of 4 (two
    down-samplings in the UNet); the largest is ``resolution``, the side the geometry bank is rendered at
    and the UNet's ``sample_size``."""
    if not cfg.train_resolutions.strip():
        return [cfg.resolution]
    try:
        sides = sorted({int(v) for v in cfg.train_resolutions.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--train-resolutions must be comma-separated integers, got {cfg.train_resolutions!r}") from None
    bad = [v for v in sides if v < 8 or v % 4 or v > cfg.resolution]
    if not sides or bad or sides[-1] != cfg.resolution:
        raise ValueError(f"--train-resolutions: every side must be a multiple of 4 from 8 to --resolution "
                         f"({cfg.resolution}), the largest --resolution itself, got {cfg.train_resolutions!r}")
    return sides


def load_trained_weights(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                         option: str = "--init-from") -> None:
    """Copy a trained text-only model's UNet and text-encoder weights into freshly built ones (``--resume``
    keeps the layout; a resolution fine-tune, ``--init-from``, changes only the declared ``sample_size``).
    ``option`` names the command-line flag in the error."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    if camera_conditioning.read_declaration(folder) is not None:
        raise ValueError(f"{option} {folder}: a camera-conditioned model; start from a text-only one")
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict())
    text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").state_dict())


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def train(cfg: TrainConfig, out: Path, log=print, resume: Path | None = None, resume_phase: int = 2) -> dict:
    if cfg.camera_encoding != "none" and cfg.camera_encoding not in ENCODINGS:  # before hours of phases 1-3
        raise ValueError(f"unknown camera encoding {cfg.camera_encoding!r}; known: none, {', '.join(ENCODINGS)}")
    if cfg.camera_encoding != "none" and not 2 <= cfg.camera_phase <= PHASES:
        raise ValueError(f"--camera-phase must be 2 to {PHASES} (a restart from a trained model), got {cfg.camera_phase}")
    if resume is not None and resume_phase > cfg.camera_phase and cfg.camera_encoding != "none":
        raise ValueError(f"--resume-phase {resume_phase} with a camera encoding: resume at phase {cfg.camera_phase} "
                         "(the phase that adds the camera embedding) or earlier")
    timesteps = make_scheduler().config.num_train_timesteps
    if not 0 <= cfg.phase6_t_min < timesteps:
        raise ValueError(f"--phase6-t-min must be 0 to {timesteps - 1}, got {cfg.phase6_t_min}")
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sides = training_sides(cfg)
    if cfg.init_from and resume is not None:
        raise ValueError("--init-from and --resume are exclusive: --resume already holds weights")
    if cfg.init_from and cfg.grow_from:
        raise ValueError("--init-from and --grow-from are exclusive: give the trained model to one of them")
    t0 = time.time()
    bank, bank_fraction = None, None  # rendered by the first phase that runs, with that phase's camera mix
    with tempfile.TemporaryDirectory() as tmp:
        model = new_model(Path(tmp) / "tokenizer", cfg.resolution)
    if cfg.init_from:
        load_trained_weights(cfg.init_from, model.unet, model.text_encoder)
        log(f"starting from the weights of {cfg.init_from} at {', '.join(map(str, sides))} px")
    if cfg.grow_from:  # with --resume too: the grown layout first, then the resumed weights over it
        load_trained_weights(cfg.grow_from, model.unet, model.text_encoder, option="--grow-from")
        model.unet = grow_unet(model.unet, cfg.resolution, seed=cfg.seed + 7)
        log(f"grew {cfg.grow_from} by one outer level for {', '.join(map(str, sides))} px")
    unet, te = model.unet.to(device).train(), model.text_encoder.to(device).train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
        f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.3f} M")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = model.scheduler
    alphas = sched.alphas_cumprod.to(device)
    tok = model.tokenizer
    id_cache: dict[str, torch.Tensor] = {}

    def ids_for(captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in id_cache:
                id_cache[c] = tok(c, padding="max_length", max_length=tok.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([id_cache[c] for c in captions]).to(device)

    ema_loss, history = None, []
    out.mkdir(parents=True, exist_ok=True)
    t_train = time.time()
    phases = phase_schedule(cfg)
    total = phases[-1][1]
    phase = 1

    def camera_encoding() -> str | None:
        return cfg.camera_encoding if phase >= cfg.camera_phase and cfg.camera_encoding != "none" else None

    def checkpoint(step: int) -> None:
        save_model(out, SolidsModel(ema_unet, ema_te, tok, sched, camera_encoding(),
                                    tuple(sides) if len(sides) > 1 else None))
        state = {"step": step, "phase": phase, "config": asdict(cfg), "ema_loss": ema_loss,
                 "train_seconds": round(seconds_before + time.time() - t_train, 1),
                 "total_seconds": round(time.time() - t0 + resumed_seconds, 1), "loss_history": history,
                 "resumed_from": str(resume) if resume else None, "resumed_at_phase": resume_phase,
                 "torch": torch.__version__, "device": str(device)}
        (out / "train_state.json").write_text(json.dumps(state, indent=1) + "\n")

    def run(first: int, last: int, peak_lr: float, warmup: int, g: torch.Generator, t_min: int = 0) -> None:
        nonlocal ema_loss
        for step in range(first, last + 1):
            lr = peak_lr * min(1.0, (step - first + 1) / warmup)
            for pg in opt.param_groups:
                pg["lr"] = lr
            assert bank is not None
            b = sample_batch(bank, cfg.batch, g, p_empty=cfg.p_empty)
            x0 = (b.images * 2 - 1).to(device)
            if len(sides) > 1:
                side = sides[int(torch.randint(len(sides), (1,), generator=g))]
                if side != x0.shape[-1]:
                    x0 = torch.nn.functional.interpolate(x0, size=(side, side), mode="area")
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(t_min, sched.config.num_train_timesteps, (cfg.batch,), generator=g).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            emb = te(ids_for(b.captions))[0]
            encoding = camera_encoding()
            cams = None if encoding is None else encode_cameras(encoding, b.azimuth, b.elevation).to(device)
            pred = unet(xt, t, emb, class_labels=cams).sample
            if cfg.min_snr_gamma > 0:
                snr = (a / (1 - a)).view(-1)
                weight = snr.clamp(max=cfg.min_snr_gamma) / snr
                loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            else:
                loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_te, te, decay)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise RuntimeError(f"loss became {lv} at step {step}")
            ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
            if step % cfg.log_every == 0 or step == first:
                el = time.time() - t_train
                history.append([step, round(ema_loss, 5)])
                log(f"phase {phase} step {step}/{total} loss {lv:.4f} ema_loss {ema_loss:.4f} lr {lr:.2e} "
                    f"{el / (step - start_step + 1):.2f}s/step elapsed {el / 60:.1f} min")
            if step % cfg.save_every == 0 or step == last:
                checkpoint(step)

    resumed_seconds = seconds_before = 0.0
    first_phase = 1
    if resume is not None:
        # the folder holds the EMA weights written at the end of phase resume_phase - 1
        if not 2 <= resume_phase <= len(phases):
            raise ValueError(f"--resume-phase must be 2 to {len(phases)}, got {resume_phase}")
        state = json.loads((Path(resume) / "train_state.json").read_text())
        want = phases[resume_phase - 2][1]  # the last step of the phase before
        if state.get("step") != want or state.get("config", {}).get("seed") != cfg.seed:
            raise ValueError(f"{resume} is not the end of phase {resume_phase - 1} of this configuration "
                             f"(step {state.get('step')} != {want} or another seed)")
        load_trained_weights(resume, ema_unet, ema_te, option="--resume")
        ema_loss, history = state.get("ema_loss"), list(state.get("loss_history", []))
        resumed_seconds = float(state.get("train_seconds", 0.0))
        first_phase = resume_phase
        log(f"resuming at the start of phase {resume_phase} from {resume} "
            f"(earlier phases took {resumed_seconds / 60:.1f} min)")
    seconds_before = resumed_seconds
    for phase, (first, last, peak, warm, data_seed) in enumerate(phases, start=1):
        if phase < first_phase or last < first:
            continue
        start_step = first
        if phase == cfg.camera_phase and camera_encoding() is not None:  # MVDream: a zero-initialised camera embedding on the trained UNet
            ema_unet = add_camera_conditioning(ema_unet, cfg.camera_encoding, seed=cfg.seed + 4).eval()
            for p in ema_unet.parameters():
                p.requires_grad_(False)
            unet = copy.deepcopy(ema_unet).train()
            for p in unet.parameters():
                p.requires_grad_(True)
            params = list(unet.parameters()) + list(te.parameters())
        if phase > 1:  # restart the raw weights from the EMA, fresh optimiser
            unet.load_state_dict(ema_unet.state_dict())
            te.load_state_dict(ema_te.state_dict())
            opt = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay)
        fraction = cfg.phase5_high_elevation_fraction if phase >= 5 else HIGH_ELEVATION_FRACTION
        if fraction != bank_fraction:  # phases 5 and 6 see their own camera mix
            t_bank = time.time()
            bank = build_geometry_bank(cfg.views_per_shape, cfg.resolution, seed=cfg.seed,
                                       high_elevation_fraction=fraction)
            bank_fraction = fraction
            log(f"phase {phase} data: geometry bank {tuple(bank.coverage.shape)}, {fraction:.0%} of the views "
                f"from 45-85 deg elevation, ready in {time.time() - t_bank:.1f}s")
        t_train = time.time()
        run(first, last, peak, warm, torch.Generator().manual_seed(data_seed), cfg.phase6_t_min if phase == 6 else 0)
        seconds_before += time.time() - t_train
        t_train = time.time()
    log(f"done: {total} steps, final ema_loss {ema_loss:.4f}")
    return {"ema_loss": ema_loss, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=BUNDLED_PRIOR_DIR)
    d = TrainConfig()
    for name, val in asdict(d).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(val), default=val)
    ap.add_argument("--resume", type=Path, default=None,
                    help="a model folder saved at the end of phase (--resume-phase - 1): skip the earlier "
                         "phases and continue from it (bit-identical to the uninterrupted run)")
    ap.add_argument("--resume-phase", type=int, default=2, help=f"the phase that --resume starts (2 to {PHASES})")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(d)})

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log(f"config {asdict(cfg)} -> {args.out}")
    train(cfg, args.out, log, resume=args.resume, resume_phase=args.resume_phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())
