"""The contract between the run pipeline and a compression method.

A method is configured in its axis group (``prune``, ``quant``, ``lowrank``, ``fuse``) with a
``_target_`` naming a :class:`CompressionMethod` subclass; ``<axis>=none`` has no target and
adds nothing. The pipeline calls, for every method, in the order of
:data:`compresslab.axes.COMPRESSION_AXES` (lowrank → prune → quant → fuse):

0. :meth:`bind` with the run's :class:`ExportContext` (arch spec, input shape, classes), once,
   before any other hook but :meth:`validate_student`; later hooks read it as ``self.context``;
1. :meth:`prepare` on the freshly built student (e.g. factorize layers),
2. :meth:`callbacks` to add Lightning callbacks to the student fit (pruning schedules, QAT),
3. :meth:`finalize` on the trained, val-selected student (PTQ, removing masks). **Every**
   method's numbers for results.json are computed here (or in :meth:`report`), never in
   :meth:`export`, so a method reports the same keys whether or not another method claims the file;
4. :meth:`side_files` (every method, after all finalizes): the method's own tables and plots
   (per-layer sparsity, sensitivity CSV/PNG) in the run dir; the paths it returns
   land in its report;
5. :meth:`export`, **pure**: a plain-data payload (or None) and nothing else: no files, no report
   changes. The last method (in axis order) that returns a payload claims the artifact; its codec
   (:mod:`compresslab.compress.codecs`) stores every tensor through the shared sparse layer, so a
   pruned student's zeros stack with the claiming method's own encoding, and the pipeline records
   under ``student.encodings`` which methods' :attr:`codec_kind` the file stacks and which it cannot;
6. :meth:`report`: the method's numbers, written to ``student.<axis>`` with plain keys.

What a method hands the ONNX export besides its payload is part of this contract too:
:meth:`calibration_data` (PTQ's calibration batches, which the int8 codec's ONNX form uses
to complete the QDQ graph).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, TypedDict

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab import axes
from compresslab.config_schema import check_options
from compresslab.config_utils import instantiate_node
from compresslab.errors import ConfigError


class ExportContext(TypedDict):
    """What every payload is rebuilt from: the student's arch spec, input shape and class count."""

    arch: dict
    input_shape: list[int]
    num_classes: int


class CompressionMethod:
    """Base class with pass-through hooks; subclasses override what their method needs.

    ``codec_kind``: the :attr:`compresslab.artifact.Codec.kind` of the encoding this method
    contributes to the artifact (``sparse``, ``structured``, ``lowrank``, ``int8``, ``lowbit``,
    ``actquant``, ``weight_shared``, ``ort_int8``, ``fused``), or None for a method that leaves the
    stored tensors as they are (sensitivity analysis). The pipeline checks it against what the
    saved file stacks (``student.encodings``).
    """

    axis: str = ""
    codec_kind: str | None = None
    context: ExportContext | None = None
    #: the dataclass schema of the method's options (:mod:`compresslab.config_schema`): their types,
    #: enums and ranges, checked by :meth:`__new__` before ``__init__`` runs
    options: type | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "CompressionMethod":
        """Check the constructor's options against ``cls.options`` (a ConfigError naming
        ``<axis>.<key>``, the value and what is allowed), from a config or a direct call alike."""
        if cls.options is not None and (args or kwargs):
            check_options(cls.options, _given_options(cls, args, kwargs), _axis_of(cls))
        return super().__new__(cls)

    def __init__(self, name: str) -> None:
        self.name = name

    def validate_student(self, student: nn.Module, datamodule) -> None:
        """Checks that need the built student (e.g. named layers exist), run by
        ``pipeline.validate`` on a freshly built student before any fit; raise
        :class:`~compresslab.errors.ConfigError` (default: nothing to check)."""

    def bind(self, context: ExportContext) -> None:
        """Receive the run's export context (kept as ``self.context``) before :meth:`prepare`."""
        self.context = context

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        """Change the student before training (default: unchanged)."""
        return student

    def callbacks(self) -> list[Callback]:
        """Callbacks for the student's fit (default: none)."""
        return []

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        """Transform the trained student and compute this method's report (default: unchanged)."""
        return student

    def side_files(self, run_dir: Path) -> dict[str, str]:
        """Write this method's side files (tables, plots) under ``run_dir`` (pruning methods: in
        ``<run dir>/pruning/``); return ``{report key: path}``, added to its report (default: none)."""
        return {}

    def export(self, student: nn.Module, context: ExportContext) -> dict | None:
        """Pure: a plain-data payload with a ``format`` registered in
        :data:`compresslab.artifact.ARTIFACT_LOADERS`, or None to leave the format to another
        method (dense when none claims it). No files, no change to the report."""
        return None

    def calibration_data(self) -> list[torch.Tensor]:
        """Input batches the ONNX form of this method's payload is calibrated with (default: none)."""
        return []

    def report(self) -> dict[str, Any]:
        """This method's numbers for results.json's ``student.<axis>`` (plain keys)."""
        return {}


def _axis_of(cls: type) -> str:
    """The axis a method class belongs to: its package under ``compresslab.compress`` (else its ``axis``)."""
    parts = cls.__module__.split(".")
    return parts[2] if parts[:2] == ["compresslab", "compress"] and len(parts) > 3 else (cls.axis or cls.__name__)


def _given_options(cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The options passed to ``cls(...)`` by name (``name`` left out, ``**kwargs`` flattened); an
    argument the constructor does not take stays in, for the schema to refuse by name."""
    params = inspect.signature(cls.__init__).parameters
    try:
        bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    for p in params.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(p.name, {}))
    return {k: v for k, v in bound.items() if k not in ("self", "name")}


def build_methods(cfg: DictConfig) -> list[CompressionMethod]:
    """Instantiate the configured method of each compression axis, in axis order (a bad option
    is the method's ConfigError, naming ``<axis>.<key>``)."""
    methods = []
    for axis in axes.COMPRESSION_AXES:
        node = cfg.get(axis)
        if node is None or node.get("name") == "none":
            continue
        if "_target_" not in node:
            raise ConfigError(f"{axis}={node.get('name')} has no _target_; see conf/{axis}/ for the methods")
        try:
            method = instantiate_node(node, name=node.name)
        except InstantiationException as exc:  # the method's own ConfigError, not Hydra's wrapping of it
            if isinstance(exc.__cause__, ConfigError):
                raise exc.__cause__ from None
            raise
        if not isinstance(method, CompressionMethod):
            raise ConfigError(f"{axis}: {node._target_} is not a compresslab CompressionMethod")
        method.axis = axis
        methods.append(method)
    return methods
