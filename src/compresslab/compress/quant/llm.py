"""One-shot post-training quantization of the Linear layers of any model (LLM-style), after training:

- ``quant=rtn``: round-to-nearest weight-only, ``bits`` 2..8, ``group_size``, symmetric or not
  (the baseline of GPTQ and AWQ);
- ``quant=gptq``: GPTQ (Frantar et al., ICLR 2023): each column quantized in turn and its error
  spread over the later columns through the Cholesky factor of the inverse Hessian ``2XᵀX/n``
  of the layer's calibration inputs (:func:`~compresslab.compress.quant.grid.gptq`);
- ``quant=awq``: AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024):
  per-input-channel scales ``s = mean|x|^α`` (normalised by ``sqrt(max·min)``), ``α`` searched on
  ``k / n_grid`` to minimise the output error of the Linears sharing that input, then RTN of
  ``W·diag(s)``; ``1/s`` folded into the preceding norm where exact (:mod:`.smoothing`). The
  paper measures the error at the block output and also searches a weight clipping range; this
  measures it at the Linears' own outputs (exactly, from ``XᵀX``) and does not clip;
- ``quant=smoothquant``: SmoothQuant (Xiao et al., ICML 2023), W8A8: ``s_j = max|X_j|^α /
  max|W_j|^(1-α)`` moves activation outliers into the weights, then int8 symmetric per-output-
  channel weights and dynamic per-token int8 activations (torchao's ``Int8Tensor``: a real int8
  matmul on CPU, not a simulation).

Written here (not llm-compressor, which pins torch 2.14.0 / transformers<=5.17 while this project
runs torch 2.14.1). Calibration goes through :mod:`compresslab.compress.calibration`: the Linears'
inputs are captured with forward hooks group by group (layers reading one tensor), each group with
the groups before it already quantized. Only ``nn.Linear`` layers are quantized (embeddings never;
the output layer / ``lm_head`` only with ``include_classifier=true``). The quantized Linears carry
torchao tensors built from the stored codes, as in the artifact (:mod:`..codecs.packed_int`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.calibration import InputStats, calibration_batches, sequential
from compresslab.compress.codecs.packed_int import attach, encode_layer, packed_int_payload, summary
from compresslab.compress.common import select_layers
from compresslab.compress.quant import grid
from compresslab.compress.quant.options import AWQOptions, GPTQOptions, LLMQuantOptions, SmoothQuantOptions
from compresslab.compress.quant.smoothing import fold_smoothing
from compresslab.compress.structure import rebuildable_from_spec, structure_of
from compresslab.errors import ConfigError


class RTNQuant(CompressionMethod):
    """``quant=rtn``, and the shared body of GPTQ / AWQ / SmoothQuant (see the module docstring).

    ``bits`` 2..8; ``group_size`` input weights per fp16 scale (null: one per output channel);
    ``symmetric``; ``include_classifier``; ``exclude`` name patterns; ``num_calibration_batches`` /
    ``calibration_split``: the calibration set (RTN uses it only to report the output error).
    """

    options = LLMQuantOptions
    codec_kind = "packed_int"
    act = "none"

    def __init__(self, name: str, bits: int = 4, group_size: int | None = None, symmetric: bool = True,
                 include_classifier: bool = False, exclude: Sequence[str] = (), num_calibration_batches: int = 16,
                 calibration_split: str = "train") -> None:
        super().__init__(name)
        self.bits, self.group_size, self.symmetric = int(bits), group_size, bool(symmetric)
        self.include_classifier, self.exclude = bool(include_classifier), list(exclude or [])
        self.num_calibration_batches, self.calibration_split = int(num_calibration_batches), calibration_split
        self._records: dict[str, dict] = {}
        self._report: dict[str, Any] = {}
        self._errors = {"method": 0.0, "rtn": 0.0}
        self._folded: dict[str, str | None] = {}
        self._example: torch.Tensor | None = None
        self._rows = 0

    def select(self, model: nn.Module) -> list[str]:
        """The Linear layers quantized, in module order."""
        return list(select_layers(model, self.exclude, types=(nn.Linear,), include_classifier=self.include_classifier))

    def group_of(self, module: nn.Linear) -> int:
        return module.in_features if self.group_size is None else int(self.group_size)

    def validate_student(self, student: nn.Module, datamodule) -> None:
        names = self.select(student)
        if not names:
            raise ConfigError(f"quant={self.name}: the student has no selected nn.Linear layer (exclude={self.exclude}, "
                              f"include_classifier={self.include_classifier})")
        if self.group_size is not None:
            bad = {n: student.get_submodule(n).in_features for n in names
                   if student.get_submodule(n).in_features % int(self.group_size)}
            if bad:
                widths = sorted(set(bad.values()))
                raise ConfigError(f"quant.group_size={self.group_size} does not divide the input width of "
                                  f"{list(bad)[:4]} (in_features {widths}); choose a common divisor "
                                  f"(gcd {math.gcd(*widths, int(self.group_size))}), null for one scale per output "
                                  "channel, or leave those layers out with quant.exclude")

    def quantize(self, w: torch.Tensor, stats: InputStats, group: int) -> grid.Quantized:
        """The quantized weight of one Linear (RTN here; GPTQ overrides it)."""
        return grid.rtn(w, self.bits, group, self.symmetric)

    def transform_group(self, model: nn.Module, group: list[str], stats: Mapping[str, InputStats]) -> None:
        """Quantize one group of Linears reading the same input, and attach their torchao weights."""
        for name in group:
            self._quantize_layer(model, name, stats[name])

    def _quantize_layer(self, model: nn.Module, name: str, st: InputStats, smooth: torch.Tensor | None = None,
                        folded: bool = True) -> None:
        """Quantize Linear ``name`` (its columns already multiplied by ``smooth``, whose inverse is
        folded upstream or, when not ``folded``, applied to its input at run time) and record its
        output error and RTN's on the original weight, both on the original inputs."""
        module = model.get_submodule(name)
        w = module.weight.detach().float()
        q = self.quantize(w, st, self.group_of(module))
        unsmooth = 1.0 if smooth is None else smooth.unsqueeze(0)
        original = w / unsmooth
        self._errors["method"] += grid.output_error(q.dequantize() / unsmooth - original, st.xtx)
        rtn = grid.rtn(original, self.bits, self.group_of(module), self.symmetric)
        self._errors["rtn"] += grid.output_error(rtn.dequantize() - original, st.xtx)
        input_scale = None if smooth is None or folded else 1 / smooth
        self._records[name] = encode_layer(q, input_scale, self.act)
        attach(module, q, self.act, input_scale)
        self._rows = max(self._rows, st.count)

    @torch.no_grad()
    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        student = student.cpu().eval()
        names = self.select(student)
        fp32 = sum(student.get_submodule(n).weight.numel() * 4 for n in names)
        batches = calibration_batches(datamodule, self.num_calibration_batches, self.calibration_split)
        self._example = batches[0][:2] if batches else None
        start = time.perf_counter()
        groups = sequential(student, names, batches, lambda g, st: self.transform_group(student, g, st))
        self._report = {"quant_method": self.name, "bits": self.bits, "group_size": self.group_size,
                        "symmetric": self.symmetric, "layers": list(self._records), "groups": len(groups),
                        "not_called": [n for n in names if n not in self._records],
                        "calibration_batches": len(batches), "calibration_rows": self._rows,
                        "quantize_time_s": time.perf_counter() - start,
                        "layer_output_error": self._errors["method"], "rtn_layer_output_error": self._errors["rtn"],
                        "output_error_vs_rtn": self._errors["method"] / max(self._errors["rtn"], 1e-30),
                        "kernel": "torchao IntxUnpackedToInt8Tensor (dequantize + fp32 matmul on CPU)",
                        **summary(self._records, fp32), **self.extra_report()}
        return student

    def extra_report(self) -> dict[str, Any]:
        return {}

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        structure = structure_of(student, context)
        if not rebuildable_from_spec(student, {**context, "structure": structure}):
            raise ConfigError(f"quant={self.name}: the student's modules no longer match its arch spec (another "
                              "method changed the structure); the packed_int artifact is saved as spec + weights")
        return packed_int_payload(student, context, self._records, structure,
                                  meta={"quant": self.name, "bits": self.bits, "group_size": self.group_size})

    def report(self) -> dict[str, Any]:
        return dict(self._report)


class GPTQQuant(RTNQuant):
    """``quant=gptq`` (Frantar et al. 2023): ``damp``, ``act_order``, ``block_size`` plus RTN's options."""

    options = GPTQOptions

    def __init__(self, name: str, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                 **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.damp, self.act_order, self.block_size = float(damp), bool(act_order), int(block_size)

    def quantize(self, w: torch.Tensor, stats: InputStats, group: int) -> grid.Quantized:
        return grid.gptq(w, stats.hessian, self.bits, group, self.symmetric, self.damp, self.act_order,
                         self.block_size)

    def extra_report(self) -> dict[str, Any]:
        return {"damp": self.damp, "act_order": self.act_order, "block_size": self.block_size}


class AWQQuant(RTNQuant):
    """``quant=awq`` (Lin et al. 2024): ``n_grid`` exponents searched, plus RTN's options."""

    options = AWQOptions

    def __init__(self, name: str, n_grid: int = 20, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.n_grid = int(n_grid)
        self.alphas: dict[str, float] = {}

    def search(self, model: nn.Module, group: list[str], st: InputStats) -> tuple[float, torch.Tensor]:
        """The ``(α, s)`` of the grid with the least summed output error of the group's Linears."""
        mean = st.abs_mean.float().clamp(min=1e-8)
        best = (math.inf, 0.0, torch.ones_like(mean))
        for k in range(self.n_grid):
            s = awq_scale(mean, k / self.n_grid)
            err = 0.0
            for name in group:
                w = model.get_submodule(name).weight.detach().float()
                q = grid.rtn(w * s, self.bits, self.group_of(model.get_submodule(name)), self.symmetric)
                err += grid.output_error(q.dequantize() / s - w, st.xtx)
            if err < best[0]:
                best = (err, k / self.n_grid, s)
        return best[1], best[2]

    def transform_group(self, model: nn.Module, group: list[str], stats: Mapping[str, InputStats]) -> None:
        st = stats[group[0]]
        alpha, s = self.search(model, group, st)
        self.alphas[group[0]] = alpha
        folded = fold_smoothing(model, group, s, self._example)
        self._folded[group[0]] = folded
        for name in group:
            self._quantize_layer(model, name, st, s, folded is not None)

    def extra_report(self) -> dict[str, Any]:
        return {"n_grid": self.n_grid, "alpha_per_group": dict(self.alphas),
                "folded_into": {k: v for k, v in self._folded.items() if v},
                "runtime_input_scale": [k for k, v in self._folded.items() if not v]}


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scale ``s = mean|x|^α / sqrt(max(s)·min(s))`` (Lin et al. 2024, eq. 5)."""
    s = mean_abs.clamp(min=1e-8).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def smoothquant_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (Xiao et al. 2023, eq. 4); 1 where a
    channel is dead (zero activations or weights)."""
    s = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    ok = (act_max > 0) & (weight_max > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5)


class SmoothQuant(RTNQuant):
    """``quant=smoothquant`` (Xiao et al. 2023), W8A8 with migration strength ``alpha``."""

    options = SmoothQuantOptions
    act = "int8_dynamic_per_token"

    def __init__(self, name: str, alpha: float = 0.5, include_classifier: bool = False, exclude: Sequence[str] = (),
                 num_calibration_batches: int = 16, calibration_split: str = "train") -> None:
        super().__init__(name, bits=8, group_size=None, symmetric=True, include_classifier=include_classifier,
                         exclude=exclude, num_calibration_batches=num_calibration_batches,
                         calibration_split=calibration_split)
        self.alpha = float(alpha)

    def transform_group(self, model: nn.Module, group: list[str], stats: Mapping[str, InputStats]) -> None:
        st = stats[group[0]]
        wmax = torch.stack([model.get_submodule(n).weight.detach().float().abs().amax(0) for n in group]).amax(0)
        s = smoothquant_scale(st.abs_max.float(), wmax, self.alpha)
        folded = fold_smoothing(model, group, s, self._example)
        self._folded[group[0]] = folded
        for name in group:
            self._quantize_layer(model, name, st, s, folded is not None)

    def extra_report(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "activations": "int8 dynamic per token (symmetric)",
                "kernel": "torchao Int8Tensor: int8 x int8 matmul with dynamic per-token activation quantization",
                "folded_into": {k: v for k, v in self._folded.items() if v},
                "runtime_input_scale": [k for k, v in self._folded.items() if not v]}
