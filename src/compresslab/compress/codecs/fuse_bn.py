"""``compresslab.fused/1``: a student whose BatchNorms were folded into the conv/linear layer
before them (``fuse=bn``), as the arch spec, the folded ``[layer, bn]`` module paths and the state
dict. :func:`load_payload` builds the arch, checks each path names a conv/linear and a BatchNorm of
the model, gives the layer a bias, replaces the BN by ``nn.Identity`` and loads the weights strictly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from compresslab.artifact import Codec, context_fields
from compresslab.compress.codecs.sparse import pack_state, unpack_state
from compresslab.compress.common import dense_state, set_module
from compresslab.errors import CheckpointError
from compresslab.models import build_model

FORMAT = "compresslab.fused/1"
CODEC = Codec(FORMAT, kind="fused", lossless=True,
              onnx_weights="fp32, BatchNorm folded")
#: the layers a BatchNorm folds into, and the BatchNorms that fold
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fused_payload(model: nn.Module, pairs, context: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
    """The plain-data artifact of a folded student: arch spec, the folded ``[layer, bn]`` pairs, weights."""
    return {
        **context_fields(FORMAT, context),
        "folded": [[str(a), str(b)] for a, b in pairs],
        "state_dict": pack_state(dense_state(model.state_dict())),
        "meta": dict(meta or {}),
    }


def load_payload(payload: dict) -> nn.Module:
    """Rebuild a :data:`FORMAT` model (see the module doc)."""
    model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
    modules = dict(model.named_modules())
    folded = payload.get("folded")
    if not isinstance(folded, list):
        raise CheckpointError("fused artifact: 'folded' must be a list of [layer, batchnorm] module paths")
    for pair in folded:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise CheckpointError(f"fused artifact: bad folded pair {pair!r}")
        layer, bn = pair
        if not isinstance(modules.get(layer), LAYERS) or not isinstance(modules.get(bn), BATCHNORMS):
            raise CheckpointError(f"fused artifact: {layer!r} / {bn!r} are not a conv/linear and a BatchNorm "
                                  "of the model built from its arch spec")
        conv = modules[layer]
        if conv.bias is None:
            out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
            conv.bias = nn.Parameter(torch.zeros(out))
        set_module(model, bn, nn.Identity())
    try:
        model.load_state_dict(unpack_state(payload["state_dict"]))
    except RuntimeError as exc:
        raise CheckpointError(f"fused artifact does not match its architecture: {exc}") from exc
    return model.eval()
