"""Measurement rules (DESIGN.md): latency after warm-up over many timed runs (median, p90)
with device/threads recorded; size = bytes of the saved artifact; MACs counted by torch's
FlopCounterMode (MACs = FLOPs / 2 for conv/linear/matmul)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> dict:
    """Parameters, nonzero parameters and the sparsity of the whole model (buffers excluded)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"params": total, "params_nonzero": nonzero, "sparsity": 1.0 - nonzero / total if total else 0.0}


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (per the batch given)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, warmup: int = 10, iters: int = 50) -> dict:
    """Wall-clock latency of ``model(example)`` in ms: median and p90 over ``iters`` timed runs."""
    model.eval()
    device = example.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(0, warmup)):
        model(example)
    sync()
    times = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        model(example)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"median_ms": statistics.median(times), "p90_ms": p90}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` over (x, y) batches, in eval mode."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        pred = model(x.to(device)).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
    return correct / total if total else float("nan")


def file_size(path: Path) -> int:
    """Bytes on disk."""
    return Path(path).stat().st_size


def profile(
    model: nn.Module,
    example_b1: torch.Tensor,
    example_bn: torch.Tensor,
    warmup: int = 10,
    iters: int = 50,
    macs_model: nn.Module | None = None,
) -> dict:
    """Params/sparsity, MACs (batch 1) and CPU latency at batch 1 and batch N, with threads and device.

    ``macs_model`` lets a quantized artifact report the MACs of its float twin
    (FlopCounterMode does not see int8 kernels).
    """
    stats = count_params(model)
    lat1 = measure_latency(model, example_b1, warmup, iters)
    latn = measure_latency(model, example_bn, warmup, max(5, iters // 2))
    return {
        **stats,
        "macs": count_macs(macs_model if macs_model is not None else model, example_b1),
        "latency_ms_b1": lat1["median_ms"],
        "latency_ms_b1_p90": lat1["p90_ms"],
        "latency_ms_bN": latn["median_ms"],
        "latency_ms_bN_p90": latn["p90_ms"],
        "latency_batch": int(example_bn.shape[0]),
        "threads": torch.get_num_threads(),
        "device": str(example_b1.device),
    }
