"""Language-model figures: perplexity and next-token accuracy, and speed as an LM user reads it.

**Perplexity** (:func:`lm_quality`): ``exp`` of the mean next-token negative log-likelihood over every
target token of the test split (token-weighted: a batch counts by its tokens, not as one mean). The
split is cut into non-overlapping windows of ``block_size`` tokens (stride = block size), so a token
is predicted from the 0 to ``block_size - 1`` tokens before it in its window; results.json states it
(``perplexity_stride``, ``perplexity_tokens``). ``acc_top1`` is the share of tokens whose most likely
next token is the right one.

**Speed** (:func:`decode_contenders`, :func:`lm_speed_figures`): the interleaved engine of
:mod:`compresslab.measure.latency` times ``model(example)`` at batch 1 and N, which for an LM is a
prefill of ``block_size`` tokens per sequence, so ``prefill_tokens_per_s_b1/bN = B · T / latency``. In
the same rounds it times a :class:`DecodeStep` per LM: one new token per sequence through the KV cache
of a prefilled prompt of ``T/2`` tokens (the cache is trimmed back after each call, so every call
decodes at the same context); its latency is ``decode_ms_per_token_b1/bN`` and it is part of the
noise gate like every timed model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: the suffix of an LM's decode timing among the engine's contenders
DECODE_SUFFIX = "#decode"


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a :class:`~compresslab.models.lm.CausalLM` (or anything marked as one)."""
    return bool(getattr(model, "is_causal_lm", False))


@torch.no_grad()
def lm_quality(model: nn.Module, batches: Iterable, block_size: int) -> dict[str, float]:
    """Token-weighted perplexity, mean NLL (nats/token) and next-token accuracy over ``(x, y)`` batches."""
    model.eval()
    nll, correct, tokens = 0.0, 0, 0
    for x, y in batches:
        logits = model(x).float()
        flat, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1).to(logits.device)
        nll += float(F.cross_entropy(flat, target, reduction="sum"))
        correct += int((flat.argmax(1) == target).sum())
        tokens += int(target.numel())
    mean = nll / tokens if tokens else float("nan")
    return {"perplexity": math.exp(mean) if tokens else float("nan"), "nll_per_token": mean,
            "acc_top1": correct / tokens if tokens else float("nan"), "perplexity_tokens": tokens,
            "perplexity_stride": int(block_size), "perplexity_window": int(block_size)}


class DecodeStep:
    """``call(example)``: decode one token per sequence with the KV cache of the example's first ``T/2``
    tokens (prefilled once per batch size, outside the timing), then trim the cache back by one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state: dict[int, tuple[Any, torch.Tensor]] = {}

    def prepare(self, example: torch.Tensor) -> None:
        """Prefill the prompt of ``example``'s batch size (called before timing)."""
        context = max(1, example.shape[1] // 2)
        with torch.no_grad():
            _, cache = self.model.prefill(example[:, :context])
        self._state[int(example.shape[0])] = (cache, example[:, context:context + 1].contiguous())

    def __call__(self, example: torch.Tensor) -> torch.Tensor:
        batch = int(example.shape[0])
        if batch not in self._state:
            self.prepare(example)
        cache, token = self._state[batch]
        logits = self.model.decode_step(token, cache)
        cache.crop(-1)
        return logits


def decode_contenders(models: Mapping[str, Any], example_b1: torch.Tensor, example_bn: torch.Tensor) -> dict[str, DecodeStep]:
    """A prepared :class:`DecodeStep` for every causal LM among ``models``, named ``<name>#decode``."""
    out = {}
    for name, model in models.items():
        if is_causal_lm(model) and hasattr(model, "decode_step"):
            step = DecodeStep(model.eval())
            step.prepare(example_b1)
            step.prepare(example_bn)
            out[name + DECODE_SUFFIX] = step
    return out


def decode_references(decoders: Mapping[str, Any]) -> dict[str, str]:
    """Each decode contender's speed-up reference: the reference's decode step."""
    ref = "reference" + DECODE_SUFFIX
    return {name: ref for name in decoders if ref in decoders}


def lm_speed_figures(figures: Mapping[str, Mapping[str, Any]], name: str, example_b1: torch.Tensor,
                     example_bn: torch.Tensor) -> dict[str, Any]:
    """The LM speed keys of model ``name`` from the engine's figures (module docstring)."""
    own, decode = figures[name], figures.get(name + DECODE_SUFFIX)
    t, n = int(example_b1.shape[1]), int(example_bn.shape[0])
    out = {"prefill_tokens": t, "prefill_tokens_per_s_b1": 1e3 * t / own["latency_ms_b1"],
           "prefill_tokens_per_s_bN": 1e3 * n * t / own["latency_ms_bN"]}
    if decode is not None:
        out.update(decode_context=max(1, t // 2), decode_ms_per_token_b1=decode["latency_ms_b1"],
                   decode_ms_per_token_bN=decode["latency_ms_bN"], decode_ms_per_token_b1_iqr=decode["latency_ms_b1_iqr"],
                   decode_ms_per_token_bN_iqr=decode["latency_ms_bN_iqr"])
        if "speedup_b1" in decode:
            out.update(decode_speedup_b1=decode["speedup_b1"], decode_speedup_b1_ci=decode["speedup_b1_ci"],
                       decode_speedup=decode["speedup"], decode_speedup_ci=decode["speedup_ci"])
    return out
