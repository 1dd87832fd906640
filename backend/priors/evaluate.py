"""Independent judges of images of solids, and the evaluation of the prior's samples.

* Colour: ``judge_colour(image)`` — the background is the median of the border pixels, the
  foreground the pixels that differ from it; the foreground's mean RGB → HSV; low saturation means
  white/black (by value), otherwise the nearest named hue.
* Shape: ``ShapeClassifier`` — a small CNN trained on renders of the solids (a geometry bank with a
  seed the prior never trained on, random colours/backgrounds, noise/blur/shift augmentation).
  ``python -m backend.priors.evaluate --train-classifier`` writes
  ``backend/priors/weights/shape_classifier.safetensors``.
* ``python -m backend.priors.evaluate`` samples every (shape, colour) pair from the prior and prints
  the per-pair judgements and the accuracies.

Images are (3, H, W) or (B, 3, H, W) float32 RGB in [0, 1].
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.priors import BUNDLED_PRIOR_DIR, COLOURS, SHAPES
from backend.priors.data import COLOUR_NAMES, build_geometry_bank, caption, sample_batch

CLASSIFIER_PATH = Path(__file__).parent / "weights" / "shape_classifier.safetensors"
CLASSIFIER_SEED = 777  # geometry seed for the classifier's renders (the prior trains on seed 1234)
CLASSIFIER_RES = 32

_ACHROMATIC = {"white", "black"}
_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items() if name not in _ACHROMATIC}


# ----------------------------------------------------------------------------- colour
def foreground_mask(image: torch.Tensor, threshold: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) bool foreground and (3,) background colour of one image (3, H, W) in [0, 1].

    The background is the per-channel median of the 1-pixel border; foreground pixels differ from
    it by more than ``threshold`` in some channel.
    """
    img = image.float()
    border = torch.cat([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], dim=1)
    bg = border.median(dim=1).values
    diff = (img - bg[:, None, None]).abs().amax(dim=0)
    return diff > threshold, bg


def mean_foreground_rgb(image: torch.Tensor) -> torch.Tensor | None:
    """(3,) mean RGB of the (eroded when possible) foreground, or None when there is none."""
    mask, _ = foreground_mask(image)
    if int(mask.sum()) < 4:
        return None
    eroded = -F.max_pool2d(-mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0.5
    use = eroded if int(eroded.sum()) >= 8 else mask
    return image[:, use].float().mean(dim=1)


def name_colour(rgb: torch.Tensor) -> str:
    """Named colour of a mean RGB (3,) in [0, 1]: white/black when unsaturated, else the nearest hue."""
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in torch.as_tensor(rgb).clamp(0, 1)])
    if s < 0.3 or v < 0.2:
        return "white" if v > 0.35 else "black"
    hue = h * 360.0

    def dist(a: float, b: float) -> float:
        d = abs(a - b) % 360.0
        return min(d, 360.0 - d)

    return min(_HUES, key=lambda name: dist(hue, _HUES[name]))


def judge_colour(image: torch.Tensor) -> str | None:
    """Named colour of the object in ``image`` (3, H, W), or None when no foreground is found."""
    rgb = mean_foreground_rgb(image)
    return None if rgb is None else name_colour(rgb)


# ----------------------------------------------------------------------------- shape
class ShapeClassifier(torch.nn.Module):
    """Small CNN: (B, 3, 32, 32) RGB in [0, 1] → (B, len(SHAPES)) logits."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GroupNorm(8, o), torch.nn.SiLU(),
                torch.nn.Conv2d(o, o, 3, padding=1), torch.nn.GroupNorm(8, o), torch.nn.SiLU(),
                torch.nn.MaxPool2d(2),
            )

        self.features = torch.nn.Sequential(block(4, 24), block(24, 48), block(48, 64))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 16, 96), torch.nn.SiLU(),
                                        torch.nn.Linear(96, len(SHAPES)))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) → classifier input (B, 4, 32, 32): RGB and |image - border background|."""
        if images.shape[-1] != CLASSIFIER_RES:
            images = F.interpolate(images, size=(CLASSIFIER_RES, CLASSIFIER_RES), mode="bilinear",
                                   align_corners=False, antialias=True)
        diffs = []
        for img in images:
            _, bg = foreground_mask(img)
            diffs.append((img - bg[:, None, None]).abs().amax(dim=0, keepdim=True))
        return torch.cat([images * 2 - 1, torch.stack(diffs) * 2 - 1], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.prepare(images)))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(B, 1, 1, 1, generator=g) < 0.3).float() * torch.rand(B, 1, 1, 1, generator=g)
    x = x * (1 - mix) + blur * mix
    x = x + torch.randn(x.shape, generator=g) * 0.06 * torch.rand(B, 1, 1, 1, generator=g)
    shifts = torch.randint(-2, 3, (B, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
    return x.clamp(0, 1)


def train_classifier(steps: int = 800, batch: int = 48, views_per_shape: int = 200, seed: int = CLASSIFIER_SEED,
                     out: Path | None = CLASSIFIER_PATH, log=print) -> tuple[ShapeClassifier, float]:
    """Train the shape classifier on fresh renders; returns (model, held-out accuracy)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    bank = build_geometry_bank(views_per_shape, CLASSIFIER_RES, seed=seed, supersample=2)
    held = build_geometry_bank(20, CLASSIFIER_RES, seed=seed + 1, supersample=2)
    net = ShapeClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = 2e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        b = sample_batch(bank, batch, g)
        loss = F.cross_entropy(net(_augment(b.images, g)), b.shape_idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"classifier step {step}/{steps} loss {float(loss.detach()):.3f} {time.time() - t0:.0f}s")
    net.eval()
    gh = torch.Generator().manual_seed(seed + 2)
    hb = sample_batch(held, 240, gh)
    with torch.no_grad():
        acc = float((net(hb.images).argmax(1) == hb.shape_idx).float().mean())
    log(f"classifier held-out accuracy {acc:.3f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
                  metadata={"heldout_accuracy": f"{acc:.4f}", "shapes": json.dumps(list(SHAPES))})
    return net, acc


_CLASSIFIER: ShapeClassifier | None = None


def load_classifier(path: Path = CLASSIFIER_PATH) -> ShapeClassifier:
    global _CLASSIFIER
    if _CLASSIFIER is None or path != CLASSIFIER_PATH:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"no shape classifier at {path}; run python -m backend.priors.evaluate "
                                    f"--train-classifier")
        net = ShapeClassifier()
        net.load_state_dict(load_file(str(path)))
        net.eval()
        if path != CLASSIFIER_PATH:
            return net
        _CLASSIFIER = net
    return _CLASSIFIER


@torch.no_grad()
def judge_shapes(images: torch.Tensor) -> list[str]:
    """Shape name for each image (B, 3, H, W) in [0, 1] by the trained classifier."""
    net = load_classifier()
    return [SHAPES[int(i)] for i in net(images.float()).argmax(1)]


# ----------------------------------------------------------------------------- prior evaluation
#: (azimuth, elevation) degrees for each view word (``backend.gaussians.cameras.view_word``'s bins).
VIEW_CAMERAS = {"front": (0.0, 15.0), "side": (90.0, 15.0), "back": (180.0, 15.0), "overhead": (0.0, 70.0)}


def evaluate_prior(model_dir: str | Path = BUNDLED_PRIOR_DIR, pairs: list[tuple[str, str]] | None = None,
                   samples_per_pair: int = 2, steps: int = 30, cfg: float = 3.0, seed: int = 0,
                   view: str | None = None, chunk: int = 48, eta: float = 1.0, side: int | None = None) -> dict:
    """Sample each (shape, colour) pair ``samples_per_pair`` times and judge every image.

    ``steps``/``cfg``/``eta``: the sampler; the default ``eta`` 1 is ancestral sampling (DDIM with
    eta 1 = the model's own DDPM sampler on a 30-step schedule); ``eta`` 0 is deterministic DDIM.
    ``side``: sample at this declared side (``sample_images``); None: the model's ``sample_size``.

    A camera-conditioned model sees each sample from a random camera of the data's range (seeded),
    or from the view word's camera when ``view`` is given.

    Returns ``{"rows": [(shape, colour, judged_shape, judged_colour)], "colour_acc", "shape_acc",
    "both_acc", "seconds"}``.
    """
    from backend.priors.sample import sample_images

    if pairs is None:
        pairs = [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    jobs = [(s, c) for s, c in pairs for _ in range(samples_per_pair)]
    g = torch.Generator().manual_seed(seed)
    if view is None:
        az = (torch.rand(len(jobs), generator=g) * 360.0 - 180.0).tolist()
        el = (torch.rand(len(jobs), generator=g) * 55.0 - 10.0).tolist()
        cameras = list(zip(az, el))
    else:
        cameras = [VIEW_CAMERAS[view]] * len(jobs)
    t0 = time.time()
    images = []
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        images.append(sample_images(model_dir, [caption(s, c, view) for s, c in part], steps=steps, cfg=cfg,
                                    seed=seed + i, eta=eta, cameras=cameras[i:i + chunk], side=side))
    imgs = torch.cat(images)
    shapes = judge_shapes(imgs)
    rows = [(s, c, js, judge_colour(img)) for (s, c), js, img in zip(jobs, shapes, imgs)]
    n = len(rows)
    return {
        "rows": rows, "images": imgs,
        "colour_acc": sum(r[1] == r[3] for r in rows) / n,
        "shape_acc": sum(r[0] == r[2] for r in rows) / n,
        "both_acc": sum(r[0] == r[2] and r[1] == r[3] for r in rows) / n,
        "seconds": time.time() - t0,
    }


#: Timestep bands of ``camera_gap`` (DDPM indices, 1000 train steps).
GAP_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@torch.no_grad()
def camera_gap(model_dir: str | Path, shapes: tuple[str, ...] = SHAPES, turns: tuple[float, ...] = (45.0, 90.0),
               images_per_shape: int = 96, seed: int = 0, high_elevation_fraction: float = 0.4,
               bands: tuple[tuple[int, int], ...] = GAP_BANDS) -> dict:
    """How much a camera-conditioned prior uses the camera (MVDream's premise, Shi et al. 2023).

    For ``images_per_shape`` training-style renders of each shape (a geometry bank with a seed the
    prior never trained on; random colours, backgrounds and captions as in training), the ε-MSE of
    the prediction given the view's own camera, against the same images and noise given the camera
    turned by each of ``turns`` degrees of azimuth. Timesteps are spread evenly over each band.

    Returns ``{"rows": [{"shape", "band": (lo, hi), "mse": float, "turned": {turn: mse}}]}``; the gap
    ``turned / mse - 1`` is 0 for a model that ignores the camera (a text-only model returns the same
    number for every turn). The light is fixed in the world, so even a sphere has a small gap.
    """
    from backend.camera_conditioning import encode_cameras
    from backend.priors.model import encode_prompts, load_model

    model = load_model(model_dir)
    encoding = model.camera_encoding
    bank = build_geometry_bank(max(images_per_shape, 8), model.unet.config.sample_size, seed=CLASSIFIER_SEED + 1,
                               high_elevation_fraction=high_elevation_fraction, cache_dir=None)
    alphas = model.scheduler.alphas_cumprod
    rows = []
    for shape in shapes:
        si = SHAPES.index(shape)
        sub = type(bank)(bank.coverage[si:si + 1], bank.shading[si:si + 1], bank.azimuth[si:si + 1],
                         bank.elevation[si:si + 1])
        g = torch.Generator().manual_seed(seed)
        b = sample_batch(sub, images_per_shape, g, p_empty=0.0)
        emb = encode_prompts(model, b.captions)
        x0 = b.images * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        for lo, hi in bands:
            t = torch.linspace(lo, hi - 1, images_per_shape).round().long()
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

            mses = []
            for turn in (0.0, *turns):
                cams = None if encoding is None else encode_cameras(encoding, b.azimuth + turn, b.elevation)
                pred = model.unet(xt, t, emb, class_labels=cams).sample
                mses.append(float(((pred - noise) ** 2).mean()))
            rows.append({"shape": shape, "band": (lo, hi), "mse": mses[0], "turned": dict(zip(turns, mses[1:]))})
    return {"rows": rows, "encoding": encoding}


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 16, scale: int = 2) -> None:
    """Write a PNG contact sheet of (B, 3, H, W) images in [0, 1]."""
    import numpy as np
    from PIL import Image

    B, _, H, W = images.shape
    nrow = (B + ncol - 1) // ncol
    sheet = torch.ones(3, nrow * H, ncol * W)
    for k in range(B):
        r, c = divmod(k, ncol)
        sheet[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = images[k]
    arr = (sheet.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).resize((ncol * W * scale, nrow * H * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the conjure-solids prior with independent judges.")
    ap.add_argument("--model", type=Path, default=BUNDLED_PRIOR_DIR)
    ap.add_argument("--train-classifier", action="store_true", help="(re)train the shape classifier first")
    ap.add_argument("--samples-per-pair", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 1 ancestral (DDPM-like), 0 deterministic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--view", default=None, help="append ', <view> view' to every prompt")
    ap.add_argument("--side", type=int, default=None,
                    help="sample at this side, one the model declares in sample_sides.json (default: its sample_size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG contact sheet of the samples")
    ap.add_argument("--camera-gap", action="store_true",
                    help="instead: how much worse the model denoises with the camera turned (camera_gap)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.camera_gap:
        gap = camera_gap(args.model)
        print(f"camera encoding {gap['encoding']}; eps-MSE with the view's camera, and % worse turned by")
        for r in gap["rows"]:
            turned = "  ".join(f"{d:+.0f} deg {100 * (v / r['mse'] - 1):+6.2f} %" for d, v in r["turned"].items())
            print(f"{r['shape']:9s} t {r['band'][0]:3d}-{r['band'][1]:4d}  {r['mse']:.5f}  {turned}")
        return 0
    if args.train_classifier or not CLASSIFIER_PATH.is_file():
        train_classifier()
    res = evaluate_prior(args.model, samples_per_pair=args.samples_per_pair, steps=args.steps, cfg=args.cfg,
                         seed=args.seed, view=args.view, eta=args.eta, side=args.side)
    print(f"{'prompt':28s} {'shape':9s} {'colour':7s}")
    for s, c, js, jc in res["rows"]:
        mark = ("ok" if js == s else "XX") + " " + ("ok" if jc == c else "XX")
        print(f"{caption(s, c, args.view):28s} {js:9s} {str(jc):7s} {mark}")
    print(f"colour accuracy {res['colour_acc']:.3f}  shape accuracy {res['shape_acc']:.3f}  "
          f"both {res['both_acc']:.3f}  ({len(res['rows'])} samples, {args.steps} DDIM steps, eta {args.eta}, cfg {args.cfg}, "
          f"{res['seconds']:.0f}s)")
    if args.grid:
        save_grid(res["images"], args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
