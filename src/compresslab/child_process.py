"""Running a compresslab module as a fresh child process that takes one JSON request and answers
one JSON result: the fresh-process measurement (:mod:`compresslab.measure.fresh`) and the ONNX
export check (:mod:`compresslab.deploy.check`) both work this way, so nothing the parent loaded
or trained shares the child's memory, threads or imported modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

RESULT_PREFIX = "COMPRESSLAB_CHILD_RESULT "


def run_child(module: str, request: Any, timeout_s: float, failure: Callable[[str], Exception]) -> Any:
    """``python -m <module> '<request as JSON>'`` and its result; ``failure(message)`` is raised
    (with the child's exit code and last output lines) when it fails or answers nothing."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(request)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "(no output)").strip().splitlines()[-15:]
        raise failure(f"(exit code {proc.returncode}): {tail[-1]}\n" + "\n".join(tail[:-1]))
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def child_main(module: str, handle: Callable[[dict], Any], argv: Sequence[str] | None = None) -> None:
    """The child's entry point: read the one JSON request argument, print ``handle(request)``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {module} '<json request>' (called by the pipeline)")
    print(RESULT_PREFIX + json.dumps(handle(json.loads(args[0]))), flush=True)
