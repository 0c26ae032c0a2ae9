"""On-device tensor datasets: batched augmentation and the resident-batch loader."""

import torch
import torch.nn.functional as F

from compresslab.data import DigitsDataModule
from compresslab.data.on_device import TensorBatches, random_crop_flip
from compresslab.pipeline import run_experiment


def test_random_crop_matches_manual_slicing_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    pad_value = torch.tensor([-1.0, -2.0, -3.0])
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, pad_value=pad_value, flip=False, generator=g)
    g = torch.Generator().manual_seed(0)  # replay the same draws
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    for i in range(2):
        padded = torch.stack([F.pad(x[i, c], (2, 2, 2, 2), value=float(pad_value[c])) for c in range(3)])
        assert torch.equal(out[i], padded[:, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6])


def test_flip_mirrors_the_width_axis():
    x = torch.randn(64, 1, 4, 4)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_tensor_batches_cover_each_sample_once_per_epoch_and_shard_across_ranks():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in TensorBatches(x, y, 3, shuffle=True)])
    assert sorted(seen.tolist()) == list(range(10))
    shards = [torch.cat([yb for _, yb in TensorBatches(x, y, 4, shuffle=True, rank=r, world=2)]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert len(TensorBatches(x, y, 4, shuffle=False, rank=1, world=2)) == 2


def test_on_device_digits_gives_the_same_batches_as_the_dataset():
    dm = DigitsDataModule(on_device=True, batch_size=50)
    dm.setup()
    xb, yb = next(iter(dm.val_dataloader()))
    ref = [dm.val_set[i] for i in range(len(yb))]
    assert torch.equal(xb, torch.stack([r[0] for r in ref]))
    assert yb.tolist() == [int(r[1]) for r in ref]


def test_on_device_run_end_to_end(make_cfg):
    record = run_experiment(make_cfg(["dataset.on_device=true"]))
    assert record["status"] == "completed"
    assert record["config"]["dataset"]["on_device"] is True
