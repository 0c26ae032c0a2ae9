"""``compresslab.structured/1``: a channel-pruned model as its original arch spec plus the
pruned state dict (``prune=structured``, ``prune=slimming``).

:func:`load_payload` builds the arch (and the low-rank plan when the student was factorized
first), gives every tensor its saved shape with
:func:`~compresslab.compress.structure.resize_to_state_dict`, then loads the weights: no pickled
code, and it reloads in a fresh process.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from compresslab.artifact import Codec, spec_fields
from compresslab.compress.codecs.sparse import pack_state, unpack_state
from compresslab.compress.common import dense_state
from compresslab.compress.structure import build_structure, resize_to_state_dict

FORMAT = "compresslab.structured/1"
CODEC = Codec(FORMAT, kind="structured", lossless=True,
              onnx_weights="fp32, pruned (smaller) shapes")


def structured_payload(model: nn.Module, arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                       meta: Mapping[str, Any] | None = None, structure: Mapping[str, Any] | None = None) -> dict:
    """Plain-data artifact of a channel-pruned model: original arch spec (plus the low-rank
    plan when the student was factorized first, see ``build_structure``) + pruned state dict."""
    return {
        **spec_fields(FORMAT, arch, input_shape, num_classes),
        "structure": {k: v for k, v in dict(structure or {}).items() if k == "lowrank"},
        "state_dict": pack_state(dense_state(model.state_dict())),
        "meta": dict(meta or {}),
    }


def load_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Rebuild a channel-pruned model: build the arch (and its low-rank plan), resize to the
    saved shapes, load."""
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"], payload.get("structure"))
    state = unpack_state(payload["state_dict"])
    resize_to_state_dict(model, state)
    model.load_state_dict(state)
    return model.eval()
