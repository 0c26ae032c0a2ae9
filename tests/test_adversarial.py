"""Attacks and faults, kept as regression tests: crafted files that try to run code, and the
failures every run must survive with a record (see also test_pipeline's pickle and kill -9 cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compresslab.artifact import DENSE_FORMAT, atomic_torch_save, load_model_file
from compresslab.errors import CheckpointError, ConfigError


@pytest.fixture
def hub_repo(tmp_path):
    """A local torch.hub repo whose hubconf.py writes a marker file when it is imported."""
    repo, marker = tmp_path / "hubrepo", tmp_path / "PWNED"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "def m(**kwargs):\n    import torch\n    return torch.nn.Linear(1, 1)\n")
    return repo, marker


def crafted_specs(repo) -> dict[str, dict]:
    """Arch specs that name something other than a model factory of the zoo."""
    hub = {"repo_or_dir": str(repo), "model": "m", "source": "local"}
    return {
        "hub_load_through_common": {"_target_": "compresslab.models.common.torch.hub.load", **hub},
        "hub_load_through_tv": {"_target_": "compresslab.models.tv.torch.hub.load", **hub},
        "imported_helper": {"_target_": "compresslab.models.simple.require_image_input", "model_name": "x"},
        "class_defined_elsewhere": {"_target_": "compresslab.models.common.nn.Linear", "in_features": 1},
        "non_factory_class": {"_target_": "compresslab.models.resnet_cifar.BasicBlock"},
        "dunder_path": {"_target_": "compresslab.models.simple.MLP.__init__.__globals__"},
        "builtins": {"_target_": "compresslab.models.__builtins__.exec", "source": "print(1)"},
    }


def dense_file(path, arch):
    atomic_torch_save({"format": DENSE_FORMAT, "arch": arch, "input_shape": [1, 8, 8], "num_classes": 10,
                       "state_dict": {}, "meta": {}}, path)
    return path


def test_crafted_arch_specs_are_refused_by_load_model_file(tmp_path, hub_repo):
    repo, marker = hub_repo
    for name, spec in crafted_specs(repo).items():
        path = dense_file(tmp_path / f"{name}.pt", spec)
        with pytest.raises(ConfigError, match="Refused architecture _target_") as err:
            load_model_file(path)
        assert "compresslab.models.LeNet5" in str(err.value)  # says what is accepted
    assert not marker.exists()


def test_artifact_formats_outside_the_table_are_refused(tmp_path, hub_repo):
    _, marker = hub_repo
    for fmt, extra in [("evil/1", {"loader_module": "os"}),
                       ("compresslab.models.common.torch.hub.load", {"loader_module": "compresslab.models.common"}),
                       ("compresslab.sparse/1.__class__", {}), (None, {})]:
        atomic_torch_save({"format": fmt, **extra}, tmp_path / "a.pt")
        with pytest.raises(CheckpointError, match="Refused artifact format"):
            load_model_file(tmp_path / "a.pt")
    atomic_torch_save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_model_file(tmp_path / "list.pt")
    assert not marker.exists()


def test_a_crafted_teacher_planted_in_the_cache_is_refused(make_cfg, hub_repo):
    from compresslab.pipeline import run_experiment
    from compresslab.teacher import teacher_cache_path

    repo, marker = hub_repo
    cfg = make_cfg()
    dense_file(teacher_cache_path(cfg), crafted_specs(repo)["hub_load_through_common"])
    with pytest.raises(ConfigError, match="Refused architecture"):
        run_experiment(cfg)
    assert not marker.exists()
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and "Refused architecture" in record["error"]


def test_crafted_files_are_refused_in_the_fresh_measuring_process(tmp_path, hub_repo):
    from compresslab.measure.fresh import measure_in_fresh_process

    repo, marker = hub_repo
    path = dense_file(tmp_path / "student.pt", crafted_specs(repo)["hub_load_through_common"])
    with pytest.raises(RuntimeError, match="Refused architecture"):
        measure_in_fresh_process({"student": path}, torch.zeros(1, 1, 8, 8), torch.zeros(2, 1, 8, 8), 0, 1)
    assert not marker.exists()


def test_the_report_never_builds_models_from_records(tmp_path, hub_repo):
    from compresslab.track import report

    repo, marker = hub_repo
    spec = crafted_specs(repo)["hub_load_through_common"]
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    artifact = dense_file(run / "student.pt", spec)
    (run / "results.json").write_text(json.dumps({
        "status": "completed", "axes": {"student": "x", "seed": 0},
        "config": {"student": {"arch": spec}}, "student": {"acc_top1": 0.5, "artifact": str(artifact)}}))
    report.main([str(tmp_path / "sweep"), "--rows", "student", "--cols", "", "--out", str(tmp_path / "report")])
    assert not marker.exists()


def test_every_artifact_format_and_zoo_model_is_in_its_allowlist():
    from compresslab.artifact import ARTIFACT_LOADERS
    from compresslab.compress import lowbit, lowrank, sparse_encoding, weight_sharing
    from compresslab.compress.pruning import structured
    from compresslab.compress.quantization import pt2e
    from compresslab.models.common import MODEL_FACTORIES

    formats = [lowbit.LOWBIT_FORMAT, lowrank.LOWRANK_FORMAT, sparse_encoding.SPARSE_FORMAT,
               weight_sharing.SHARED_FORMAT, structured.STRUCTURED_FORMAT, pt2e.INT8_FORMAT]
    assert sorted(formats) == ARTIFACT_LOADERS.names()
    assert all(callable(ARTIFACT_LOADERS.resolve(f)) for f in formats)
    import compresslab.models as zoo

    for name in zoo.__all__:
        if name != "build_model":
            assert MODEL_FACTORIES.resolve(f"compresslab.models.{name}") is getattr(zoo, name)
