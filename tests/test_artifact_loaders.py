"""One safe loader mechanism: an artifact's ``format`` selects a codec from the fixed table
``compresslab.artifact.ARTIFACT_LOADERS``; a payload that names a loader of its own (a module, a
dotted path, a function outside compresslab's codecs) is refused or ignored, and never imported."""

from __future__ import annotations

import pytest
import torch

from compresslab.artifact import ARTIFACT_LOADERS, atomic_torch_save, load_model_file, model_payload
from compresslab.errors import CheckpointError, ConfigError
from compresslab.models import build_model

CODECS = "compresslab.compress.codecs."


@pytest.fixture
def planted_loader(tmp_path, monkeypatch):
    """An importable module ``planted_codec`` whose import writes a marker file."""
    marker = tmp_path / "PWNED"
    (tmp_path / "planted_codec.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "def load_payload(payload):\n    import torch\n    return torch.nn.Identity()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_every_loader_is_load_payload_defined_in_a_codec_module():
    for fmt, (module, attr) in ARTIFACT_LOADERS.entries.items():
        assert module.startswith(CODECS) and attr == "load_payload", (fmt, module, attr)
        assert callable(ARTIFACT_LOADERS.resolve(fmt))


@pytest.mark.parametrize("payload", [
    {"format": "planted_codec/1"},
    {"format": "planted_codec.load_payload"},
    {"format": "compresslab.compress.codecs.sparse"},  # a codec's module path is not a format
    {"format": "evil/1", "loader": "planted_codec.load_payload", "loader_module": "planted_codec"},
])
def test_a_payload_naming_a_loader_outside_the_table_is_refused_without_importing_it(tmp_path, planted_loader,
                                                                                       payload):
    atomic_torch_save(payload, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="Refused artifact format"):
        load_model_file(tmp_path / "a.pt")
    assert not planted_loader.exists()


def test_a_loader_named_inside_a_known_format_is_ignored(tmp_path, planted_loader):
    model = build_model({"_target_": "compresslab.models.MLP", "hidden": [8]}, (1, 8, 8), 10)
    payload = model_payload(model, {"_target_": "compresslab.models.MLP", "hidden": [8]}, (1, 8, 8), 10)
    payload.update(loader="planted_codec.load_payload", loader_module="planted_codec")
    atomic_torch_save(payload, tmp_path / "dense.pt")
    loaded = load_model_file(tmp_path / "dense.pt")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert not planted_loader.exists()


def test_a_table_entry_resolves_only_to_a_function_defined_in_its_module():
    from compresslab.allowlist import Allowlist

    table = Allowlist("artifact format", {"x/1": (CODECS + "sparse", "torch")}, "hint", error=CheckpointError)
    with pytest.raises(ConfigError, match="not a callable defined in"):
        table.resolve("x/1")
