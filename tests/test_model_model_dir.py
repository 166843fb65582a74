"""model_dir names a run's files for every reader and writer: the checkpoint choice maps to them."""

import pytest

from model import model_dir


@pytest.mark.parametrize("checkpoint, model_file, export_dir", [
    ("final", "model.keras", "export"),
    ("best", "best.keras", "export_best"),
])
def test_each_checkpoint_names_its_model_and_its_export(checkpoint, model_file, export_dir):
    assert model_dir.model_file(checkpoint) == model_file
    assert model_dir.export_dir(checkpoint) == export_dir


@pytest.mark.parametrize("name", ["model_file", "export_dir"])
def test_an_unknown_checkpoint_is_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match="final, best.*'last'"):
        getattr(model_dir, name)("last")
