"""Feature taps (forward hooks at module paths) and the adapters between student and teacher features.

A tap is written in config as a module path from ``model.named_modules()``
(``layer3``, ``features.3``), optionally suffixed ``:in`` to capture the module's
input instead of its output (``fc:in`` is the penultimate embedding of a ResNet).
Two special taps are resolved per model by a probe forward, so one config works
for every architecture:

* ``auto`` — the last feature map: the output of the last module (in execution
  order) whose output has spatial dimensions larger than 1, i.e. the map right
  before global pooling / flattening (ConvNet: ``features``; LeNet-5: ``features.5``;
  CNN1D: ``features``; CIFAR ResNet: ``layer3``; WRN: ``relu``; VGG: ``layer5``).
  A model without feature maps (MLP) falls back to ``embedding``.
* ``embedding`` — the input of the final classifier layer (the leaf module producing
  the logits; else the last ``nn.Linear`` run): the pooled, flattened representation
  that PKT, RKD and CRD use (RepDistiller's ``feat[-1]``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

SPECIAL_TAPS = ("auto", "embedding")


def module_names(model: nn.Module) -> list[str]:
    """Every non-root module path of ``model``, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def describe_module_names(model: nn.Module, limit: int = 80) -> str:
    """The valid tap names of ``model`` for an error message (shortened for very deep models)."""
    names = module_names(model)
    if len(names) <= limit:
        shown = names
        more = ""
    else:
        shown = [n for n in names if n.count(".") <= 1][:limit]
        more = f" ... ({len(names)} paths in all; deeper ones such as {names[-1]!r} are valid too)"
    return ", ".join(shown) + more


def split_tap(tap: str) -> tuple[str, str]:
    """``"layer3"`` -> ``("layer3", "out")``; ``"fc:in"`` -> ``("fc", "in")``."""
    path, _, kind = str(tap).partition(":")
    kind = kind or "out"
    if kind not in ("in", "out"):
        raise ConfigError(f"tap {tap!r}: the suffix must be ':in' or ':out'")
    return path, kind


def validate_taps(model: nn.Module, taps: Sequence[str], role: str) -> None:
    """Fail with the list of valid module names when a tap names no module of ``model``."""
    modules = dict(model.named_modules())
    for tap in taps:
        if tap in SPECIAL_TAPS:
            continue
        path, _ = split_tap(tap)
        if not path or path not in modules:
            raise ConfigError(
                f"{role} tap {tap!r} is not a module of the {role} ({type(model).__name__}). "
                f"Use 'auto' (last feature map), 'embedding' (classifier input), or one of: "
                f"{describe_module_names(model)}"
            )


class _StopForward(Exception):
    """Raised by a capture hook to cut a forward short once every tap is captured."""


@contextmanager
def capture(model: nn.Module, taps: Sequence[str], stop_when_done: bool = False) -> Iterator[dict]:
    """Within the block, forwards of ``model`` store the tapped tensors in the yielded dict.

    Captured tensors are cloned, so later in-place ops (``ReLU(inplace=True)``) cannot
    change them. If a module runs several times in one forward the last call wins. With
    ``stop_when_done`` the forward raises :class:`_StopForward` once all taps are captured
    (use :func:`run_until_captured`).
    """
    feats: dict[str, torch.Tensor] = {}
    if not taps:
        yield feats
        return
    modules = dict(model.named_modules())
    wanted = set(taps)
    handles = []

    def store(tap, tensor):
        feats[tap] = tensor.clone()
        if stop_when_done and wanted <= feats.keys():
            raise _StopForward

    for tap in dict.fromkeys(taps):
        path, kind = split_tap(tap)
        module = modules[path]
        if kind == "out":
            handles.append(module.register_forward_hook(lambda m, i, o, tap=tap: store(tap, o)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, i, tap=tap: store(tap, i[0])))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def run_until_captured(model: nn.Module, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` only as far as needed to capture ``taps``."""
    with capture(model, taps, stop_when_done=True) as feats:
        try:
            model(x)
        except _StopForward:
            pass
    missing = [t for t in taps if t not in feats]
    if missing:
        raise RuntimeError(f"taps {missing} were not reached by the forward pass")
    return feats


@dataclass
class ProbeResult:
    """What one probe forward learnt about a model: shapes at every module and execution order."""

    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("pre"|"post", name) in order
    auto: str | None = None
    embedding: str | None = None

    def shape(self, tap: str) -> tuple[int, ...]:
        """Per-sample shape (no batch dim) of a resolved tap."""
        path, kind = split_tap(tap)
        table = self.out_shapes if kind == "out" else self.in_shapes
        if path not in table:
            raise ConfigError(f"tap {tap!r} did not run in the forward pass (or gave no tensor)")
        return table[path]

    def resolve(self, tap: str) -> str:
        """Concrete module path for a special tap name; other names unchanged."""
        if tap == "auto":
            return self.auto or self.resolve("embedding")
        if tap == "embedding":
            if self.embedding is None:
                raise ConfigError("cannot find the classifier layer for tap 'embedding'; name the tap explicitly")
            return self.embedding
        return tap

    def modules_run_before(self, tap: str) -> list[str]:
        """Modules whose forward finished before ``tap`` is captured."""
        path, kind = split_tap(tap)
        marker = ("post", path) if kind == "out" else ("pre", path)
        done = []
        for event in self.events:
            if event == marker:
                if kind == "out":
                    done.append(path)
                break
            if event[0] == "post":
                done.append(event[1])
        return done


@torch.no_grad()
def probe(model: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> ProbeResult:
    """One eval-mode forward on zeros recording every module's input/output shape."""
    result = ProbeResult()
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    leaves = {name for name, m in model.named_modules() if name and not any(True for _ in m.children())}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(m, args, name=name):
            result.events.append(("pre", name))
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0]
                result.in_shapes[name] = tuple(args[0].shape[1:])

        def post(m, args, out, name=name):
            result.events.append(("post", name))
            if isinstance(out, torch.Tensor):
                outputs[name] = out
                result.out_shapes[name] = tuple(out.shape[1:])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        final = model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    order = [name for kind, name in result.events if kind == "post"]
    for name in order:
        shape = result.out_shapes.get(name)
        if shape is not None and len(shape) >= 2 and math.prod(shape[1:]) > 1:
            result.auto = name
    producers = [n for n in order if n in leaves and outputs.get(n) is final and n in result.in_shapes]
    if producers:
        result.embedding = f"{producers[-1]}:in"
    else:
        modules = dict(model.named_modules())
        linears = [n for n in order if isinstance(modules[n], nn.Linear) and n in result.in_shapes]
        if linears:
            result.embedding = f"{linears[-1]}:in"
    return result


class FeatureAdapter(nn.Module):
    """Learnable map from a student feature shape to a teacher feature shape (FitNets' regressor).

    * maps with the same number of spatial dims: 1×1 convolution + BatchNorm over channels,
      then the spatial size is matched — bilinear (linear for 1-D) interpolation when the
      student map is smaller, adaptive average pooling when it is larger;
    * vectors: a linear layer;
    * anything else (vector → map, 1-D map → 2-D map, ...): flatten + linear, reshaped
      to the teacher's shape.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and 2 <= len(s) <= 4:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(s) - 1]
            bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(s) - 1]
            self.kind = "conv"
            self.proj = nn.Sequential(conv(s[0], t[0], kernel_size=1, bias=False), bn(t[0]))
        elif len(s) == 1 and len(t) == 1:
            self.kind = "linear"
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.kind = "flat"
            self.proj = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "flat":
            return self.proj(x.flatten(1)).view(x.shape[0], *self.teacher_shape)
        y = self.proj(x)
        size = self.teacher_shape[1:]
        if tuple(y.shape[2:]) == size:
            return y
        if math.prod(y.shape[2:]) > math.prod(size):
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
            return pool(y, size)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(y, size=size, mode=mode, align_corners=False)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], mode: str) -> nn.Module:
    """``auto``: an adapter only when the shapes differ; ``always``: always one; ``none``: never
    (differing shapes are then an error)."""
    same = tuple(student_shape) == tuple(teacher_shape)
    if mode == "always" or (mode == "auto" and not same):
        return FeatureAdapter(student_shape, teacher_shape)
    if mode in ("auto", "none"):
        if not same:
            raise ConfigError(
                f"student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} differ "
                "but adapter=none; set adapter=auto")
        return nn.Identity()
    raise ConfigError(f"adapter must be one of auto, always, none; got {mode!r}")
