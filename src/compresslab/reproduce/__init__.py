"""The paper-claim reproduction suite: presets in ``conf/experiment/repro/``, run by
``compresslab-reproduce`` (:func:`compresslab.cli.reproduce_main`).

    compresslab-reproduce                       # every claim, 3 seeds, into outputs/reproduce/<date>_<time>
    compresslab-reproduce --only hinton_omitted_class,han_pruning --seeds 1 --out /tmp/r
    compresslab-reproduce --quick               # one seed, shortened schedules (the tests' setting)
    compresslab-reproduce --list                # the claims and their statements

Prints one table (paper | claim | paper number | ours | verdict) and writes ``reproduce.json``,
``reproduce.md`` and ``<claim>.png`` per claim into ``--out``; each job's own run dir (with its
``results.json``) is under ``<out>/runs/``.
"""

from __future__ import annotations

from compresslab.reproduce.claims import Claim, VERDICTS
from compresslab.reproduce.suite import Suite, available_claims

__all__ = ["Claim", "Suite", "VERDICTS", "available_claims"]
