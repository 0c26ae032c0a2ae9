"""The embedded datasets: digits and generated MNIST-1D."""

import numpy as np
import pytest
import torch

from compresslab.data import DigitsDataModule, MNIST1DDataModule


def test_digits_split_is_fixed_disjoint_and_complete():
    a, b = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0)
    a.setup(), b.setup()
    assert a.val_indices == b.val_indices
    assert not set(a.val_indices) & set(a.train_indices)
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    assert len(a.test_set) == 360
    x, y = a.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 10
    c = DigitsDataModule(split_seed=1)
    c.setup()
    assert c.val_indices != a.val_indices


def test_mnist1d_is_generated_locally_and_cached(tmp_path, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must not download")

    monkeypatch.setattr(requests, "get", no_network)
    dm = MNIST1DDataModule(root=tmp_path)
    dm.setup()
    assert dm.cache_path.exists()
    assert dm.input_shape == (1, 40) and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) == 4000 and len(dm.test_set) == 1000
    stamp = dm.cache_path.stat().st_mtime_ns
    again = MNIST1DDataModule(root=tmp_path)
    again.setup()
    assert dm.cache_path.stat().st_mtime_ns == stamp  # reused, not regenerated
    x0, y0 = dm.test_set[3]
    x1, y1 = again.test_set[3]
    assert torch.equal(x0, x1) and int(y0) == int(y1)
    with np.load(dm.cache_path, allow_pickle=False) as f:
        assert f["x"].shape == (4000, 40)


def test_bad_val_fraction_is_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
