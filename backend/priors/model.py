"""Construction, saving and loading of the conjure-solids model (diffusers pipeline layout).

Layout written by ``save_model(folder, ...)`` (what ``backend.guidance`` loads with
``from_pretrained(folder, subfolder=...)``)::

    model_index.json
    unet/          UNet2DConditionModel, pixel space: RGB in [-1, 1], sample_size 32, 3 channels
    text_encoder/  CLIPTextModel (tiny: hidden 64, 2 layers)
    tokenizer/     CLIPTokenizer (word-level vocabulary of the closed world, see ``tokenizer``)
    scheduler/     DDPMScheduler (1000 steps, squaredcos_cap_v2, epsilon prediction)
    camera_conditioning.json  only for a camera-conditioned UNet (``backend.camera_conditioning``)
    sample_sides.json  only for a UNet trained at several sides (``backend.guidance.sample_sides``)
    vocabulary.json  {"shapes": [...], "colours": [...], "views": [...], "filler": [...]}

There is deliberately no ``vae/``: the guidance treats that as a pixel-space model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from backend import camera_conditioning
from backend.guidance import sample_sides
from backend.priors import FILLER_WORDS, VOCABULARY
from backend.priors.tokenizer import BOS, EOS, build_vocab, write_tokenizer

RESOLUTION = 32
TEXT_DIM = 64


@dataclass
class SolidsModel:
    """The trainable parts plus the tokenizer and scheduler (all diffusers/transformers objects)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    camera_encoding: str | None = None  # ``backend.camera_conditioning`` encoding, None: text only
    sides: tuple[int, ...] | None = None  # image sides it was trained at (``sample_sides.json``), None: sample_size


def make_unet(resolution: int = RESOLUTION, camera_dim: int | None = None):
    """The UNet; with ``camera_dim`` it also embeds a (B, camera_dim) camera vector into the timestep
    embedding (``class_embed_type="projection"``, MVDream's camera conditioning)."""
    from diffusers import UNet2DConditionModel

    camera = {} if camera_dim is None else {"class_embed_type": "projection",
                                            "projection_class_embeddings_input_dim": int(camera_dim)}
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        # cross-attention (text) only at 8x8 and in the mid block: cheap enough for 2 CPU cores
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=8,
        # the pooled caption also joins the timestep embedding (diffusers' TextTimeEmbedding), so
        # every ResNet block sees the global colour/shape words, not only the 8x8 cross-attention
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        **camera,
    )


def add_camera_conditioning(unet: torch.nn.Module, encoding: str, seed: int = 0) -> torch.nn.Module:
    """A copy of a text-only ``unet`` with a camera embedding whose output layer starts at zero, so the
    new model predicts exactly what the old one did until fine-tuning teaches it the camera (MVDream
    fine-tunes a pretrained text-to-image UNet the same way). The embedding's input layer is drawn
    from ``seed`` (the global RNG is left as it was)."""
    if getattr(unet.config, "class_embed_type", None) is not None:
        raise ValueError("the UNet already has a class embedding")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = {**{k: v for k, v in unet.config.items() if not k.startswith("_")}, "class_embed_type": "projection",
                  "projection_class_embeddings_input_dim": camera_conditioning.ENCODINGS[encoding]}
        new = type(unet).from_config(config)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"UNet layouts differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        new.class_embedding.linear_2.weight.zero_()
        new.class_embedding.linear_2.bias.zero_()
    return new.to(next(unet.parameters()).device).train(unet.training)


def grow_unet(unet: torch.nn.Module, sample_size: int, seed: int = 0) -> torch.nn.Module:
    """A copy of a trained ``unet`` with one more resolution level outside the old ones, for images of
    twice the side: progressive growing (Karras et al. 2018, "Progressive Growing of GANs"), started as a
    function-preserving expansion (Chen et al. 2016, "Net2Net").

    The old levels keep their weights and their depth: a UNet trained at 32 px with its bottleneck at
    8×8 becomes one for 64 px whose bottleneck is still 8×8, so the shapes it learnt at 32 px keep the
    same receptive field. The new outer level (``DownBlock2D`` / ``UpBlock2D`` at
    ``block_out_channels[0]`` channels) starts as a 2×2 area pooling into the old network and a nearest
    upsampling out of it: its resnets' second convolution is zero (an identity), the downsampler averages
    each channel's 2×2 block, the old last up block's new upsampler copies each channel, and the new up
    block's shortcuts pass the upsampled features and drop the skip. ``conv_in`` and ``conv_out`` keep
    the old weights at the new side. Fine-tuning at the new side then teaches the outer level the detail
    the old model never saw (``python -m backend.priors.train --grow-from DIR``).

    Args:
        unet: a text-only ``UNet2DConditionModel`` whose down blocks are all ``DownBlock2D`` or
            ``CrossAttnDownBlock2D`` (the bundled layout).
        sample_size: the grown model's declared ``sample_size`` (pixels).
        seed: draws the new level's other weights (the global RNG is left as it was).
    """
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    if config.get("class_embed_type") is not None:
        raise ValueError("grow a text-only UNet; add the camera embedding afterwards")
    width = int(config["block_out_channels"][0])
    config.update(sample_size=int(sample_size),
                  block_out_channels=(width, *config["block_out_channels"]),
                  down_block_types=("DownBlock2D", *config["down_block_types"]),
                  up_block_types=(*config["up_block_types"], "UpBlock2D"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = type(unet).from_config(config)
    target = new.state_dict()
    moved = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            parts[1] = str(int(parts[1]) + 1)
        name = ".".join(parts)
        if name not in target or target[name].shape != value.shape:
            raise ValueError(f"UNet layouts differ at {key} -> {name}")
        moved[name] = value
    target.update(moved)
    new.load_state_dict(target)
    outer_down, last_old_up, outer_up = new.down_blocks[0], new.up_blocks[-2], new.up_blocks[-1]
    eye = torch.eye(width)
    with torch.no_grad():
        for block in (outer_down, outer_up):
            for resnet in block.resnets:
                resnet.conv2.weight.zero_()
                resnet.conv2.bias.zero_()
                if resnet.conv_shortcut is not None:  # (width + skip) -> width: keep the upsampled features
                    resnet.conv_shortcut.weight.zero_()
                    resnet.conv_shortcut.bias.zero_()
                    resnet.conv_shortcut.weight[:, :width, 0, 0] = eye
        down = outer_down.downsamplers[0].conv  # 3x3, stride 2, padding 1: taps 1..2 cover a 2x2 block
        down.weight.zero_()
        down.bias.zero_()
        down.weight[:, :, 1:, 1:] = 0.25 * eye[:, :, None, None]
        up = last_old_up.upsamplers[0].conv  # nearest x2, then 3x3: the centre tap copies
        up.weight.zero_()
        up.bias.zero_()
        up.weight[:, :, 1, 1] = eye
    return new.to(next(unet.parameters()).device).train(unet.training)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,  # tokenizer pads to 16; 77 keeps SD-style padding valid too
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(cfg)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def new_model(tmp_tokenizer_dir: str | Path, resolution: int = RESOLUTION) -> SolidsModel:
    """A freshly initialised model whose UNet declares ``resolution`` as its ``sample_size`` (seed
    torch before calling for reproducibility)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_tokenizer_dir)))
    return SolidsModel(make_unet(resolution), make_text_encoder(), tok, make_scheduler())


def save_model(folder: str | Path, model: SolidsModel) -> Path:
    """Write the whole pipeline folder (safetensors weights) and ``model_index.json``."""
    import diffusers
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tokenizer(folder / "tokenizer")
    model.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "_conjure_prior": "conjure-solids",
        "_transformers_version": transformers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    vocab = {**{k: list(v) for k, v in VOCABULARY.items()}, "filler": list(FILLER_WORDS)}
    (folder / "vocabulary.json").write_text(json.dumps(vocab, indent=1) + "\n")
    declared = folder / camera_conditioning.CAMERA_CONDITIONING_FILE
    if model.camera_encoding is not None:
        camera_conditioning.write_declaration(folder, model.camera_encoding)
    elif declared.exists():
        declared.unlink()
    sides_file = folder / sample_sides.SAMPLE_SIDES_FILE
    if model.sides is not None and len(model.sides) > 1:
        sample_sides.write_sides(folder, model.sides)
    elif sides_file.exists():
        sides_file.unlink()
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> SolidsModel:
    """Load the components with ``from_pretrained`` from the subfolders, in eval mode."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no model_index.json)")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).eval()
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device).eval()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    encoding = camera_conditioning.read_declaration(folder)
    camera_conditioning.check_unet(unet, encoding, str(folder))
    sides = sample_sides.read_sides(folder, int(unet.config.sample_size))
    return SolidsModel(unet, te, tok, sched, encoding, sides if len(sides) > 1 else None)


def encode_prompts(model: SolidsModel, prompts: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, L, TEXT_DIM) text-encoder hidden states, padded to ``tokenizer.model_max_length``."""
    tok = model.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    return model.text_encoder(ids)[0]
