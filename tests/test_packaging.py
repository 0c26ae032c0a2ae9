"""The built wheel works without the checkout (issue #28): the config tree ships inside the package,
and the console commands run from any directory; the sources import no private torch module."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_private_torch_import_in_src():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in (ROOT / "src").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"torch\._", line)]
    assert not hits, hits


@pytest.mark.slow
def test_wheel_installs_and_runs_a_job_outside_the_checkout(tmp_path):
    src = tmp_path / "src_copy"  # build from a copy: no build/ or egg-info left in the checkout
    for name in ("src", "conf", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("compresslab-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies from this environment (no network); its .pth files (the editable checkout) stay unread
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import compresslab.config_utils as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           capture_output=True, text=True, env=env, cwd=work, check=True).stdout.split()
    assert all(p.startswith(str(site)) for p in where)  # the installed package and its own config tree
    run = subprocess.run([str(venv / "bin" / "compresslab"), "teacher=none", "logger=none", "student.epochs=1",
                          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                          "measure.latency_rounds=2", "measure.latency_round_ms=1", "measure.fresh_process=false",
                          "hydra.run.dir=run"], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((work / "run" / "results.json").read_text())
    assert record["status"] == "completed" and record["student"]["acc_top1"] > 0
    repro = subprocess.run([str(venv / "bin" / "compresslab-reproduce"), "--list"], capture_output=True, text=True,
                           env=env, cwd=work, timeout=300)  # reads the packaged conf/experiment/repro
    assert repro.returncode == 0 and "han" in repro.stdout.lower(), repro.stderr[-2000:]
