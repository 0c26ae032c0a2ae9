"""WikiText-2 (Merity et al. 2017) through Hugging Face ``datasets``, with its official splits.

``dataset.download=true`` loads ``Salesforce/wikitext`` / ``wikitext-2-raw-v1`` from the Hub (network,
cached under ``dataset.root/hf_datasets``). Without network it reads a local copy in the Hub's on-disk
format, the three parquet files ``<dataset.root>/wikitext/wikitext-2-raw-v1/{train,validation,test}-*.parquet``
(a ``text`` column, one line per row), through ``datasets``' own parquet builder. The lines of a split
are joined as they are (each keeps its newline), as the GPTQ / SparseGPT evaluation scripts do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compresslab.data.text import TextDataModule
from compresslab.errors import DatasetNotFoundError

HUB_ID, HUB_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
SPLITS = {"train": "train", "val": "validation", "test": "test"}


class WikiText2DataModule(TextDataModule):
    """WikiText-2 raw (module docstring); ``val_fraction``/``test_fraction`` do not apply (official splits)."""

    name = "wikitext2"
    path_key = "dataset.root"

    def __init__(self, config: str = HUB_CONFIG, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = str(config)

    @property
    def local_dir(self) -> Path:
        return self.root / "wikitext" / self.config

    def _files(self, split: str) -> list[Path]:
        return sorted(self.local_dir.glob(f"{SPLITS[split]}-*.parquet"))

    def expected_files(self) -> Sequence[Path]:
        return [self.local_dir / f"{name}-00000-of-00001.parquet" for name in SPLITS.values()]

    def check_available(self) -> None:
        if self.download:
            return
        missing = [SPLITS[s] for s in SPLITS if not self._files(s)]
        if missing:
            raise DatasetNotFoundError(
                f"dataset=wikitext2: no {', '.join(missing)} parquet file under {self.local_dir.resolve()} "
                f"(expected {self.config}/<split>-00000-of-00001.parquet as on the Hub). Set dataset.root=<dir "
                "holding wikitext/>, or dataset.download=true on a machine with network.")

    def split_texts(self) -> tuple[str, str, str]:
        from datasets import load_dataset

        self.check_available()
        if self.download:
            data = load_dataset(HUB_ID, self.config, cache_dir=str(self.root / "hf_datasets"))
        else:
            data = load_dataset("parquet", data_files={SPLITS[s]: [str(p) for p in self._files(s)] for s in SPLITS},
                                cache_dir=str(self.root / "hf_datasets"))
        return tuple("".join(data[SPLITS[s]]["text"]) for s in ("train", "val", "test"))
