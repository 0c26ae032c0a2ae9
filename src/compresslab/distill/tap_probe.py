"""The probe forward that learns a model's shapes and execution order, and the special taps it resolves.

Taps are module paths (see :mod:`compresslab.distill.taps`). The special taps are resolved
per model by a probe forward, so one config works for every architecture:

* ``auto`` — the last feature map: the output of the last module (in execution
  order) whose output has spatial dimensions larger than 1, i.e. the map right
  before global pooling / flattening (ConvNet: ``features``; LeNet-5: ``features.5``;
  CNN1D: ``features``; CIFAR ResNet: ``layer3``; WRN: ``relu``; VGG: ``layer5``).
  A model without feature maps (MLP) falls back to ``embedding``.
* ``embedding`` — the input of the final classifier layer (the leaf module producing
  the logits; else the last ``nn.Linear`` run): the pooled, flattened representation
  that PKT, RKD and CRD use (RepDistiller's ``feat[-1]``).
* ``stages`` — expands to every stage output: the last module output at each spatial
  resolution (the maps right before each downsampling and before global pooling;
  CIFAR ResNets: ``layer1, layer2, layer3`` = RepDistiller's ``feat[1:-1]``).
* ``stages_preact`` — the same stages before their last ReLU: the input of the last
  ``nn.ReLU``/``nn.ReLU6`` that runs inside each stage at the stage's resolution
  (``layer3.2.relu:in`` on a ResNet: the block's sum before the activation, mdistiller's
  ``preact_feats``). Stages without such a ReLU are left out.

* ``sections`` — expands to two taps per resolution: the first module output at that
  resolution and the stage output (the first and the last layer of a section, FSP's pair).

``stages``/``stages_preact``/``sections`` must sit at the same position in a loss entry's
``student_layers`` and ``teacher_layers``; the two stage lists are paired by spatial size
(stages of a size the other network lacks are dropped; with no common size, the deepest
ones are paired, as mdistiller's ``_align_list``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from compresslab.distill.taps import EXPANDING_TAPS, split_tap
from compresslab.errors import ConfigError

__all__ = ["ProbeResult", "probe", "pair_stages", "expand_layers"]

RELU_TYPES = (nn.ReLU, nn.ReLU6)


@dataclass
class ProbeResult:
    """What one probe forward learnt about a model: shapes at every module and execution order."""

    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("pre"|"post", name) in order
    auto: str | None = None
    embedding: str | None = None
    types: dict[str, type] = field(default_factory=dict)  # module path -> class

    def calls_of(self, taps: Sequence[str]) -> dict[str, int]:
        """How often each tap's module runs in one forward (a reused ReLU runs several times)."""
        out = {}
        for tap in taps:
            path, kind = split_tap(tap)
            out[tap] = max(1, sum(1 for e in self.events if e == ("pre" if kind == "in" else "post", path)))
        return out

    def stage_list(self, preact: bool = False) -> list[tuple[str, tuple[int, ...]]]:
        """``[(tap, spatial size)]`` of the stage outputs (or their pre-activations), shallow first."""
        ends: list[tuple[int, str, tuple[int, ...]]] = []  # (event index, module, spatial)
        current = None
        for i, (kind, name) in enumerate(self.events):
            if kind != "post":
                continue
            shape = self.out_shapes.get(name)
            if shape is None or len(shape) < 2 or math.prod(shape[1:]) <= 1:
                continue
            if current is not None and tuple(shape[1:]) != current[2]:
                ends.append(current)
            current = (i, name, tuple(shape[1:]))
        if current is not None:
            ends.append(current)
        if not preact:
            return [(name, size) for _, name, size in ends]
        out, start = [], 0
        for end, name, size in ends:
            relus = [j for j in range(start, end + 1)
                     if self.events[j][0] == "pre" and issubclass(self.types.get(self.events[j][1], object), RELU_TYPES)
                     and tuple(self.in_shapes.get(self.events[j][1], ())[1:]) == size]
            if relus:
                out.append((f"{self.events[relus[-1]][1]}:in", size))
            start = end + 1
        return out

    def section_list(self) -> list[tuple[tuple[str, str], tuple[int, ...]]]:
        """``[((first, last), spatial size)]``: the first and the last module output of each run of
        equal spatial size (a section of the network), shallow first."""
        runs: list[list] = []
        for kind, name in self.events:
            if kind != "post":
                continue
            shape = self.out_shapes.get(name)
            if shape is None or len(shape) < 2 or math.prod(shape[1:]) <= 1:
                continue
            size = tuple(shape[1:])
            if runs and runs[-1][2] == size:
                runs[-1][1] = name
            else:
                runs.append([name, name, size])
        return [((first, last), size) for first, last, size in runs]

    def module_before(self, tap: str, kinds: tuple[type, ...]) -> str | None:
        """The last module of one of ``kinds`` whose forward finished before ``tap`` was captured
        (its last capture, for a module that runs several times)."""
        path, kind = split_tap(tap)
        marker = ("pre", path) if kind == "in" else ("post", path)
        last = max((i for i, e in enumerate(self.events) if e == marker), default=None)
        if last is None:
            return None
        for kind_, name in reversed(self.events[:last]):
            if kind_ == "post" and issubclass(self.types.get(name, object), kinds):
                return name
        return None

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
        last = max((i for i, e in enumerate(self.events) if e == marker), default=len(self.events))
        done = [name for k, name in self.events[:last] if k == "post"]
        if kind == "out" and last < len(self.events):
            done.append(path)
        return list(dict.fromkeys(done))


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
        result.types[name] = type(module)

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


def pair_stages(student: Sequence[tuple[object, tuple[int, ...]]],
                teacher: Sequence[tuple[object, tuple[int, ...]]]) -> list[tuple[object, object]]:
    """Pair two stage lists by spatial size; with no common size, the deepest ones (as mdistiller)."""
    by_size = {size: tap for tap, size in teacher}
    pairs, used = [], set()
    for tap, size in student:
        if size in by_size and size not in used:
            pairs.append((tap, by_size[size]))
            used.add(size)
    if not pairs:
        n = min(len(student), len(teacher))
        pairs = [(s[0], t[0]) for s, t in zip(student[len(student) - n:], teacher[len(teacher) - n:])]
    return pairs


def expand_layers(p_s: ProbeResult, p_t: ProbeResult, s_layers: Sequence[str], t_layers: Sequence[str],
                  what: str) -> tuple[list[str], list[str]]:
    """Resolve special taps (``auto``, ``embedding``, ``stages``, ``stages_preact``) to module paths."""
    s_out, t_out = [], []
    for a, b in zip(s_layers, t_layers):
        if a == "sections" or b == "sections":
            if a != b:
                raise ConfigError(f"{what}: 'sections' pairs with 'sections' only (got {a!r} / {b!r})")
            pairs = pair_stages(p_s.section_list(), p_t.section_list())
            if not pairs:
                raise ConfigError(f"{what}: 'sections' found no feature-map sections to pair")
            for (s0, s1), (t0, t1) in pairs:
                s_out += [s0, s1]
                t_out += [t0, t1]
        elif a in EXPANDING_TAPS:
            pairs = pair_stages(p_s.stage_list(a == "stages_preact"), p_t.stage_list(b == "stages_preact"))
            if not pairs:
                raise ConfigError(f"{what}: {a!r} / {b!r} found no feature-map stages to pair (the student or "
                                  "the teacher has no feature maps, or no ReLU module at a stage's resolution)")
            s_out += [s for s, _ in pairs]
            t_out += [t for _, t in pairs]
        else:
            s_out.append(p_s.resolve(a))
            t_out.append(p_t.resolve(b))
    return s_out, t_out
