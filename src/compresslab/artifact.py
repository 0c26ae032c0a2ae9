"""Saving and loading models as safe files: an architecture spec plus a state dict.

A model file is a ``torch.save`` of plain data only (strings, numbers, lists,
dicts, tensors), so :func:`load_model_file` reads it with ``weights_only=True``
and rebuilds the module from the spec through :func:`compresslab.models.build_model`,
which only accepts the zoo's own model factories. No pickled code runs.
Compression methods with other formats (sparse, int8, bit-packed) write them through a codec,
one module per format in :mod:`compresslab.compress.codecs`; each codec's ``load_payload``
is listed in :data:`ARTIFACT_LOADERS` under its ``FORMAT`` string: a fixed table in this
file, so the format read from a file selects one of these loaders and nothing else.
The same table answers everything else about a format (:func:`codec_of`): the :class:`Codec`
its module declares (its kind, whether its ONNX form is lossless, how it exports to ONNX).
"""

from __future__ import annotations

import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from compresslab.allowlist import Allowlist
from compresslab.errors import CheckpointError, ConfigError
from compresslab.files import atomic_torch_save
from compresslab.models import build_model

DENSE_FORMAT = "compresslab.dense/1"

#: format string -> (codec module defining the loader, loader name); each loader is
#: ``load_payload(payload) -> nn.Module``. A new file format adds its codec module and its line here.
ARTIFACT_LOADERS = Allowlist(
    "artifact format",
    {
        "compresslab.sparse/1": ("compresslab.compress.codecs.sparse", "load_payload"),
        "compresslab.structured/1": ("compresslab.compress.codecs.structured", "load_payload"),
        "compresslab.int8_pt2e/1": ("compresslab.compress.codecs.int8", "load_payload"),
        "compresslab.lowbit/1": ("compresslab.compress.codecs.lowbit", "load_payload"),
        "compresslab.actquant/1": ("compresslab.compress.codecs.lsq_pact", "load_payload"),
        "compresslab.lowrank/1": ("compresslab.compress.codecs.lowrank", "load_payload"),
        "compresslab.shared/1": ("compresslab.compress.codecs.weight_sharing", "load_payload"),
        "compresslab.fused/1": ("compresslab.compress.codecs.fuse_bn", "load_payload"),
        "compresslab.onnx_qdq/1": ("compresslab.compress.codecs.ort_int8", "load_payload"),
        "compresslab.nm/1": ("compresslab.compress.codecs.nm", "load_payload"),
        "compresslab.weight_only/1": ("compresslab.compress.codecs.weight_only", "load_payload"),
        "compresslab.packed_int/1": ("compresslab.compress.codecs.packed_int", "load_payload"),
    },
    f"The file is not a compresslab artifact, or was written by a newer version (dense files say {DENSE_FORMAT!r}).",
    error=CheckpointError,
)


@dataclass(frozen=True)
class OnnxRequest:
    """What a codec's ONNX form is asked for: an ``example`` input (batch 2), the ``opset``, the
    claiming methods' :meth:`~compresslab.compress.base.CompressionMethod.calibration_data` and
    ``options`` (the ``export`` config node as a plain dict, e.g. ``int8_complete_qdq``)."""

    example: torch.Tensor
    opset: int
    calibration: list = field(default_factory=list)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Codec:
    """What a codec module declares about its format as its module-level ``CODEC``.

    ``kind``: the short name recorded as ``<row>.onnx.kind`` and in ``student.encodings.stacks``
    (it is the ``encoding`` of the methods whose artifact this is); ``onnx_weights``: what the
    exported ONNX weights are; ``lossless``: the ONNX form computes what the loaded torch artifact
    computes (checked against ``export.check.max_abs_diff_lossless``, else top-1 agreement);
    ``onnx_form(payload, request) -> (onnx bytes, extra info)``: the codec's own ONNX form; None
    exports the module :func:`model_from_payload` builds with the generic exporter
    (:func:`compresslab.runtime.onnx_export.onnx_bytes`). Extra info may override ``lossless`` /
    ``weights`` / ``exporter`` for one payload. ``holds_sparse(payload) -> bool``: only for a codec
    with a sparse layout of its own that the shared layer's records do not show (Deep Compression's
    relative index, described by rows of integers): whether this payload uses it.
    """

    format: str
    kind: str
    lossless: bool
    onnx_weights: str
    onnx_form: Callable[[Mapping[str, Any], OnnxRequest], tuple[bytes, dict]] | None = None
    holds_sparse: Callable[[Mapping[str, Any]], bool] | None = None


DENSE_CODEC = Codec(format="compresslab.dense/1", kind="dense", lossless=True, onnx_weights="fp32")


def codec_of(fmt: object) -> Codec:
    """The :class:`Codec` of an artifact format, found only through :data:`ARTIFACT_LOADERS`
    (a format outside the table is refused like a load is)."""
    if fmt == DENSE_FORMAT:
        return DENSE_CODEC
    loader = ARTIFACT_LOADERS.resolve(fmt)
    codec = getattr(sys.modules[loader.__module__], "CODEC", None)
    if not isinstance(codec, Codec) or codec.format != fmt:
        raise CheckpointError(f"{loader.__module__} declares no CODEC for {fmt!r}")
    return codec


def spec_fields(fmt: str, arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> dict:
    """The fields every model file starts with, as plain data: its ``format`` and the arch spec
    (``arch``, ``input_shape``, ``num_classes``) it is rebuilt from."""
    return {
        "format": fmt,
        "arch": dict(arch),
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
    }


def context_fields(fmt: str, context: Mapping[str, Any]) -> dict:
    """:func:`spec_fields` from a method's export ``context`` (its ``arch``, ``input_shape``, ``num_classes``)."""
    return spec_fields(fmt, context["arch"], context["input_shape"], context["num_classes"])


def model_payload(
    model: nn.Module, arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """The plain-data dict that describes a dense model file."""
    return {
        **spec_fields(DENSE_FORMAT, arch, input_shape, num_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def save_model_file(path: Path, model: nn.Module, arch: Mapping[str, Any], input_shape: Sequence[int],
                    num_classes: int, meta: Mapping[str, Any] | None = None) -> Path:
    """Save a dense fp32 model as arch spec + state dict (atomic)."""
    atomic_torch_save(model_payload(model, arch, input_shape, num_classes, meta), Path(path))
    return Path(path)


def read_payload(path: Path) -> dict:
    """Read a compresslab file with ``weights_only=True``; clear errors for missing/foreign files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No such checkpoint/artifact: {path.resolve()}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a model file: give the file inside it "
                              "(artifacts/student.pt, checkpoints/student/best.ckpt, a cached teacher .pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or corrupt
        damage = file_damage(path)
        if damage:
            raise CheckpointError(f"{path} is damaged: it {damage}.") from exc
        legacy = " It is a legacy (non-zip) torch.save / pickle file." if _is_pickle(path) else ""
        why = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(exc), re.M)  # not torch's advice
        raise CheckpointError(
            f"{path} cannot be loaded safely (weights_only=True refused it: {why.group(1) if why else exc})."
            f"{legacy} compresslab only loads files "
            "holding plain tensors/containers (its own model files, Lightning checkpoints, state dicts)."
        ) from exc


def file_damage(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (empty, truncated, corrupt), or None."""
    try:
        size = Path(path).stat().st_size
        if size == 0:
            return "is empty (0 bytes; a write that never finished?)"
        if not zipfile.is_zipfile(path):
            if _is_pickle(path):  # a whole legacy-format file: not damaged, refused for what it holds
                return None
            return f"is truncated or corrupt ({size} bytes, not a complete torch.save zip archive)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"is corrupt (bad data in its entry {bad!r})" if bad else None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"cannot be read as a zip archive ({type(exc).__name__}: {exc})"


def _is_pickle(path: Path) -> bool:
    """Whether the file starts like a pickle (protocol 2+ opcode), as legacy ``torch.save`` files do."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def model_from_payload(payload: Mapping[str, Any], source: str = "the model file") -> nn.Module:
    """Rebuild a model from a payload read by :func:`read_payload`: after :func:`check_spec_size`
    (before anything is allocated) and refusing non-finite weights (:func:`check_finite`)."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"Not a compresslab model file: it holds a {type(payload).__name__}, not a dict")
    fmt = payload.get("format")
    if fmt != DENSE_FORMAT:
        ARTIFACT_LOADERS.resolve(fmt)  # an unknown format is refused before the spec is looked at
    check_spec_size(payload, source)
    if fmt == DENSE_FORMAT:
        model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
        model.load_state_dict(payload["state_dict"])
    else:
        model = ARTIFACT_LOADERS.resolve(fmt)(dict(payload))
    return check_finite(model.eval(), source)


def load_model_file(path: Path) -> nn.Module:
    """Load any compresslab model file/artifact into a working module in eval mode."""
    return model_from_payload(read_payload(path), str(path))


#: A compressed format may store this many times fewer values than its architecture has
#: (1-bit packing, 99% sparsity, rank-1 factors), plus :data:`SIZE_SLACK` values for small models.
MAX_COMPRESSION, SIZE_SLACK = 1000, 1_000_000


def _stored_values(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        return data.numel()
    if isinstance(data, Mapping):
        return sum(_stored_values(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return sum(_stored_values(v) for v in data)
    return 0


def check_spec_size(payload: Mapping[str, Any], source: str = "the model file") -> None:
    """Refuse a file whose architecture spec implies far more values than the file holds, before
    building it: the spec is built on the ``meta`` device (no memory), its parameters and buffers
    counted, and compared with the tensors stored (a dense file: its state dict exactly; another
    format: :data:`MAX_COMPRESSION` times them plus :data:`SIZE_SLACK`). A crafted spec such as an
    MLP with ``hidden: [1e6, 1e6]`` would otherwise make the loader allocate terabytes."""
    if not all(k in payload for k in ("arch", "input_shape", "num_classes")):
        return  # the format's loader reports what is missing
    try:
        with torch.device("meta"):
            model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
    except (CheckpointError, ConfigError):  # the spec itself is refused
        raise
    except Exception:  # noqa: BLE001 - a model that can't be built on meta is checked by its real build
        return
    implied = sum(t.numel() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    dense = payload.get("format") == DENSE_FORMAT
    stored = _stored_values(payload.get("state_dict") if dense else payload)
    limit = stored if dense else MAX_COMPRESSION * stored + SIZE_SLACK
    if implied > limit:
        raise CheckpointError(
            f"{source}: its architecture spec {dict(payload['arch'])} (input {list(payload['input_shape'])}, "
            f"{payload['num_classes']} classes) implies {implied:,} values ({4 * implied / 2 ** 30:.1f} GiB as fp32), "
            f"but the file holds {stored:,}: refused before building it. The file is damaged or crafted; use the "
            "file the run wrote.")


def check_finite(model: nn.Module, source: str = "the model") -> nn.Module:
    """Refuse a model with NaN or infinite weights (a diverged training run, or a damaged file);
    returns ``model``. Integer and quantized tensors are exact and not checked."""
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and hasattr(type(value), "__tensor_flatten__") and hasattr(value, "dequantize"):
            value = value.dequantize()  # a torchao weight-only tensor: check the values it computes with
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_quantized:
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: {bad} of {value.numel()} values of {name!r} are NaN or infinite; a model with "
                    "non-finite weights computes nothing sound (a diverged run, or a damaged file). Retrain it "
                    "(lower the learning rate) or load another file.")
    return model


def load_state_dict_into(model: nn.Module, path: Path) -> nn.Module:
    """Load weights from a compresslab model file, a Lightning checkpoint, or a plain state dict.

    Lightning checkpoints store the module's parameters under ``state_dict`` with
    a ``model.`` prefix (compresslab's modules keep the network as ``self.model``).
    """
    payload = read_payload(path)
    if isinstance(payload, dict) and payload.get("format") == DENSE_FORMAT:
        state = payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = {k[len("model."):]: v for k, v in payload["state_dict"].items() if k.startswith("model.")}
        state = state or payload["state_dict"]
    elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = payload
    else:
        raise CheckpointError(f"{path}: not a model file, Lightning checkpoint or state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not match the configured architecture: {exc}. "
            "Check that teacher=<arch> names the architecture the checkpoint was trained with."
        ) from exc
    return check_finite(model, str(path))
