"""Measurement rules (DESIGN.md): latency after warm-up over many timed runs (median, p90)
with device/threads recorded; size = bytes of the saved artifact; MACs counted by torch's
FlopCounterMode (MACs = FLOPs / 2 for conv/linear/matmul)."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Iterable, Mapping

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_calls(model: nn.Module, example: torch.Tensor, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        model(example)
        _sync(example.device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"median_ms": statistics.median(times), "p90_ms": p90}


@torch.no_grad()
def interleaved_latency(models: Mapping[str, nn.Module], example: torch.Tensor, warmup: int = 10,
                        iters: int = 50, rounds: int = 5) -> dict[str, dict]:
    """Latency in ms (median and p90 of about ``iters`` timed calls each) of several models on one
    input, measured in turn: after every model's warm-up, ``rounds`` rounds in which each model
    makes its share of the timed calls, the order rotating every round, so that drift (clock
    speed, caches, other load on the machine) falls on all the models alike rather than on
    whichever is measured first."""
    names = list(models)
    for name in names:
        models[name].eval()
        _timed_calls(models[name], example, max(0, warmup))
    rounds = max(1, int(rounds))
    per_round = max(1, -(-max(1, iters) // rounds))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += _timed_calls(models[name], example, per_round)
    return {name: _summary(t) for name, t in times.items()}


def measure_latency(model: nn.Module, example: torch.Tensor, warmup: int = 10, iters: int = 50) -> dict:
    """Wall-clock latency of ``model(example)`` in ms: median and p90 over ``iters`` timed runs."""
    return interleaved_latency({"model": model}, example, warmup, iters, rounds=1)["model"]


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


def profile_many(
    models: Mapping[str, nn.Module],
    example_b1: torch.Tensor,
    example_bn: torch.Tensor,
    warmup: int = 10,
    iters: int = 50,
    rounds: int = 5,
) -> dict[str, dict]:
    """Params/sparsity, MACs (batch 1) and latency at batch 1 and batch N of each model, with
    threads, device and dtypes; the latencies are measured interleaved (:func:`interleaved_latency`)."""
    lat1 = interleaved_latency(models, example_b1, warmup, iters, rounds)
    latn = interleaved_latency(models, example_bn, warmup, max(5, iters // 2), rounds)
    return {name: {
        **count_params(model),
        "macs": count_macs(model, example_b1),
        "latency_ms_b1": lat1[name]["median_ms"],
        "latency_ms_b1_p90": lat1[name]["p90_ms"],
        "latency_ms_bN": latn[name]["median_ms"],
        "latency_ms_bN_p90": latn[name]["p90_ms"],
        "latency_batch": int(example_bn.shape[0]),
        "latency_rounds": int(rounds),
        "threads": torch.get_num_threads(),
        "device": str(example_b1.device),
        "input_dtype": str(example_b1.dtype).removeprefix("torch."),
        "dtypes": tensor_dtypes(model),
    } for name, model in models.items()}


def tensor_dtypes(model: nn.Module) -> list[str]:
    """The distinct dtypes of a model's parameters and buffers (e.g. ``["float32", "int8"]``);
    scalar buffers (BatchNorm's ``num_batches_tracked`` counter) are not model data and are left out."""
    return sorted({str(t.dtype).removeprefix("torch.")
                   for t in itertools.chain(model.parameters(), model.buffers()) if t.dim() > 0})


def profile(model: nn.Module, example_b1: torch.Tensor, example_bn: torch.Tensor, warmup: int = 10,
            iters: int = 50) -> dict:
    """:func:`profile_many` of one model (one round of timed calls)."""
    return profile_many({"model": model}, example_b1, example_bn, warmup, iters, rounds=1)["model"]
