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


def refuse_external_data(model: bytes, source: str) -> None:
    """Refuse an ONNX model whose tensors keep their data in external files (or that is not a
    readable ONNX model), raising :class:`~compresslab.errors.CheckpointError` naming ``source``.

    compresslab writes self-contained ONNX files only (``deploy/export.py``: ``external_data=False``),
    so any external reference is foreign. ONNX Runtime resolves it against the model's directory, or
    the working directory for a model given as bytes, which lets a crafted file read any file there
    (``location=secret.bin``) or outside it (``../../x``) as its weights. Checked on every tensor:
    initializers, sparse initializers, node attributes, subgraphs and functions."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from compresslab.errors import CheckpointError

    try:
        proto = onnx.load_from_string(model)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CheckpointError(f"{source} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc

    def tensors(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            yield from nodes_tensors([node])

    def nodes_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for tensor in [*tensors(proto.graph), *(t for f in proto.functions for t in nodes_tensors(f.node))]:
        if uses_external_data(tensor) or tensor.external_data:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise CheckpointError(
                f"{source}: tensor {tensor.name!r} keeps its data in an external file (location={location!r}). "
                "compresslab writes self-contained ONNX files and refuses external data: ONNX Runtime would read "
                "that file from the model's or the working directory. Re-export the model as one file.")


def make_session(model: bytes | str | Path, threads: int, optimized_path: Path | None = None):
    """An ``InferenceSession`` with :data:`SETTINGS` and ``threads`` intra-op threads, for a model
    that passes :func:`refuse_external_data`."""
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    refuse_external_data(data, "the ONNX model" if isinstance(model, bytes) else str(model))
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class OrtModel:
    """``model(x: torch.Tensor) -> torch.Tensor`` running an ONNX file in ONNX Runtime (CPU)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.data = self.path.read_bytes()
        refuse_external_data(self.data, str(self.path))  # at load, before any session is made
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
