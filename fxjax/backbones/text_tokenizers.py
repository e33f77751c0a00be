"""Text → token ids [n, context] int32 for the text towers, without torch.

`HFTokens` wraps a transformers tokenizer (HF CLIP / SigLIP folders, and open_clip models that name one).
`ClipBpe` is open_clip's `SimpleTokenizer` (OpenAI CLIP's byte-level BPE), ported to read the same
`bpe_simple_vocab_16e6.txt.gz` and give the same ids: [start] + tokens + [end], truncated with the end token
kept, padded with 0. The text cleaning is open_clip's (`clean`: "lower", "whitespace" or "canonicalize"),
ftfy's mojibake repair included, so it needs the `ftfy` package.
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split())


def _canonicalize(text: str) -> str:  # big_vision's: no punctuation, underscores as spaces, lower case
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


CLEAN: dict[str, Callable[[str], str]] = {
    "lower": lambda t: _whitespace(_basic_clean(t)).lower(),
    "whitespace": lambda t: _whitespace(_basic_clean(t)),
    "canonicalize": lambda t: _canonicalize(_basic_clean(t)),
}


def clean_fn(name: str) -> Callable[[str], str]:
    if name not in CLEAN:
        raise ValueError(f"unsupported tokenizer clean {name!r}; supported: {', '.join(CLEAN)}")
    return CLEAN[name]


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table that the BPE vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class ClipBpe:
    """OpenAI CLIP's BPE tokenizer (open_clip's `SimpleTokenizer`) from its merges file."""

    def __init__(self, bpe_path: str | Path, context_length: int, clean: str = "lower"):
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        chars = list(_bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab + special)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[special[0]], self.encoder[special[1]]
        self.context_length = context_length
        self.clean = clean_fn(clean)
        self.cache = {t: t for t in special}
        self.pattern = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    def bpe(self, token: str) -> str:
        """One pre-token → its BPE pieces, space-separated (the last marked `</w>`), merging by rank."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        table = _bytes_to_unicode()
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            token = "".join(table[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int32)  # [n, context], 0-padded
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id][: self.context_length]
            ids[-1] = self.end_id
            out[row, : len(ids)] = ids
        return out


class HFTokens:
    """A transformers tokenizer padded to the tower's context length (one compiled shape for every batch).
    `clean`: open_clip's text cleaning before tokenizing, None for HF checkpoints (their tokenizer normalises)."""

    def __init__(self, tokenizer, context_length: int, clean: str | None = None):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.clean = clean_fn(clean) if clean else None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [self.clean(t) for t in texts] if self.clean else list(texts)
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="np"
        )["input_ids"]
        return np.asarray(ids, np.int32)
