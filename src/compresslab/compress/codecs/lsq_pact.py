"""``compresslab.actquant/1``: an LSQ / PACT student (``quant=lsq``, ``quant=pact``).

Each quantized layer's weight codes are bit-packed at its own width, with its step size (LSQ)
and its activation quantizer's parameters (step or α, signedness, bits); the other tensors
(fp32 first/last layers, BN, biases) are stored as they are. :func:`load_payload` rebuilds the
model with the dequantized weights and the activation fake-quantizers, computing exactly what
the trained model computed (fp32 kernels: the integer arithmetic is simulated).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from compresslab.compress.codecs.bitpack import flatten_state, pack_bits, unflatten_state, unpack_bits
from compresslab.artifact import Codec, context_fields
from compresslab.compress.common import QUANTIZABLE
from compresslab.compress.quant.quantizers import (
    ACT_SCHEMES,
    FP32,
    dorefa_codes,
    dorefa_from_codes,
    features_per_sample,
    lsq_quantize,
    pact_quantize,
    qrange,
)
from compresslab.compress.structure import build_structure, structure_of
from compresslab.compress.quant.swap import SwapHooks, swap_forward
from compresslab.errors import CheckpointError

FORMAT = "compresslab.actquant/1"
CODEC = Codec(FORMAT, kind="actquant", lossless=False,
              onnx_weights="dequantized fp32 weights (no packed low-bit form in ONNX Runtime); activations "
                           "fake-quantized with the learned LSQ/PACT steps as round/clamp ops")
#: the buffers and parameters a quantized layer carries during training (not stored as such)
QUANT_BUFFERS = ("aq_bits", "aq_signed")
QUANT_PARAMS = ("aq_w_step", "aq_a_step", "aq_alpha")


def _act_params(module: nn.Module, scheme: str) -> dict:
    """The activation quantizer of a layer as plain data: bits, signedness, step (LSQ) or α (PACT)."""
    bits = int(module.aq_bits[1])
    if bits == FP32:
        return {"bits": FP32}
    signed = bool(int(module.aq_signed[0])) if int(module.aq_signed[0]) >= 0 else False
    value = module.aq_a_step if scheme == "lsq" else module.aq_alpha
    return {"bits": bits, "signed": signed, "value": float(value.detach())}


def encode_actquant(student: nn.Module, scheme: str, context: Mapping[str, Any]) -> tuple[dict, dict]:
    """The bit-packed payload of a trained LSQ/PACT student and its size statistics."""
    blobs, layers, per_layer = [], [], {}
    offset = fp32_bytes = enc_bytes = n_weights = 0
    skip = set()
    for name, module in student.named_modules():
        if not hasattr(module, "aq_bits"):
            continue
        for key in (*QUANT_BUFFERS, *QUANT_PARAMS):
            skip.add(f"{name}.{key}")
        wb = int(module.aq_bits[0])
        entry = {"name": name, "w_bits": wb, "act": _act_params(module, scheme)}
        w = module.weight.detach().cpu().float()
        if wb != FP32:
            if scheme == "lsq":
                step = float(module.aq_w_step.detach())
                qn, qp = qrange(wb, True)
                codes = torch.clamp(torch.round(w / step), -qn, qp) + qn
                entry["w_step"] = step
            else:
                codes = dorefa_codes(w, wb)
            packed = pack_bits(codes.to(torch.int64), wb)
            entry.update(shape=[int(s) for s in w.shape], offset=offset, nbytes=int(packed.numel()))
            blobs.append(packed)
            offset += packed.numel()
            skip.add(f"{name}.weight")
            layer_bytes = packed.numel() + (4 if scheme == "lsq" else 0)
            fp32_bytes += w.numel() * 4
            enc_bytes += layer_bytes
            n_weights += w.numel()
        per_layer[name] = [wb, entry["act"]["bits"]]
        layers.append(entry)
    rest = {k: v for k, v in student.state_dict().items() if k not in skip}
    dense, dense_index = flatten_state(rest)
    payload = {
        **context_fields(FORMAT, context),
        "structure": structure_of(student, context),  # (ignores the aq_* tensors: not in the arch's state dict)
        "scheme": scheme,
        "codes": torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8),
        "layers": layers,
        "dense": dense,
        "dense_index": dense_index,
    }
    stats = {
        "backend": "bitpacked_dequantized_fp32",
        "compute": "simulated",
        "bits_per_layer": per_layer,
        "quantized_layers_fp32_bytes": fp32_bytes,
        "quantized_layers_encoded_bytes": enc_bytes,
        "size_ratio_quantized_layers": fp32_bytes / enc_bytes if enc_bytes else None,
        "weight_bits_mean": 8 * enc_bytes / max(1, n_weights),
    }
    return payload, stats



def _act_hook(scheme: str, spec: Mapping[str, Any]):
    """The input hook of a loaded layer: its stored activation quantizer."""
    bits, signed, value = int(spec["bits"]), bool(spec["signed"]), torch.tensor(float(spec["value"]))
    if scheme == "lsq":
        return lambda module, x: lsq_quantize(x, value.to(x.device), bits, signed, features_per_sample(x))
    return lambda module, x: pact_quantize(x, value.to(x.device), bits, signed)


def load_payload(payload: dict) -> nn.Module:
    """Rebuild a working model (dequantized weights, activation fake-quantizers) from an
    :data:`FORMAT` payload."""
    scheme = payload["scheme"]
    if scheme not in ACT_SCHEMES:
        raise CheckpointError(f"actquant artifact: unknown scheme {scheme!r}")
    model = build_structure(payload["arch"], payload["input_shape"], payload["num_classes"], payload.get("structure"))
    state = unflatten_state(payload["dense"], payload["dense_index"])
    codes_all = payload["codes"]
    for layer in payload["layers"]:
        wb = int(layer["w_bits"])
        if wb == FP32:
            continue
        n = math.prod(layer["shape"])
        codes = unpack_bits(codes_all[layer["offset"]: layer["offset"] + layer["nbytes"]], wb, n).float()
        codes = codes.reshape(layer["shape"])
        if scheme == "lsq":
            qn, _ = qrange(wb, True)
            w = (codes - qn) * torch.tensor(float(layer["w_step"]))
        else:
            w = dorefa_from_codes(codes, wb)
        state[f"{layer['name']}.weight"] = w
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"actquant artifact does not match its architecture: {exc}") from exc
    modules = dict(model.named_modules())
    for layer in payload["layers"]:
        if int(layer["act"]["bits"]) != FP32:
            module = modules.get(layer["name"])
            if not isinstance(module, QUANTIZABLE):
                raise CheckpointError(f"actquant artifact names {layer['name']}, not a conv/linear layer")
            swap_forward(module, SwapHooks(input=_act_hook(scheme, layer["act"])))
    return model.eval()
