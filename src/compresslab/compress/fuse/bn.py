"""Layer fusion, ``fuse=bn``: fold each BatchNorm into the convolution (or linear layer) before it.

At inference a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution
with weights ``W * gamma / sqrt(var + eps)`` (per output channel) and bias
``(b - mean) * gamma / sqrt(var + eps) + beta`` (Jacob et al. 2018, Sec. 3.2; every inference
runtime does it). The folding itself is torch's ``torch.nn.utils.fusion.fuse_conv_bn_eval`` /
``fuse_linear_bn_eval``; this module finds the pairs and keeps the artifact loadable.

Which pairs: the model is traced with ``torch.export``; a conv/linear node is folded into the
BatchNorm node that is its *only* user, both being module calls (``nn_module_stack``), each
module called once. Anything else (a conv output also used elsewhere, a BN after an add) stays.

Artifact ``compresslab.fused/1`` (:mod:`compresslab.compress.codecs.fuse_bn`): the arch spec, the
folded ``[layer, bn]`` module paths and the state dict.

Scope: a plain fp32 student (``prune``/``lowrank``/``quant`` = none; distillation is fine). The int8
paths fold BN themselves (PT2E's ``prepare_pt2e``), the other artifact formats keep their own
layouts, and ONNX Runtime folds BatchNorm of any exported graph on its own (docs/deployment.md).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.fuse_bn import BATCHNORMS as _BNS
from compresslab.compress.codecs.fuse_bn import LAYERS as _LAYERS
from compresslab.compress.codecs.fuse_bn import fused_payload
from compresslab.compress.common import set_module
from compresslab.config_schema import NoOptions
from compresslab.errors import ConfigError
_LAYER_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default",
              "aten.convolution.default")
_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
           "aten.native_batch_norm.default", "aten._native_batch_norm_legit_functional.default")


def _module_of(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    return fqn.removeprefix("L__self__.").replace("L__self___", "")


def foldable_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(layer path, bn path)`` pairs of ``model`` whose BatchNorm can be folded (see module doc)."""
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    try:
        gm = torch.export.export(model, (example,), strict=False).graph_module
    except Exception as exc:  # noqa: BLE001 - a clear error instead of a trace
        raise ConfigError(f"fuse=bn: torch.export cannot trace the student ({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was_training)
    calls: dict[str, int] = {}
    candidates = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        name = _module_of(node)
        if target in _LAYER_OPS + _BN_OPS and name is not None:
            calls[name] = calls.get(name, 0) + 1
        if target in _LAYER_OPS and len(node.users) == 1:
            user = next(iter(node.users))
            if str(user.target) in _BN_OPS and user.args[0] is node:
                candidates.append((name, _module_of(user)))
    pairs = []
    for layer, bn in candidates:
        if (layer in modules and bn in modules and isinstance(modules[layer], _LAYERS)
                and isinstance(modules[bn], _BNS) and calls.get(layer) == 1 and calls.get(bn) == 1
                and modules[bn].track_running_stats and modules[bn].running_mean is not None):
            pairs.append((layer, bn))
    return pairs


@torch.no_grad()
def fold_bn(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (eval mode) with every foldable BatchNorm folded; returns (model, pairs)."""
    fused = copy.deepcopy(model).eval()
    pairs = foldable_pairs(fused, example)
    for layer, bn in pairs:
        conv, norm = fused.get_submodule(layer), fused.get_submodule(bn)
        folded = fuse_linear_bn_eval(conv, norm) if isinstance(conv, nn.Linear) else fuse_conv_bn_eval(conv, norm)
        set_module(fused, layer, folded)
        set_module(fused, bn, nn.Identity())
    return fused, pairs


class FuseBN(CompressionMethod):
    """``fuse=bn``: fold BatchNorm into the preceding conv/linear after training (see module doc)."""

    options = NoOptions

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.pairs: list[tuple[str, str]] = []
        self._report: dict[str, Any] = {}

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        example = datamodule.example_batch(8).cpu()
        student = student.cpu().eval()
        fused, self.pairs = fold_bn(student, example)
        with torch.no_grad():
            before, after = student(example), fused(example)
        params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        self._report = {  # the option's name is axes.fuse; this block is student.fuse
            "fuse_bn_folded": len(self.pairs),
            "fuse_bn_left": sum(isinstance(m, _BNS) for m in fused.modules()),
            "fuse_params_before": params(student),
            "fuse_params_after": params(fused),
            "fuse_max_abs_diff": float((before - after).abs().max()),
        }
        return fused

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        return fused_payload(student, self.pairs, context, {"fuse": self.name})

    def report(self) -> dict[str, Any]:
        return dict(self._report)


def check_fuse_combination(cfg) -> None:
    """``fuse=bn`` folds a plain fp32 student; refuse the combinations whose artifact formats it would break."""
    fuse = cfg.get("fuse")
    if fuse is None or fuse.get("name", "none") == "none":
        return
    others = [f"{axis}={cfg[axis].name}" for axis in ("lowrank", "prune", "quant")
              if cfg.get(axis) is not None and cfg[axis].get("name", "none") != "none"]
    if others:
        raise ConfigError(
            f"fuse={fuse.name} folds BatchNorm in a plain fp32 student and cannot combine with {', '.join(others)}: "
            "the int8 methods fold BatchNorm themselves (PT2E), and the pruned/low-rank/low-bit artifacts keep "
            "their own layouts (ONNX Runtime folds BatchNorm of any exported artifact on its own).")
