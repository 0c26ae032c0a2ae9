"""The export check: each ONNX file against its torch artifact, in a fresh Python process.

``python -m compresslab.deploy.check '<json request>'`` loads every torch artifact with
:func:`compresslab.artifact.load_model_file` and its ``.onnx`` file in ONNX Runtime (a process
that never saw the export, so the file must stand on its own), runs both on the test split and
reports, per model: ``max_abs_diff`` (largest |logit difference|), ``top1_agreement`` (share of
test inputs with the same top-1 class), ``acc_top1`` in ORT and in torch, the number of inputs.
The parent (:func:`run_check`) compares them with the thresholds (``export.check``) and fails
the export step with a message naming the model, the kind and the figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

import torch

from compresslab.data.regime import token_rows
from compresslab.child_process import child_main, run_child



class ExportCheckError(RuntimeError):
    """An exported ONNX graph does not compute what its torch artifact computes."""


def run_check(pairs: Mapping[str, Mapping[str, str]], inputs: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 256, timeout_s: float = 900.0) -> dict[str, dict]:
    """Check ``{name: {"pt": path, "onnx": path}}`` on ``inputs``/``labels`` in a child process."""
    with tempfile.TemporaryDirectory(prefix="compresslab-check-") as tmp:
        data = Path(tmp) / "data.pt"
        torch.save({"x": inputs.detach().cpu(), "y": labels.detach().cpu()}, data)
        request = {"pairs": {k: dict(v) for k, v in pairs.items()}, "data": str(data),
                   "batch_size": int(batch_size), "threads": torch.get_num_threads()}
        return run_child("compresslab.deploy.check", request, timeout_s, lambda detail: ExportCheckError(
            f"export check: the fresh process failed to load/run the ONNX files {detail}"))


def compare(torch_logits: torch.Tensor, onnx_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The figures of one model (see the module doc); sequence logits are compared per position."""
    torch_logits, labels = token_rows(torch_logits, labels)
    onnx_logits, _ = token_rows(onnx_logits, labels)
    return {
        "max_abs_diff": float((torch_logits - onnx_logits).abs().max()),
        "max_abs_logit": float(torch_logits.abs().max()),
        "top1_agreement": float((torch_logits.argmax(1) == onnx_logits.argmax(1)).float().mean()),
        "acc_top1": float((onnx_logits.argmax(1) == labels).float().mean()),
        "acc_top1_torch": float((torch_logits.argmax(1) == labels).float().mean()),
        "checked_inputs": int(labels.numel()),
        "checked_in": "fresh_process",
    }


def verdict(name: str, info: Mapping, min_agreement: float, max_abs_diff_lossless: float) -> str | None:
    """Why ``info`` fails the check (None: it passes). Lossless kinds must agree on every input and
    stay within ``max_abs_diff_lossless * (1 + max |logit|)``; lossy kinds (int8) on ``min_agreement``."""
    kind = info.get("kind")
    if info.get("lossless"):
        bound = max_abs_diff_lossless * (1.0 + info["max_abs_logit"])
        if info["top1_agreement"] < 1.0 or info["max_abs_diff"] > bound:
            return (f"{name}.onnx ({kind}, lossless) differs from {name}.pt: top-1 agreement "
                    f"{info['top1_agreement']:.4f} (needs 1.0), max abs logit difference {info['max_abs_diff']:.3g} "
                    f"(allowed {bound:.3g})")
    elif info["top1_agreement"] < min_agreement:
        return (f"{name}.onnx ({kind}) differs from {name}.pt: top-1 agreement {info['top1_agreement']:.4f} "
                f"< export.check.min_top1_agreement={min_agreement} (max abs logit difference "
                f"{info['max_abs_diff']:.3g})")
    return None


@torch.no_grad()
def check_pairs(pairs: Mapping[str, Mapping[str, str]], x: torch.Tensor, y: torch.Tensor,
                batch_size: int = 256) -> dict[str, dict]:
    """:func:`compare` of each ``{"pt", "onnx"}`` pair on ``x``/``y`` (in this process)."""
    from compresslab.artifact import load_model_file
    from compresslab.runtime.ort import OrtModel

    out = {}
    for name, pair in pairs.items():
        model = load_model_file(Path(pair["pt"])).eval()
        runtime = OrtModel(pair["onnx"])
        t = torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
        o = torch.cat([runtime(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
        out[name] = compare(t, o, y)
    return out


def _child(request: dict) -> dict[str, dict]:
    torch.set_num_threads(int(request["threads"]))
    data = torch.load(request["data"], map_location="cpu", weights_only=True)
    return check_pairs(request["pairs"], data["x"], data["y"], int(request["batch_size"]))


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m compresslab.deploy.check '<json request>'``."""
    child_main("compresslab.deploy.check", _child, argv)


if __name__ == "__main__":
    main()
