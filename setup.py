"""Build step that ships the Hydra config tree inside the package (everything else is in pyproject.toml).

``conf/`` stays at the top of the checkout, where it is edited; ``build_py`` copies its YAML files to
``compresslab/conf`` in the wheel, where :data:`compresslab.config_utils.CONFIG_DIR` finds them, so a
non-editable install runs every command from any directory. Editable installs read the checkout's
``conf/`` directly and skip the copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """``build_py`` plus the copy of ``conf/**/*.yaml`` into ``<build>/compresslab/conf``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "compresslab" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CONF, target, ignore=lambda d, names: [n for n in names if not (
            n.endswith(".yaml") or (Path(d) / n).is_dir()) or n == "__pycache__"])


setup(cmdclass={"build_py": BuildPyWithConf})
