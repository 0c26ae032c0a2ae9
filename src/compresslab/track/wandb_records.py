"""Reading runs back from a W&B project (the public API) as results records, and logging a report to W&B."""

from __future__ import annotations

from typing import Any

from compresslab import axes
from compresslab.track.metrics import dotted


def _plain(value: Any) -> Any:
    """W&B summary values as plain Python: nested summary dicts as dicts, lists as lists."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {str(k): _plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"backends/onnxruntime/speedup": 2.0, "acc_top1": 0.9}`` -> ``{"backends": {"onnxruntime":
    {"speedup": 2.0}}, "acc_top1": 0.9}`` (a key's value that is itself a dict merges in)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _merge(node[leaf], value) if isinstance(value, dict) and isinstance(node.get(leaf), dict) else value
    return out


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested dicts merged key by key (``extra`` wins on leaves)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: The record's blocks that a W&B summary carries as ``<block>/<key>`` (``<key>`` may go on with
#: ``/``: ``student/backends/onnxruntime/speedup``, or be a nested dict: ``student/backends``).
WANDB_BLOCKS = ("teacher", "reference", "student", "measured_together")


def load_wandb_records(project: str) -> list[dict]:
    """Records rebuilt from a W&B project (``entity/project``) through the public API (needs network):
    the same nested blocks as results.json (``student.backends.<backend>...``,
    ``measured_together``) from the summary's ``<block>/...`` keys, so ``--backend`` and dotted
    metrics read them as they read results.json."""
    import wandb

    records = []
    for run in wandb.Api().runs(project):
        summary = {str(k): _plain(v) for k, v in dict(run.summary).items()}
        rec: dict[str, Any] = {"status": summary.get("status", "completed" if run.state == "finished" else run.state),
                               "config": dict(run.config), "axes": {}, "run_dir": getattr(run, "name", None)}
        for row in WANDB_BLOCKS:
            block = _nest({k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{row}/")})
            if block or row != "measured_together":
                rec[row] = block
        for axis in axes.AXES:
            rec["axes"][axis] = dotted(rec["config"], f"{axis}.name")
        rec["axes"]["seed"] = rec["config"].get("seed")
        records.append(rec)
    return records


def log_report_to_wandb(report: dict, project: str) -> None:
    """Log the long-form table and the plots to a W&B run (job_type=report)."""
    import wandb

    run = wandb.init(project=project, job_type="report")
    try:
        run.log({"ablation": wandb.Table(dataframe=report["frame"])})
        for path in report["paths"]:
            if path.suffix == ".png":
                run.log({path.stem: wandb.Image(str(path))})
    finally:
        wandb.finish()
