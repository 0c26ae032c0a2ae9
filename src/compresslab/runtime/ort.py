"""ONNX Runtime as a measured backend: a session per thread count, wrapped as a callable on torch tensors.

:class:`OrtModel` is what :func:`compresslab.measure.latency.measure_latencies` times beside the
torch models, in the same interleaved rounds. Its intra-op thread pool is sized to the thread
count the latency engine has set for the measurement (``torch.get_num_threads()`` inside the
engine's ``Timer``: ``threads_b1`` at batch 1, ``threads_bN`` at batch N), one session per count,
created on the first (untimed warm-up) call.

Session settings (recorded with every figure as ``ort_settings``): CPU execution provider,
``ORT_ENABLE_ALL`` graph optimisation (constant folding, Conv+BN/Conv+Relu fusion, QDQ ->
QLinearConv/QLinearAdd fusion, NCHWc/NHWC layouts), sequential execution, one inter-op thread,
and **no spinning** of the intra-op pool (``session.intra_op.allow_spinning=0``). Spinning
workers would burn CPU time after each call; with the engine's CPU clock (``clock=cpu``:
``process_time`` at more than one thread, which counts every thread of the process, ORT's pool
included) that spin would be charged to whichever model is timed next. At one thread ORT runs
on the calling thread, so ``thread_time`` counts all of its work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS: dict[str, Any] = {
    "provider": "CPUExecutionProvider",
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "execution_mode": "ORT_SEQUENTIAL",
    "inter_op_num_threads": 1,
    "intra_op_allow_spinning": False,
    "intra_op_num_threads": "= the engine's threads (threads_b1 / threads_bN)",
}


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}


def make_session(model: bytes | str | Path, threads: int, optimized_path: Path | None = None):
    """An ``InferenceSession`` with :data:`SETTINGS` and ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


class OrtModel:
    """``model(x: torch.Tensor) -> torch.Tensor`` running an ONNX file in ONNX Runtime (CPU)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.data = self.path.read_bytes()
        self.sessions: dict[int, Any] = {}

    def session(self, threads: int | None = None):
        n = int(threads or torch.get_num_threads())
        if n not in self.sessions:
            self.sessions[n] = make_session(self.data, n)
        return self.sessions[n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session = self.session()
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.detach().cpu().numpy())}
        return torch.from_numpy(session.run(None, feed)[0])

    def eval(self) -> "OrtModel":
        return self


def optimized_ops(path: Path | str, threads: int = 1) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually runs (after its optimisations), e.g.
    ``{"QLinearConv": 21, "QLinearAdd": 9, ...}``: shows what the runtime fused."""
    import collections
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="compresslab-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(Path(path).read_bytes(), threads, optimized_path=out)
        graph = onnx.load(str(out)).graph
    return dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))


def optimized_ops_bytes(model: bytes) -> dict[str, int]:
    """:func:`optimized_ops` of an in-memory model."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compresslab-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        return optimized_ops(path)
