"""Distillation benchmark on MNIST-1D: student from scratch vs every distillation method.

A CNN teacher (conf/arch/cnn1d.yaml, trained once and cached under --cache-dir) is
distilled into a small CNN (cnn1d_small) and an MLP (mlp), each method with its
``conf/distill/<method>.yaml`` preset, over several seeds. Prints a table of test
accuracy (mean ± std over seeds, last epoch), the student's size (saved artifact bytes; the
same for every method: distillation changes the weights, not the network), the parameters
that exist only during training (adapters, embedding heads, regressors, paraphrasers — not in
the artifact), the CPU time of the method's stages before the main fit (FitNets' first stage,
AB/FSP initialisation, FT's paraphraser; seed 0's fit) and the training epoch time (CPU time,
median epoch, no validation) of each method relative to plain training of the same student:

* ``×plain`` — the method as configured, teacher run every step (a short timing fit
  of --timing-epochs on seed 0);
* ``×plain cached`` — with the teacher-output cache (``distill.cache_teacher_outputs=true``),
  steady state (median epoch of the accuracy fits). MNIST-1D has no augmentation and the
  teacher is in eval mode, so the cache changes the cost, not the training: the accuracy
  fits use it unless --no-cache.

Usage:

    .venv/bin/python benchmarks/distill_mnist1d.py                      # 3 seeds, 30 epochs, both students
    .venv/bin/python benchmarks/distill_mnist1d.py --epochs 5 --seeds 1 --methods kd,at --students cnn1d_small
    .venv/bin/python benchmarks/distill_mnist1d.py --variant "at_w10=at:distill.feature_losses.at.weight=10"

DKD's and ReviewKD's warm-ups (20 of mdistiller's 240 epochs) and the stages of AB, FSP and FT
(RepDistiller's 30 init epochs of 240) are scaled to the same fraction of --epochs (at least 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback

from compresslab.artifact import load_model_file, save_model_file
from compresslab.config_utils import instantiate_node
from compresslab.data import MNIST1DDataModule
from compresslab.errors import ConfigError
from compresslab.measure import evaluate_accuracy
from compresslab.models import build_model
from compresslab.train import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ALL_METHODS = ["kd", "fitnet", "at", "sp", "pkt", "rkd", "crd", "dkd", "kd_ls", "kd_at", "kd_fitnet",
               "cc", "vid", "ab", "ft", "fsp", "nst", "ofd", "reviewkd", "dist"]
STAGED = {"ab": "ab", "fsp": "fsp", "ft": "ft"}  # method -> feature-loss entry with RepDistiller's 30 init epochs


class EpochTimer(Callback):
    """CPU time of each training epoch (``time.process_time``: unlike wall time it does not
    depend on what else runs on a shared machine; with one torch thread it equals the wall
    time of an otherwise idle machine)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.stage_s = 0.0

    def on_fit_start(self, trainer, pl_module):  # callbacks' hook runs before the module's (the stages)
        self._fit_start = time.process_time()

    def on_train_start(self, trainer, pl_module):
        self.stage_s = time.process_time() - self._fit_start

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.process_time() - self._start)


def arch(name: str) -> dict:
    """The plain arch spec of conf/arch/<name>.yaml."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "arch" / f"{name}.yaml"))


def distill_node(method: str, overrides: list[str], epochs: int, cache: bool):
    """conf/distill/<method>.yaml composed through Hydra (so combinations resolve their defaults)."""
    overrides = [f"distill={method}", *overrides, f"distill.cache_teacher_outputs={str(cache).lower()}"]
    if method == "dkd":
        overrides.append(f"distill.logit_loss.warmup_epochs={max(1, round(epochs * 20 / 240))}")
    if method == "reviewkd":
        overrides.append(f"distill.feature_losses.reviewkd.loss.warmup_epochs={max(1, round(epochs * 20 / 240))}")
    if method in STAGED:
        overrides.append(f"distill.feature_losses.{STAGED[method]}.init_epochs={max(1, round(epochs * 30 / 240))}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "logger=none", "paths.run_dir=."])
    return cfg.distill


def recipe(epochs: int):
    """The project's default student recipe: AdamW(lr 3e-3, wd 5e-4) with a cosine schedule."""
    return (partial(torch.optim.AdamW, lr=3e-3, weight_decay=5e-4),
            partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max(1, epochs)))


def fit(module, dm, epochs: int) -> EpochTimer:
    """Train without validation/checkpoints/logging; returns the timer (epoch and stage times)."""
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer


def get_teacher(dm, epochs: int, cache_dir: Path):
    """Train the CNN teacher once (seed 0) and keep it as a safe model file."""
    path = cache_dir / f"mnist1d_cnn1d_teacher_e{epochs}.pt"
    if path.exists():
        return load_model_file(path)
    pl.seed_everything(0, workers=True)
    spec = arch("cnn1d")
    model = build_model(spec, dm.input_shape, dm.num_classes)
    opt, sched = recipe(epochs)
    fit(ClassifierModule(model, dm.num_classes, optimizer=opt, scheduler=sched), dm, epochs)
    save_model_file(path, model, spec, dm.input_shape, dm.num_classes)
    return model.eval()


def run_one(student: str, method: str, overrides: list[str], seed: int, teacher, dm, epochs: int,
            cache: bool) -> dict:
    """One student fit: test accuracy and median epoch time (acc None: method not applicable)."""
    pl.seed_everything(seed, workers=True)
    model = build_model(arch(student), dm.input_shape, dm.num_classes)
    opt, sched = recipe(epochs)
    if method == "scratch":
        module = ClassifierModule(model, dm.num_classes, optimizer=opt, scheduler=sched)
    else:
        module = instantiate_node(distill_node(method, overrides, epochs, cache), model=model, teacher=teacher,
                                  num_classes=dm.num_classes, optimizer=opt, scheduler=sched, label_smoothing=0.0)
    try:
        timer = fit(module, dm, epochs)
    except ConfigError as exc:
        return {"acc": None, "epoch_s": None, "note": str(exc).split(" but ")[0].split(" (")[0]}
    extra = 0
    if method != "scratch":
        extra_modules = [module.adapters, module.feature_losses] + ([module.logit_loss] if module.logit_loss else [])
        extra = sum(p.numel() for m in extra_modules for p in m.parameters())
    return {"acc": evaluate_accuracy(model.eval(), dm.test_dataloader()), "epoch_s": statistics.median(timer.times),
            "stage_s": timer.stage_s, "extra_params": extra, "model": model}


def artifact_bytes(model, dm, student: str) -> int:
    """Bytes of the student saved as the pipeline saves it (a model file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model_file(Path(tmp) / "student.pt", model, arch(student), dm.input_shape, dm.num_classes)
        return path.stat().st_size


def fmt_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| student | method | test acc % (mean ± std) | Δ vs scratch | artifact | train-only params "
             "| stages (CPU) | epoch (CPU) | ×plain | ×plain cached |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mean"] is None:
            lines.append(f"| {r['student']} | {r['method']} | n/a: {r['note']} | | | | | | | |")
            continue
        cached = f"{r['rel_cached']:.2f}×" if r.get("rel_cached") else "–"
        stage = f"{r['stage_s']:.1f} s" if r.get("stage_s", 0) >= 0.05 else "–"
        lines.append(f"| {r['student']} | {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
                     f"| {100 * r['delta']:+.2f} | {r['size_bytes'] / 1024:.1f} KiB | {r['extra_params']:,} "
                     f"| {stage} | {1000 * r['epoch_s']:.0f} ms | {r['rel']:.2f}× | {cached} |")
    return "\n".join(lines)


def parse_variants(args) -> list[tuple[str, str, list[str]]]:
    """(label, method, hydra overrides) for scratch, each --methods entry and each --variant."""
    variants = [("scratch", "scratch", [])] + [(m, m, []) for m in args.methods.split(",") if m]
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        method, _, overrides = rest.partition(":")
        variants.append((label, method, [o for o in overrides.split(";") if o]))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated conf/distill names")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra row LABEL=METHOD:OVERRIDE[;OVERRIDE...] (Hydra overrides of that method)")
    parser.add_argument("--students", default="cnn1d_small,mlp", help="comma-separated conf/arch names")
    parser.add_argument("--timing-epochs", type=int, default=3, help="epochs of each uncached timing fit")
    parser.add_argument("--no-cache", action="store_true", help="accuracy fits without the teacher-output cache")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--cache-dir", default="outputs/benchmarks", help="where the trained teacher is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps epoch times stable on a shared machine)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    dm = MNIST1DDataModule(root=args.data_dir, batch_size=args.batch_size)
    dm.setup()
    start = time.perf_counter()
    teacher = get_teacher(dm, args.teacher_epochs, Path(args.cache_dir))
    teacher_acc = evaluate_accuracy(teacher, dm.test_dataloader())
    rows: list[dict] = []
    for student in args.students.split(","):
        scratch: dict | None = None
        for label, method, overrides in parse_variants(args):
            distill = method != "scratch"
            cached = distill and not args.no_cache
            results = [run_one(student, method, overrides, s, teacher, dm, args.epochs, cached)
                       for s in range(args.seeds)]
            if results[0]["acc"] is None:
                rows.append({"student": student, "method": label, "mean": None, "note": results[0]["note"]})
                print(f"{student:12s} {label:14s} n/a", flush=True)
                continue
            accs = [r["acc"] for r in results]
            median_epoch = statistics.median(r["epoch_s"] for r in results)
            row = {"student": student, "method": label, "accs": accs, "mean": statistics.mean(accs),
                   "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "size_bytes": artifact_bytes(results[0]["model"], dm, student),
                   "extra_params": results[0]["extra_params"], "stage_s": results[0]["stage_s"]}
            if distill and cached:  # time the uncached method separately
                row["epoch_s"] = run_one(student, method, overrides, 0, teacher, dm, args.timing_epochs,
                                         False)["epoch_s"]
                row["epoch_s_cached"] = median_epoch
            else:
                row["epoch_s"] = median_epoch
            if scratch is None:
                scratch = row
            row["delta"] = row["mean"] - scratch["mean"]
            row["rel"] = row["epoch_s"] / scratch["epoch_s"]
            if "epoch_s_cached" in row:
                row["rel_cached"] = row["epoch_s_cached"] / scratch["epoch_s"]
            rows.append(row)
            print(f"{student:12s} {label:14s} {100 * row['mean']:.2f} ± {100 * row['std']:.2f}  "
                  f"{row['epoch_s'] * 1000:.0f} ms/epoch ({row['rel']:.2f}x plain"
                  + (f", cached {row['rel_cached']:.2f}x" if "rel_cached" in row else "") + ")", flush=True)
    print()
    print(f"MNIST-1D ({len(dm.train_set)} train / {len(dm.test_set)} test), teacher cnn1d 64-64-64 "
          f"({args.teacher_epochs} epochs, test acc {100 * teacher_acc:.2f}%); students {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}, batch {args.batch_size}, {args.threads} thread(s); "
          f"total {time.perf_counter() - start:.0f} s")
    print(fmt_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "teacher_acc": teacher_acc, "rows": rows},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
