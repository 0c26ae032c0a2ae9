"""compresslab's SLURM launcher for Hydra (``hydra/launcher=slurm``, ``slurm_local``).

It lives in the ``hydra_plugins`` namespace because Hydra instantiates launchers only from there;
the SLURM helpers it uses are in :mod:`compresslab.cluster`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
from omegaconf import OmegaConf, open_dict

from compresslab.cluster import last_line, record_scheduler_failure

log = logging.getLogger(__name__)


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, waiting for every job of the sweep.

    The plugin's own launcher returns ``[job.results()[0] for job in jobs]``: the first job that
    ended without a result (cancelled with ``scancel``, killed, over its time limit) or raised
    outside the run raises in the sweep process, so the other jobs' outcomes and the end-of-sweep
    summary are lost. Here each such job gets a failed ``results.json`` (its own record, if it
    wrote one, with the scheduler's verdict added) and the sweep goes on; the summary then lists
    it as failed and the sweep exits non-zero. (A failed run inside a job is recorded by the run
    itself, and the job returns normally.)
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        assert self.config is not None and len(job_overrides) > 0
        # the executor as hydra-submitit-launcher 1.2 builds it
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]})
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params))
        log.info("SLURM jobs: %s", ", ".join(f"#{p[2]}={j.job_id}" for p, j in zip(params, jobs)))
        return [self._outcome(job, overrides, idx)
                for idx, (job, overrides) in enumerate(zip(jobs, job_overrides), start=initial_job_idx)]

    def _outcome(self, job, overrides: Sequence[str], idx: int) -> JobReturn:
        """The job's JobReturn; for a job without one, a failed results.json and an empty return."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()[0]
        except (UncompletedJobError, FailedJobError) as exc:
            state = job.state
            if isinstance(exc, FailedJobError):
                error = f"SLURM job {job.job_id} raised outside the run: {last_line(str(exc))}"
            else:
                error = f"SLURM job {job.job_id} ended {state} without a result (scancel, killed or time limit)"
            job_dir = self._job_dir(overrides, idx)
            record_scheduler_failure(job_dir, error, job.job_id, state, list(overrides), str(exc))
            log.error("job #%d: %s; recorded in %s", idx, error, job_dir / "results.json")
            # COMPLETED with no value, as a failed run's job returns: Hydra's sweeper re-raises FAILED
            # returns, which would end the sweep before its summary.
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None,
                             working_dir=str(job_dir), task_name=str(self.config.hydra.job.name))

    def _job_dir(self, overrides: Sequence[str], idx: int) -> Path:
        """The output dir Hydra gives job ``idx`` (``hydra.sweep.dir/hydra.sweep.subdir``)."""
        assert self.config is not None and self.hydra_context is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = idx
            return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        except Exception:  # noqa: BLE001 - a config that can't compose: the default subdir layout
            return Path(str(self.config.hydra.sweep.dir)) / str(idx)
