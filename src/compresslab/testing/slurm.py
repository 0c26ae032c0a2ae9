"""A one-node SLURM cluster on localhost: the scheduler the ``slurm`` tests submit to.

It runs a private ``munged`` (own key and socket), ``slurmctld`` and ``slurmd`` from a directory
of its own (config, state, spool, logs, pid files), on free ports, with no cgroups and no
accounting (a ``sacct`` stand-in on ``PATH`` answers submitit's polls from ``squeue``). Two
partitions: ``debug`` (the default, preemptable with a grace time) and ``urgent`` (a higher
``PriorityTier``, whose jobs preempt ``debug`` jobs: the job gets the ``--signal`` it asked for,
USR2 for submitit, and is requeued). :meth:`LocalSlurmCluster.stop` cancels the jobs and ends
the daemons by the process ids it started, nothing else.

Needs root on Linux and Debian/Ubuntu's ``slurmctld slurmd slurm-client munge`` packages
(``apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge``).
From a shell (a laptop, to try ``hydra/launcher=slurm_local``)::

    sudo .venv/bin/python -m compresslab.testing.slurm up      # prints the variables to export
    sudo .venv/bin/python -m compresslab.testing.slurm down
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

#: Commands the cluster needs (packages: munge, slurmctld, slurmd, slurm-client).
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
APT_INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
LOW, HIGH = "debug", "urgent"
DEFAULT_DIR = Path("/tmp/compresslab-slurm")


def unavailable_reason() -> str | None:
    """Why a local cluster can't start here (None when it can)."""
    if not sys.platform.startswith("linux"):
        return f"the local SLURM cluster needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts job steps as their user)"
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"SLURM/munge commands missing: {', '.join(missing)} (install with: {APT_INSTALL})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine's ``NodeName=... CPUs=...`` line, as ``slurmd -C`` prints it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


class ClusterError(RuntimeError):
    """The local cluster did not come up; the message holds the daemons' log tails."""


class LocalSlurmCluster:
    """Start/stop a one-node cluster whose files all live in ``root``."""

    def __init__(self, root: Path | str = DEFAULT_DIR, grace_time_s: int = 30) -> None:
        self.root = Path(root).resolve()
        self.grace_time_s = int(grace_time_s)
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.node = ""
        self.cpus = 0
        self.started_s = 0.0

    # -- paths and environment -------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        """Variables for clients (sbatch, squeue, submitit): the config and the ``sacct`` stand-in."""
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def client_env(self) -> dict[str, str]:
        """``os.environ`` plus :attr:`env`, without variables of an enclosing SLURM job."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        return {**base, **self.env}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(args), capture_output=True, text=True, env=self.client_env(), check=check,
                              timeout=timeout)

    # -- configuration -----------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants its socket's directories searchable by all
        key_dir = self.root / "munge-key"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o600)
        line = node_line()
        fields = dict(part.split("=", 1) for part in line.split())
        self.node, self.cpus = fields["NodeName"], int(fields["CPUs"])
        host = socket.gethostname().split(".")[0]
        ctl_port, d_port = _free_port(), _free_port()
        r = self.root
        self.conf.write_text("\n".join([
            "# compresslab's local one-node test cluster (compresslab.testing.slurm)",
            "ClusterName=compresslab",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job waits for it (121 s by default) before it may start again
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",   # no cgroups
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "KillWait=5",
            "MinJobAge=900",                      # finished jobs stay visible to squeue (the sacct stand-in)
            "InactiveLimit=0",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",  # preemption sends the job's --signal (USR2)
            f"{line} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName={LOW} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            f"PreemptMode=REQUEUE GraceTime={self.grace_time_s}",
            f"PartitionName={HIGH} Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
            "",
        ]))
        sacct = self.bin_dir / "sacct"
        sacct.write_text(f"#!/bin/sh\nexec {sys.executable} -m compresslab.testing.sacct \"$@\"\n")
        sacct.chmod(0o755)

    # -- lifecycle ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.client_env(), start_new_session=True)
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        (self.root / "pids.json").write_text(json.dumps(self.pids))

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       + self.log_tails())
            if ready():
                return
            time.sleep(0.1)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.log_tails())

    def start(self, timeout: float = 30) -> "LocalSlurmCluster":
        """Write the config, start munged, slurmctld and slurmd, and wait for an idle node."""
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        t0 = time.perf_counter()
        self._write_config()
        r = self.root
        sock = r / "munge" / "munge.socket"
        try:
            self._spawn("munged", ["munged", "-F", f"--socket={sock}", f"--key-file={r}/munge-key/munge.key",
                                   f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                                   f"--seed-file={r}/munge/munged.seed"])
            self._wait("munged's socket", sock.exists, timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
                       timeout)
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait(f"node {self.node} idle", lambda: self.run(
                "sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()[:1] == ["idle"], timeout)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - t0
        return self

    def jobs(self) -> list[str]:
        """Ids of the jobs slurmctld still tracks as pending or running (arrays as ``ID_TASK``)."""
        out = self.run("squeue", "-h", "-t", "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED",
                       "-o", "%i", check=False)
        return out.stdout.split() if out.returncode == 0 else []

    def stop(self, timeout: float = 20) -> None:
        """Cancel the remaining jobs, then end slurmd, slurmctld and munged by their process ids."""
        if "slurmctld" in self.pids and self._alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + timeout
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid is not None:
                self._terminate(name, pid, timeout)
        self.pids.clear()
        self._procs.clear()
        (self.root / "pids.json").unlink(missing_ok=True)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _terminate(self, name: str, pid: int, timeout: float) -> None:
        proc = self._procs.get(name)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not self._alive(pid):
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.wait(5)

    @classmethod
    def attach(cls, root: Path | str = DEFAULT_DIR) -> "LocalSlurmCluster":
        """The cluster started by ``up`` in ``root`` (its pids from ``pids.json``), to stop it."""
        cluster = cls(root)
        pids = cluster.root / "pids.json"
        if pids.exists():
            cluster.pids = {k: int(v) for k, v in json.loads(pids.read_text()).items()}
        return cluster

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log} ---\n" + "\n".join(text))
        return "\n".join(out)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compresslab.testing.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"cluster files (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if args.action == "up":
        cluster = LocalSlurmCluster(args.dir)
        if (cluster.root / "pids.json").exists():
            raise SystemExit(f"a cluster already runs from {cluster.root} (down first)")
        cluster.start()
        print(f"# node {cluster.node} ({cluster.cpus} CPUs), partitions {LOW} (default) and {HIGH}; "
              f"up in {cluster.started_s:.1f} s. In your shell:")
        for key, value in cluster.env.items():
            print(f"export {key}={value}")
        return 0
    cluster = LocalSlurmCluster.attach(args.dir)
    if args.action == "status":
        print(json.dumps({"pids": cluster.pids, "alive": {k: cluster._alive(v) for k, v in cluster.pids.items()}}))
        return 0
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
