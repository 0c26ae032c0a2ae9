"""The contract between the run pipeline and a compression method.

A method is configured in its axis group (``prune``, ``quant``, ``lowrank``) with a
``_target_`` naming a :class:`CompressionMethod` subclass; ``<axis>=none`` has no
target and adds nothing. The pipeline calls, in the order of
:data:`compresslab.axes.COMPRESSION_AXES` (lowrank → prune → quant → fuse):

1. :meth:`prepare` on the freshly built student (e.g. factorize layers),
2. :meth:`callbacks` to add Lightning callbacks to the student fit (pruning schedules, QAT),
3. :meth:`finalize` on the trained, val-selected student (PTQ, removing masks),
4. :meth:`export` to claim the artifact format (the last axis that returns a payload wins),
5. :meth:`report` to add method-specific numbers to the student's results.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab import axes
from compresslab.config_schema import check_options
from compresslab.config_utils import instantiate_node
from compresslab.errors import ConfigError


class CompressionMethod:
    """Base class with pass-through hooks; subclasses override what their method needs."""

    axis: str = ""
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

    def prepare(self, student: nn.Module, datamodule) -> nn.Module:
        """Change the student before training (default: unchanged)."""
        return student

    def callbacks(self) -> list[Callback]:
        """Callbacks for the student's fit (default: none)."""
        return []

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        """Transform the trained student (default: unchanged)."""
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        """A plain-data payload to save as the artifact, with a ``format`` registered in
        :data:`compresslab.artifact.ARTIFACT_LOADERS`; None leaves the dense format."""
        return None

    def report(self) -> dict[str, Any]:
        """Extra numbers for results.json's student entry."""
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
