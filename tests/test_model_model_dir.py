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


def test_a_run_folder_gives_the_path_of_each_of_its_files():
    run = model_dir.RunFolder("gs://bucket/runs/a")
    assert (run.flags_file, run.config_file, run.state_file, run.labels_file) == (
        "gs://bucket/runs/a/flags.txt", "gs://bucket/runs/a/train_config.json", "gs://bucket/runs/a/train_state.json",
        "gs://bucket/runs/a/labels.csv")
    assert (run.model_file, run.best_file, run.best_score_file) == (
        "gs://bucket/runs/a/model.keras", "gs://bucket/runs/a/best.keras", "gs://bucket/runs/a/best.json")
    assert (run.backup, run.logs, run.lock_file) == (
        "gs://bucket/runs/a/backup", "gs://bucket/runs/a/logs", "gs://bucket/runs/a/run.lock")
    assert (run.model(), run.model("best"), run.export(), run.export("best")) == (
        run.model_file, run.best_file, "gs://bucket/runs/a/export", "gs://bucket/runs/a/export_best")
    assert run.eval_dir("val") == "gs://bucket/runs/a/eval_val"
    assert run.worker_dir("worker", 1) == "gs://bucket/runs/a/workers/worker_1"
    with pytest.raises(ValueError, match="'last'"):
        run.export("last")
