"""A word-level CLIP tokenizer for the closed world of the prior.

``write_tokenizer(folder)`` writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
``special_tokens_map.json`` that ``transformers.CLIPTokenizer.from_pretrained`` reads. The BPE merges
are learnt (deterministically) on the word list itself, so every vocabulary word — shapes, colours,
view words, "a", "an", ",", … — becomes exactly one token; any other word falls back to single
letters (still valid ids), so out-of-world prompts tokenize without error.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

from backend.priors import COLOURS, FILLER_WORDS, SHAPES, VIEWS

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: Prompts are short ("a red cube, side view" is 8 tokens with BOS/EOS); SD-style padding length.
MODEL_MAX_LENGTH = 16


def vocabulary_words() -> list[str]:
    """Every whole word the tokenizer knows (sorted, deterministic)."""
    words = set(SHAPES) | set(COLOURS) | set(VIEWS) | set(FILLER_WORDS) | {","}
    return sorted(words)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until each word is a single symbol."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[(a, b)] += 1
        if not counts:
            return merges
        best = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1]), kv[0]))[0]
        merges.append(best)
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(out)
        seqs = new


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, ordered merges). Ids: single characters first, then merge products, then specials."""
    words = vocabulary_words()
    merges = _learn_merges(words)
    tokens: list[str] = []
    for ch in string.ascii_lowercase + string.digits + ",.!?'-":
        tokens += [ch, ch + "</w>"]
    for a, b in merges:
        tokens.append(a + b)
    seen: dict[str, int] = {}
    for tok in tokens:
        if tok not in seen:
            seen[tok] = len(seen)
    seen[BOS] = len(seen)
    seen[EOS] = len(seen)
    return seen, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write the tokenizer files into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=True) + "\n")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    return folder
