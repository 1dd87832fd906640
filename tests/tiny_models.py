"""Tiny random diffusers models saved in the pipeline folder layout, for tests that cannot download.

``build_tiny_model(folder, latent=True)`` writes ``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/`` (vocab.json + merges.txt written here: a character-level BPE), ``scheduler/`` and,
for the latent variant, ``vae/``. Load them back with ``load_guidance`` like any hub model.

Shapes: pixel variant — UNet on 3×32×32 RGB; latent variant — VAE with 2 blocks (factor 2, 4 latent
channels) and a UNet on 4×16×16 latents, so both take 32×32 images. Text: hidden size 32, 77 tokens.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TEXT_DIM = 32
MAX_TOKENS = 77


def write_tokenizer(folder: Path) -> None:
    """Write a character-level CLIP BPE tokenizer (vocab.json, merges.txt + saved config) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2", "v i", "vi e", "vie w</w>"]
    for token in ("vi", "vie", "view</w>"):
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tok.save_pretrained(str(folder))


def build_tiny_model(folder: str | Path, latent: bool = True, seed: int = 0) -> Path:
    """Build, save and return a tiny random model folder (see module docstring)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_tokenizer(folder / "tokenizer")
    from transformers import CLIPTokenizer

    vocab_size = len(CLIPTokenizer.from_pretrained(str(folder / "tokenizer")))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    text.save_pretrained(str(folder / "text_encoder"))
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=16 if latent else 32, in_channels=channels, out_channels=channels,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )
    unet.save_pretrained(str(folder / "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(str(folder / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if latent:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
            sample_size=32,
        )
        vae.save_pretrained(str(folder / "vae"))
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
    build_tiny_model(out / "latent", latent=True)
    build_tiny_model(out / "pixel", latent=False)
    print(out)
