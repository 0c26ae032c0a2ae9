"""Tokenizers of the text datamodules: characters, or byte-level BPE trained on the training split.

``char``: one id per distinct character of the training split, in sorted order, id 0 for a character
the training split never shows (``<unk>``). ``bpe``: a byte-level BPE (Sennrich et al. 2016; GPT-2's
byte-level variant) trained with Hugging Face ``tokenizers`` on the training split only, so no
val/test text shapes the vocabulary; it is cached as ``tokenizer.json`` under ``<cache dir>/`` in a
file named by the SHA-256 of its settings and of the training text, and reused when both match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from filelock import FileLock

from compresslab.errors import ConfigError

UNK = "<unk>"


class CharTokenizer:
    """Character-level tokenizer: the training split's characters, ``<unk>`` (id 0) for any other."""

    kind = "char"

    def __init__(self, train_text: str) -> None:
        self.chars = [UNK] + sorted(set(train_text))
        self._table = np.zeros(0x110000 if any(ord(c) > 0xFFFF for c in train_text) else 0x10000, dtype=np.int64)
        for i, c in enumerate(self.chars[1:], start=1):
            self._table[ord(c)] = i

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int64)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.zeros(len(codes), dtype=np.int64)
        known = codes < len(self._table)
        ids[known] = self._table[codes[known]]
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if int(i) > 0 else "?" for i in ids)

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class BPETokenizer:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) trained on the training split and cached."""

    kind = "bpe"

    def __init__(self, tokenizer, path: Path | None, key: str) -> None:
        self.tokenizer, self.path, self.key = tokenizer, path, key

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int64); the text is encoded a line at a time (batched, in Rust)."""
        lines = text.splitlines(keepends=True)
        encoded = self.tokenizer.encode_batch(lines, add_special_tokens=False) if lines else []
        return np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "cache_key": self.key,
                "file": str(self.path) if self.path else None}


def bpe_key(train_text: str, vocab_size: int, min_frequency: int) -> str:
    """The cache key of a BPE tokenizer: SHA-256 of its settings and of the training text."""
    settings = json.dumps({"kind": "byte_level_bpe", "vocab_size": vocab_size, "min_frequency": min_frequency,
                           "version": 1}, sort_keys=True)
    digest = hashlib.sha256(settings.encode())
    digest.update(train_text.encode("utf-8"))
    return digest.hexdigest()[:20]


def train_bpe(train_text: str, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``train_text`` (``tokenizers``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    return tok


def bpe_tokenizer(train_text: str, vocab_size: int, cache_dir: Path | None, min_frequency: int = 2) -> BPETokenizer:
    """The cached BPE tokenizer for these settings and training text, trained (and cached) when absent."""
    from tokenizers import Tokenizer

    if vocab_size < 257:
        raise ConfigError(f"dataset.vocab_size={vocab_size}: a byte-level BPE needs at least 257 tokens "
                          "(256 bytes + merges); use dataset.tokenizer=char for a tiny vocabulary.")
    key = bpe_key(train_text, vocab_size, min_frequency)
    if cache_dir is None:
        return BPETokenizer(train_bpe(train_text, vocab_size, min_frequency), None, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"bpe-{vocab_size}-{key}.json"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return BPETokenizer(Tokenizer.from_file(str(path)), path, key)  # JSON: no code is loaded
        tok = train_bpe(train_text, vocab_size, min_frequency)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return BPETokenizer(tok, path, key)


def make_tokenizer(kind: str, train_text: str, vocab_size: int, cache_dir: Path | None):
    """``dataset.tokenizer``: ``char`` or ``bpe``."""
    if kind == "char":
        return CharTokenizer(train_text)
    if kind == "bpe":
        return bpe_tokenizer(train_text, int(vocab_size), cache_dir)
    raise ConfigError(f"dataset.tokenizer={kind!r}: expected char or bpe")
