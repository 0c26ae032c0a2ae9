"""Measuring saved artifacts in a fresh Python process.

The training process is not a fair place to time a model (its allocator, thread pools and
kernel caches are warm from training, and it still holds everything the methods registered),
and loading the file where it was written does not prove the file stands on its own. So the
pipeline hands the artifact files to ``python -m compresslab.measure.fresh``, which loads each
with :func:`compresslab.artifact.load_model_file` (``weights_only=True``, no pickled code),
profiles it (params, MACs, latency at batch 1 and batch N) and writes its outputs on the batch-N
example, so the parent can check that the fresh process computes what the parent loaded.

The request travels as JSON on the command line; the example batches and the outputs travel as
plain tensor files read with ``weights_only=True``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from dataclasses import asdict
from typing import Mapping

import torch

from compresslab.child_process import child_main, run_child
from compresslab.measure.latency import LatencySettings



def measure_in_fresh_process(
    artifacts: Mapping[str, Path],
    example_b1: torch.Tensor,
    example_bn: torch.Tensor,
    settings: LatencySettings | None = None,
    latency: bool = True,
    timeout_s: float = 900.0,
    backends: Mapping[str, Mapping[str, Path]] | None = None,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Profile the artifact files in one child process (:func:`compresslab.measure.core.profile_many`:
    latencies interleaved over rounds, with ``settings``' clock, threads and noise gate).

    Returns ``(metrics by name, outputs on example_bn by name)``; raises ``RuntimeError`` with
    the child's error output when it fails. ``backends`` (``{backend: {name: .onnx path}}``) are
    loaded in the child too and timed in the same rounds (:mod:`compresslab.measure.backends`).
    """
    settings = settings or LatencySettings()
    with tempfile.TemporaryDirectory(prefix="compresslab-measure-") as tmp:
        examples_path, outputs_path = Path(tmp) / "examples.pt", Path(tmp) / "outputs.pt"
        torch.save({"b1": example_b1.detach().cpu(), "bN": example_bn.detach().cpu()}, examples_path)
        request = {
            "artifacts": {name: str(path) for name, path in artifacts.items()},
            "examples": str(examples_path),
            "outputs": str(outputs_path),
            "device": str(example_b1.device),
            "threads": torch.get_num_threads(),
            "settings": asdict(settings),
            "latency": bool(latency),
            "backends": {b: {n: str(p) for n, p in f.items()} for b, f in (backends or {}).items()},
        }
        metrics = run_child("compresslab.measure.fresh", request, timeout_s, lambda detail: RuntimeError(
            f"measuring the artifacts in a fresh process failed {detail}"))
        outputs = torch.load(outputs_path, map_location="cpu", weights_only=True)
    return metrics, outputs


def _child(request: dict) -> dict[str, dict]:
    from compresslab.artifact import load_model_file
    from compresslab.measure.backends import load_backends
    from compresslab.measure.core import profile_many

    torch.set_num_threads(int(request["threads"]))
    examples = torch.load(request["examples"], map_location="cpu", weights_only=True)
    device = torch.device(request["device"])
    ex1, exn = examples["b1"].to(device), examples["bN"].to(device)
    models = {name: load_model_file(Path(path)).to(device).eval() for name, path in request["artifacts"].items()}
    with torch.no_grad():
        torch.save({name: model(exn).detach().cpu() for name, model in models.items()}, request["outputs"])
    return profile_many(models, ex1, exn, LatencySettings(**request["settings"]), latency=request["latency"],
                        backends=load_backends(request.get("backends")))


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m compresslab.measure.fresh '<json request>'``."""
    child_main("compresslab.measure.fresh", _child, argv)


if __name__ == "__main__":
    main()
