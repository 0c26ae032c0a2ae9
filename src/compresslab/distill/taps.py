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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

SPECIAL_TAPS = ("auto", "embedding", "stages", "stages_preact", "sections")
EXPANDING_TAPS = ("stages", "stages_preact", "sections")
RELU_TYPES = (nn.ReLU, nn.ReLU6)


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
def capture(model: nn.Module, taps: Sequence[str], stop_when_done: bool = False,
            calls: Mapping[str, int] | None = None) -> Iterator[dict]:
    """Within the block, forwards of ``model`` store the tapped tensors in the yielded dict.

    Captured tensors are cloned, so later in-place ops (``ReLU(inplace=True)``) cannot
    change them. If a module runs several times in one forward the last call wins. With
    ``stop_when_done`` the forward raises :class:`_StopForward` once all taps are captured,
    each as often as ``calls[tap]`` says (default once; a ReLU module reused inside a block
    runs twice): use :func:`run_until_captured`.
    """
    feats: dict[str, torch.Tensor] = {}
    if not taps:
        yield feats
        return
    modules = dict(model.named_modules())
    wanted = {tap: int((calls or {}).get(tap, 1)) for tap in taps}
    seen: dict[str, int] = {}
    handles = []

    def store(tap, tensor):
        feats[tap] = tensor.clone()
        seen[tap] = seen.get(tap, 0) + 1
        if stop_when_done and all(seen.get(t, 0) >= n for t, n in wanted.items()):
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


def run_until_captured(model: nn.Module, x: torch.Tensor, taps: Sequence[str],
                       calls: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` only as far as needed to capture ``taps`` (``calls``: how often
    each tapped module runs in a full forward, from :meth:`ProbeResult.calls_of`)."""
    with capture(model, taps, stop_when_done=True, calls=calls) as feats:
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


def check_expanding_taps(s_layers: Sequence[str], t_layers: Sequence[str], what: str) -> None:
    """``stages``/``stages_preact`` expand to several taps: both sides need one at the same position."""
    for a, b in zip(s_layers, t_layers):
        if (a in EXPANDING_TAPS) != (b in EXPANDING_TAPS):
            raise ConfigError(f"{what}: student tap {a!r} is paired with teacher tap {b!r}; 'stages' and "
                              "'stages_preact' expand to several taps, so both sides need one at the same position")


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
