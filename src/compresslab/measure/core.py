"""Measurement rules (DESIGN.md): latency from :mod:`compresslab.measure.latency` (interleaved
rounds, median/p90/IQR, ratio intervals, noise gate, threads and clock recorded); size = bytes
of the saved artifact; MACs counted by torch's FlopCounterMode (MACs = FLOPs / 2 for
conv/linear/matmul); weight bytes = what a forward pass reads as weights."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compresslab.data.regime import token_rows
from compresslab.measure.lm import decode_contenders, decode_references, is_causal_lm, lm_speed_figures
from compresslab.measure.latency import LatencySettings, measure_latencies, summarize, time_interleaved


def count_params(model: nn.Module) -> dict:
    """Parameters, nonzero parameters and the sparsity of the whole model (buffers excluded)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        t = p.detach()
        if _is_wrapper(t):  # a quantized tensor subclass (torchao weight-only): its values
            t = t.dequantize()
        nonzero += int(torch.count_nonzero(t))
    return {"params": total, "params_nonzero": nonzero, "sparsity": 1.0 - nonzero / total if total else 0.0}


#: torch's flop counter knows the fused attention kernels of CUDA but not the CPU one that
#: ``F.scaled_dot_product_attention`` runs here (the q·kᵀ and attention·v products of a ViT)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (per the batch given)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        model(example)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def interleaved_latency(models: Mapping[str, nn.Module], example: torch.Tensor, warmup: int = 10,
                        rounds: int = 5, round_ms: float = 20.0, clock: str = "wall") -> dict[str, dict]:
    """Latency in ms (median, p90 and IQR of the timed blocks) of several models on one input,
    measured in turn with :mod:`compresslab.measure.latency`'s engine: after every model's
    warm-up, ``rounds`` rounds in which each model is timed for ``round_ms``, the order
    rotating every round, at the current thread count."""
    settings = LatencySettings(warmup=warmup, rounds=rounds, round_ms=round_ms, clock=clock,
                               threads_b1=None, threads_bN=None)
    timed = time_interleaved(models, example, settings, threads=None)
    return {name: summarize(t) for name, t in timed.items()}


def measure_latency(model: nn.Module, example: torch.Tensor, warmup: int = 10, rounds: int = 5,
                    round_ms: float = 20.0) -> dict:
    """Latency of ``model(example)`` in ms: median, p90 and IQR of its timed blocks."""
    return interleaved_latency({"model": model}, example, warmup, rounds, round_ms)["model"]


@torch.no_grad()
def mean_call_ms(model: nn.Module, example: torch.Tensor, calls: int) -> float:
    """Mean ms per call of ``calls`` calls of ``model(example)`` (``Timer.timeit``, current threads);
    for benchmarks that take their own median over repeated rounds."""
    timer = Timer(stmt="model(x)", globals={"model": model.eval(), "x": example}, num_threads=torch.get_num_threads())
    return timer.timeit(max(1, int(calls))).mean * 1e3


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` over (x, y) batches, in eval mode (a causal LM's: per token)."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        logits, y = token_rows(model(x.to(device)), y)
        pred = logits.argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
    return correct / total if total else float("nan")


def file_size(path: Path) -> int:
    """Bytes on disk."""
    return Path(path).stat().st_size


def static_profile(model: nn.Module, example_b1: torch.Tensor) -> dict:
    """What a model is, independent of the clock: params/sparsity, MACs at batch 1, the bytes of
    weights a forward pass reads, dtypes."""
    return {
        **count_params(model),
        "macs": count_macs(model, example_b1),
        "weight_bytes": weight_bytes(model),
        "device": str(example_b1.device),
        "input_dtype": str(example_b1.dtype).removeprefix("torch."),
        "dtypes": tensor_dtypes(model),
    }


def profile_many(
    models: Mapping[str, nn.Module],
    example_b1: torch.Tensor,
    example_bn: torch.Tensor,
    settings: LatencySettings | None = None,
    latency: bool = True,
    backends: Mapping[str, Mapping[str, Callable]] | None = None,
) -> dict[str, dict]:
    """:func:`static_profile` of each model plus, unless ``latency`` is off (``measure.defer``),
    its latency at batch 1 and batch N from :func:`~compresslab.measure.latency.measure_latencies`
    (interleaved; speed-ups with intervals relative to ``"reference"``; the noise gate's verdict
    as ``latency_reliable`` / ``latency_unreliable_reason`` on every row). ``backends``
    (``{backend: {name: callable}}``, e.g. ONNX Runtime sessions) are timed in the same rounds and
    nested under each row's ``backends`` (:func:`compresslab.measure.backends.attach`). A causal LM also
    has its decode step timed in the same rounds and its LM speed keys (:mod:`compresslab.measure.lm`)."""
    settings = settings or LatencySettings()
    rows = {name: static_profile(model, example_b1) for name, model in models.items()}
    if not latency:
        for row in rows.values():
            row["latency_deferred"] = True
        return rows
    contenders, references = models, None
    if backends:
        from compresslab.measure.backends import contenders as with_backends

        contenders, references = with_backends(models, backends)
    decoders = decode_contenders(models, example_b1, example_bn)  # causal LMs: decode through the KV cache
    if decoders:
        references = {**(references or {n: "reference" for n in models if "reference" in models}),
                      **decode_references(decoders)}
        contenders = {**contenders, **decoders}
    result = measure_latencies(contenders, example_b1, example_bn, settings, references)
    gate = result["gate"]
    for name, row in rows.items():
        row.update(result["models"][name])
        row.update(latency_batch=int(example_bn.shape[0]), latency_rounds=int(settings.rounds),
                   latency_clock=gate["clock"], threads=gate["threads_bN"], threads_b1=gate["threads_b1"],
                   threads_bN=gate["threads_bN"], latency_reliable=gate["reliable"],
                   latency_unreliable_reason=gate["reason"], latency_unreliable_short=gate["short_reason"],
                   latency_load=gate["load"],
                   latency_self_check=gate["self_check"])
        if is_causal_lm(models[name]):
            row.update(lm_speed_figures(result["models"], name, example_b1, example_bn))
    if backends:
        from compresslab.measure.backends import attach

        attach(rows, result, backends)
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a forward pass reads as weights: parameters and buffers (a packed or
    quantized model counts its stored dtype), scalar counters excluded."""
    seen, total = set(), 0
    tensors = itertools.chain(model.parameters(), model.buffers(), _graph_constants(model))
    for t in itertools.chain.from_iterable(_inner_tensors(t) for t in tensors):
        if t.dim() > 0 and id(t) not in seen:
            seen.add(id(t))
            try:
                total += t.numel() * t.element_size()
            except RuntimeError:  # opaque prepacked tensor
                continue
    return total


def _graph_constants(model: nn.Module) -> list[torch.Tensor]:
    """Tensor attributes of an fx graph module that are neither parameters nor buffers (PT2E int8)."""
    return [v for v in vars(model).values() if isinstance(v, torch.Tensor)]


def tensor_dtypes(model: nn.Module) -> list[str]:
    """The distinct dtypes of a model's parameters and buffers (e.g. ``["float32", "int8"]``);
    scalar buffers (BatchNorm's ``num_batches_tracked`` counter) are not model data and are left out."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sorted({str(t.dtype).removeprefix("torch.")
                   for t in itertools.chain.from_iterable(_inner_tensors(t) for t in tensors) if t.dim() > 0})


def _is_wrapper(t: torch.Tensor) -> bool:
    """Whether ``t`` is a wrapper tensor subclass (``__tensor_flatten__``), not a plain tensor/parameter."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(type(t), "__tensor_flatten__")


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or the inner tensors of a wrapper
    subclass (``__tensor_flatten__``: torchao's quantized weights hold int8 codes and scales)."""
    if not _is_wrapper(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in _inner_tensors(getattr(t, n))]


def profile(model: nn.Module, example_b1: torch.Tensor, example_bn: torch.Tensor,
            settings: LatencySettings | None = None) -> dict:
    """:func:`profile_many` of one model."""
    return profile_many({"model": model}, example_b1, example_bn, settings)["model"]
