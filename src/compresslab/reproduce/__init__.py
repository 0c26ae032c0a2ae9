"""``compresslab-reproduce``: the paper-claim reproduction suite (presets in ``conf/experiment/repro/``).

    compresslab-reproduce                       # every claim, 3 seeds, into outputs/reproduce/<date>_<time>
    compresslab-reproduce --only hinton_omitted_class,han_pruning --seeds 1 --out /tmp/r
    compresslab-reproduce --quick               # one seed, shortened schedules (the tests' setting)
    compresslab-reproduce --list                # the claims and their statements

Prints one table (paper | claim | paper number | ours | verdict) and writes ``reproduce.json``,
``reproduce.md`` and ``<claim>.png`` per claim into ``--out``; each job's own run dir (with its
``results.json``) is under ``<out>/runs/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

from compresslab.reproduce.claims import Claim, VERDICTS
from compresslab.reproduce.suite import Suite, available_claims

__all__ = ["Claim", "Suite", "VERDICTS", "available_claims", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compresslab-reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated claim ids (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per claim (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default outputs/reproduce/<date>_<time>)")
    parser.add_argument("--teacher-cache", type=Path, default=None, help="teacher cache (default <out>/teachers)")
    parser.add_argument("--quick", action="store_true", help="one seed per claim on a shortened schedule")
    parser.add_argument("--list", action="store_true", help="list the claims and exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    claims = available_claims()
    if args.list:
        for c in claims.values():
            print(f"{c.claim:24s} {c.paper}: {c.statement}")
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()] or list(claims)
    unknown = [c for c in wanted if c not in claims]
    if unknown:
        parser.error(f"unknown claim(s) {unknown}; the suite has {list(claims)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = args.out or Path("outputs/reproduce") / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    from compresslab.reproduce.output import print_table, write_outputs

    suite = Suite(out=out, teacher_cache=args.teacher_cache, quick=args.quick, n_seeds=args.seeds,
                  log=lambda msg: print(msg, flush=True))
    start = time.perf_counter()
    rows = suite.run(claims[c] for c in wanted)
    wall = time.perf_counter() - start
    command = "compresslab-reproduce " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    paths = write_outputs(out, rows, claims, wall, command.strip())
    print_table(rows, wall)
    print(f"wall time {wall:.0f} s; {paths['json']}, {paths['md']}, figures in {out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
