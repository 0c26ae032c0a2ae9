"""The fields every artifact payload starts with: its ``format`` and the arch spec it is rebuilt from."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def spec_fields(fmt: str, arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> dict:
    """``{"format", "arch", "input_shape", "num_classes"}`` as plain data."""
    return {
        "format": fmt,
        "arch": dict(arch),
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
    }


def context_fields(fmt: str, context: Mapping[str, Any]) -> dict:
    """:func:`spec_fields` from an export ``context`` (its ``arch``, ``input_shape``, ``num_classes``)."""
    return spec_fields(fmt, context["arch"], context["input_shape"], context["num_classes"])
