"""``compresslab.lowrank/1``: a factorized student (``lowrank=svd``, ``lowrank=tucker``,
``lowrank=cp``) as its arch spec, the plan of factorized layers
(:func:`~compresslab.compress.lowrank.factorized.lowrank_plan`: per layer its kind and rank) and the
state dict. :func:`load_payload` rebuilds the factorized layers before ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compresslab.artifact import Codec, context_fields
from compresslab.compress.codecs.sparse import pack_state, unpack_state
from compresslab.compress.common import dense_state
from compresslab.compress.lowrank.factorized import apply_plan, lowrank_plan
from compresslab.errors import CheckpointError
from compresslab.models import build_model

FORMAT = "compresslab.lowrank/1"
CODEC = Codec(FORMAT, kind="lowrank", lossless=True,
              onnx_weights="fp32, factorised layers")


def lowrank_payload(student: nn.Module, context: dict[str, Any]) -> dict:
    """The artifact of a factorised student: its architecture, the plan of factorised layers
    (SVD/Tucker/CP) and its weights."""
    return {
        **context_fields(FORMAT, context),
        "plan": lowrank_plan(student),
        "state_dict": pack_state(dense_state(student.state_dict())),
    }


def load_payload(payload: dict) -> nn.Module:
    """Rebuild the factorized model: arch spec -> model, plan -> factorized layers, then the weights."""
    model = build_model(payload["arch"], payload["input_shape"], payload["num_classes"])
    apply_plan(model, payload.get("plan", {}))
    try:
        model.load_state_dict(unpack_state(payload["state_dict"]))
    except RuntimeError as exc:
        raise CheckpointError(f"low-rank artifact does not match its plan: {exc}") from exc
    return model.eval()
