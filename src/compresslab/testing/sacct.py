"""A ``sacct`` stand-in for a SLURM cluster without accounting (the local test cluster).

submitit polls ``sacct -o JobID,State,NodeList --parsable2 -j ID ...`` to learn a job's state.
Without slurmdbd there is no ``sacct``: submitit then logs an error on every poll and waits
forever for a job that ended without a result (one cancelled with ``scancel``). This answers
the same question from slurmctld's memory, ``squeue -h -t all -j IDS -o "%i|%T|%N"``, which
keeps finished jobs for ``MinJobAge`` seconds. Only the fields squeue knows are answered.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Sequence

#: sacct field -> squeue format letter
FIELDS = {"jobid": "%i", "state": "%T", "nodelist": "%N", "jobname": "%j", "partition": "%P", "reason": "%r"}


def squeue_command(fields: Sequence[str], job_ids: Sequence[str]) -> list[str]:
    """The squeue call that answers ``sacct -o FIELDS -j JOB_IDS``."""
    unknown = [f for f in fields if f.lower() not in FIELDS]
    if unknown:
        raise SystemExit(f"sacct stand-in: fields {unknown} are not answered (known: JobID, State, NodeList, "
                         "JobName, Partition, Reason)")
    command = ["squeue", "-h", "-t", "all", "-o", "|".join(FIELDS[f.lower()] for f in fields)]
    if job_ids:
        command += ["-j", ",".join(job_ids)]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sacct", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--format", default="JobID,State,NodeList")
    parser.add_argument("-j", "--jobs", action="append", default=[])
    parser.add_argument("-P", "--parsable2", action="store_true")
    parser.add_argument("-n", "--noheader", action="store_true")
    args, _ = parser.parse_known_args(argv)
    fields = [f for f in args.format.split(",") if f]
    job_ids = [j for group in args.jobs for j in group.split(",") if j]
    out = subprocess.run(squeue_command(fields, job_ids), capture_output=True, text=True)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        sys.stderr.write(out.stderr)
        return out.returncode
    if not args.noheader:
        print("|".join(fields))
    sys.stdout.write(out.stdout if out.returncode == 0 else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
