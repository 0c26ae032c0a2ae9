"""Text datamodules for causal language modelling: ``dataset=shakespeare``, ``textfile``, ``wikitext2``.

A text is split into contiguous train / val / test parts (``shakespeare``, ``textfile``: the last
``test_fraction`` of the characters is test, the ``val_fraction`` before it val; ``wikitext2``: its
official splits), tokenized (:mod:`compresslab.data.tokenize`: ``char`` or a BPE trained on the training
part only) and cut into non-overlapping blocks of ``block_size`` tokens: a sample is
``(ids[i : i+T], ids[i+1 : i+T+1])``, the targets are the inputs shifted by one token. The samples are
held as tensors (``ArrayDataset``), so every loader path of :class:`ClassificationDataModule` (resident
batches, DataLoader, DDP shards) serves them; ``input_shape = (block_size,)`` and
``num_classes = vocab size``, which is what the zoo's LM factories take.

The student's regime: ``train_fraction`` keeps a seeded random subset of the training blocks
(``subset_seed``); ``exclude_classes`` and ``unlabeled_fraction`` have no meaning for next-token
prediction and are refused. :meth:`calibration_sequences` gives post-training methods ``n`` training
sequences (GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT calibrate on such segments).
"""

from __future__ import annotations

from abc import abstractmethod
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from compresslab.data.base import ArrayDataset, ClassificationDataModule
from compresslab.data.options import check_dataset_options
from compresslab.data.tokenize import make_tokenizer
from compresslab.errors import ConfigError, DatasetNotFoundError

#: the corpus ``dataset=shakespeare`` reads when ``dataset.path`` is null (data/corpora/README.md)
SHIPPED_CORPUS = "tempest.txt"


def shipped_corpus() -> Path:
    """The public-domain text shipped in the package (The Tempest, 209 KB)."""
    return Path(str(resources.files("compresslab.data") / "corpora" / SHIPPED_CORPUS))


def blocks(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(inputs, next-token targets)`` blocks of ``block_size`` tokens; the tail that
    does not fill a block is dropped."""
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1: n * block_size + 1].view(n, block_size)
    return x.contiguous(), y.contiguous()


class TextDataModule(ClassificationDataModule):
    """Causal-LM datamodule over a text split three ways (module docstring). Subclasses give the
    three texts (:meth:`split_texts`)."""

    name = "text"
    array_backed = True
    is_language_model = True
    #: the key that names the text's location in error messages
    path_key = "dataset.path"

    def __init__(self, tokenizer: str = "char", vocab_size: int = 512, block_size: int = 64,
                 test_fraction: float = 0.05, **kwargs) -> None:
        check_dataset_options(block_size=block_size, vocab_size=vocab_size, test_fraction=test_fraction)
        if tokenizer not in ("char", "bpe"):
            raise ConfigError(f"dataset.tokenizer={tokenizer!r}: expected char or bpe")
        for key in ("exclude_classes", "unlabeled_fraction"):
            if kwargs.get(key):
                raise ConfigError(f"dataset.{key}={kwargs[key]!r}: a language model's classes are its vocabulary; "
                                  f"{key} has no meaning for next-token prediction. Leave it at its default "
                                  "(dataset.train_fraction does narrow the student's training blocks).")
        kwargs.setdefault("val_fraction", 0.05)
        super().__init__(augment=False, **kwargs)
        self.tokenizer_kind, self.vocab_size, self.block_size = tokenizer, int(vocab_size), int(block_size)
        self.test_fraction = float(test_fraction)
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ConfigError(f"dataset.val_fraction + dataset.test_fraction = {self.val_fraction + self.test_fraction}: "
                              "leave at least half of the text for training")
        self.input_shape = (self.block_size,)
        self.tokenizer = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.token_counts: dict[str, int] = {}

    # ---- what a subclass gives ------------------------------------------------------------
    @abstractmethod
    def split_texts(self) -> tuple[str, str, str]:
        """(train, val, test) texts: a file's contiguous parts, or a dataset's own splits."""

    def tokenizer_cache_dir(self) -> Path | None:
        """Where a trained BPE tokenizer is cached (``<dataset.root>/tokenizers``)."""
        return self.root / "tokenizers"

    # ---- the splits -----------------------------------------------------------------------
    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._splits is None:
            texts = dict(zip(("train", "val", "test"), self.split_texts()))
            self.tokenizer = make_tokenizer(self.tokenizer_kind, texts["train"], self.vocab_size,
                                            self.tokenizer_cache_dir())
            self.num_classes = self.tokenizer.vocab_size
            self._splits = {}
            for split, text in texts.items():
                ids = torch.from_numpy(self.tokenizer.encode(text))
                self.token_counts[split] = int(len(ids))
                if len(ids) < self.block_size + 1:
                    raise ConfigError(
                        f"dataset={self.name}: the {split} split has {len(ids)} tokens, fewer than one block of "
                        f"dataset.block_size={self.block_size} + 1; use a longer text ({self.path_key}), a smaller "
                        f"block_size, or a larger dataset.{'val' if split == 'val' else 'test'}_fraction.")
                self._splits[split] = blocks(ids, self.block_size)
        return self._splits

    def _train_dataset(self):
        return ArrayDataset(*self._load()["train"])

    def _test_dataset(self):
        return ArrayDataset(*self._load()["test"])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check_available()
        splits = self._load()
        n = len(splits["train"][0])
        self.full_train_indices = list(range(n))
        self.val_indices = list(range(len(splits["val"][0])))
        if self.train_fraction < 1.0:
            g = torch.Generator().manual_seed(self.subset_seed)
            keep = max(1, int(round(n * self.train_fraction)))
            self.train_indices = sorted(torch.randperm(n, generator=g)[:keep].tolist())
        else:
            self.train_indices = self.full_train_indices
        self.unlabeled_indices = []
        x, y = splits["train"]
        index = torch.as_tensor(self.train_indices, dtype=torch.long)
        self.train_set = ArrayDataset(x[index], y[index])
        self.val_set = ArrayDataset(*splits["val"])
        self.test_set = ArrayDataset(*splits["test"])

    def _student_train(self, dataset):
        return self.train_set  # the resident-batch path asks for the (already narrowed) training blocks

    def calibration_sequences(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` token blocks ``(n, block_size)`` drawn at random (``seed``) from the full training split:
        the calibration set of post-training methods (never val or test)."""
        x = self._load()["train"][0]
        if n < 1:
            raise ConfigError(f"calibration needs at least one sequence, got n={n}")
        g = torch.Generator().manual_seed(int(seed))
        return x[torch.randperm(len(x), generator=g)[: min(int(n), len(x))]].clone()

    def regime_summary(self) -> dict:
        """Split sizes in blocks and tokens, the tokenizer, and the student's training subset."""
        return {**super().regime_summary(), "block_size": self.block_size, "tokens": dict(self.token_counts),
                "tokenizer": self.tokenizer.describe() if self.tokenizer else None,
                "test_blocks": len(self.test_set) if self.test_set is not None else None}

    def describe(self) -> dict:
        return {**super().describe(), "block_size": self.block_size, "tokenizer": self.tokenizer_kind}


class TextFileDataModule(TextDataModule):
    """Any local UTF-8 text file (``dataset.path``, required)."""

    name = "textfile"

    def __init__(self, path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not path:
            raise ConfigError("dataset=textfile needs dataset.path=<a UTF-8 text file>")
        self.path = Path(path)

    def expected_files(self) -> Sequence[Path]:
        return (self.path,)

    def check_available(self) -> None:
        if not self.path.is_file():
            raise DatasetNotFoundError(f"dataset.path={str(self.path)!r}: no such file ({self.path.resolve()}). "
                                       "Point dataset.path at a UTF-8 text file.")

    def split_texts(self) -> tuple[str, str, str]:
        """(train, val, test): contiguous parts of the file, test last."""
        text = self.read_text()
        n = len(text)
        a, b = int(n * (1 - self.val_fraction - self.test_fraction)), int(n * (1 - self.test_fraction))
        return text[:a], text[a:b], text[b:]

    def read_text(self) -> str:
        """The file's text (UTF-8)."""
        try:
            return self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"dataset.path={str(self.path)!r} is not UTF-8 text ({exc})") from exc


class ShakespeareDataModule(TextFileDataModule):
    """Shakespeare: by default the public-domain *The Tempest* shipped in the package
    (data/corpora/README.md); ``dataset.path`` points at another copy, e.g. the 42 works (5 MB)."""

    name = "shakespeare"

    def __init__(self, path: str | None = None, **kwargs) -> None:
        super().__init__(path=path or str(shipped_corpus()), **kwargs)
