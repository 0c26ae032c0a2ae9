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

from typing import Any

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
    #: enums and ranges, checked by :func:`build_methods` before the method is built
    options: type | None = None

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


def build_methods(cfg: DictConfig) -> list[CompressionMethod]:
    """Instantiate the configured method of each compression axis, in axis order, after checking
    its options against the class's ``options`` schema (messages name ``<axis>.<key>``)."""
    from hydra.utils import get_class

    methods = []
    for axis in axes.COMPRESSION_AXES:
        node = cfg.get(axis)
        if node is None or node.get("name") == "none":
            continue
        if "_target_" not in node:
            raise ConfigError(f"{axis}={node.get('name')} has no _target_; see conf/{axis}/ for the methods")
        try:
            schema = getattr(get_class(node._target_), "options", None)
        except Exception as exc:  # noqa: BLE001 - hydra wraps the import error
            raise ConfigError(f"{axis}={node.get('name')}: _target_ {node._target_} cannot be imported ({exc})") from exc
        if schema is not None:
            check_options(schema, node, axis)
        method = instantiate_node(node, name=node.name)
        if not isinstance(method, CompressionMethod):
            raise ConfigError(f"{axis}: {node._target_} is not a compresslab CompressionMethod")
        method.axis = axis
        methods.append(method)
    return methods
