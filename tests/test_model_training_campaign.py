"""What a run takes from earlier ones: its seed (drawn once, then recorded), the stream settings a
resume may change, and --init_from's weights (model.training.run_state, model.training.init_from).

In-process on tiny models built and saved here: no training."""

import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest

import record_schema
from model import model_dir as model_dir_lib
from model.config import TrainConfig
from model.errors import UserError
from model.input_pipeline import labels as labels_lib
from model.network import multi_image
from model.training import init_from, run_state
from tests.record_helpers import write_data_dir

# ---------------------------------------------------------------------------------------------
# The seed


def _saved_config(model_dir, **train):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, model_dir_lib.CONFIG_FILE), "w") as f:
        json.dump({"train": {**vars(TrainConfig(data_dir="d", model_dir=str(model_dir))), **train},
                   "replicas": train.pop("replicas", 1)}, f)


def test_a_given_seed_is_kept(tmp_path):
    cfg, origin = run_state.resolve_seed(str(tmp_path), TrainConfig(data_dir="d", model_dir=str(tmp_path), seed=5))
    assert (cfg.seed, origin) == (5, "given")


def test_seed_0_draws_a_new_seed_then_takes_the_recorded_one(tmp_path):
    fresh = TrainConfig(data_dir="d", model_dir=str(tmp_path))
    drawn = {run_state.resolve_seed(str(tmp_path), fresh)[0].seed for _ in range(5)}
    assert len(drawn) == 5 and all(0 < seed < 2 ** 31 for seed in drawn)  # a new one each time: none recorded
    _saved_config(tmp_path, seed=1234)
    cfg, origin = run_state.resolve_seed(str(tmp_path), fresh)
    assert cfg.seed == 1234 and origin.startswith("recorded in ")


def test_seed_0_under_several_workers_is_the_same_on_each(tmp_path):
    fresh = TrainConfig(data_dir="d", model_dir=str(tmp_path))
    seeds = {run_state.resolve_seed(path, fresh, multi_worker=True)[0].seed
             for path in (str(tmp_path), str(tmp_path) + "/", str(tmp_path) + "/.")}
    assert len(seeds) == 1
    assert run_state.resolve_seed(str(tmp_path / "other"), fresh, multi_worker=True)[0].seed not in seeds


def test_stream_changes_name_what_a_resume_changed(tmp_path):
    _saved_config(tmp_path, seed=3, shuffle_buffer=2048, replicas=2)
    cfg = TrainConfig(data_dir="d", model_dir=str(tmp_path), seed=3, shuffle_buffer=4096)
    assert run_state.stream_changes(str(tmp_path), cfg, replicas=2) == ["shuffle_buffer 2048 -> 4096"]
    assert run_state.stream_changes(str(tmp_path), cfg, replicas=4) == ["shuffle_buffer 2048 -> 4096", "replicas 2 -> 4"]
    assert run_state.stream_changes(str(tmp_path / "none"), cfg, replicas=4) == []


# ---------------------------------------------------------------------------------------------
# --init_from


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data_dir(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def labels(data):
    """The sample data's classes and tree (labels.csv)."""
    return labels_lib.read_labels(data)


def _model(labels, image_size=32, backbone="tiny"):
    return multi_image.build_model(multi_image.ModelConfig(
        num_classes=labels.num_classes, num_level1=len(labels.level1_names), num_level2=len(labels.level2_names),
        image_size=image_size, backbone=backbone, seed=1))


@pytest.fixture
def source_dir(tmp_path, data, labels):
    """A model_dir as train.py leaves it: model.keras, best.keras and labels.csv."""
    folder = tmp_path / "source"
    folder.mkdir()
    model = _model(labels)
    model.save(folder / model_dir_lib.MODEL_FILE)
    model.save(folder / model_dir_lib.BEST_FILE)
    shutil.copy(os.path.join(data, record_schema.LABELS_FILE), folder / record_schema.LABELS_FILE)
    return folder


def _same(a, b):
    return len(a.weights) == len(b.weights) and all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("name", [None, model_dir_lib.BEST_FILE])
def test_init_from_a_model_dir_or_a_keras_file_at_another_image_size_copies_every_layer(source_dir, labels, name):
    source = keras.models.load_model(source_dir / (name or model_dir_lib.MODEL_FILE), compile=False)
    target = _model(labels, image_size=48)
    assert not _same(target.get_layer("image_encoder"), source.get_layer("image_encoder"))
    logged = []
    done = init_from.initialise(target, str(source_dir / name) if name else str(source_dir),
                                labels, log=logged.append)
    assert done["initialised"] == [] and set(done["copied"]) == {"image_encoder", "category", "level1", "level2"}
    for layer in done["copied"]:
        assert _same(target.get_layer(layer), source.get_layer(layer)), layer
    assert logged[0].startswith("Initialised from ")


def test_init_from_a_model_of_other_classes_reinitialises_the_heads_and_says_so(source_dir, labels):
    path = source_dir / record_schema.LABELS_FILE  # the same classes, two swapped: other categories
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1], rows[2][1] = rows[2][1], rows[1][1]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert not init_from.same_classes(str(source_dir / model_dir_lib.MODEL_FILE), labels)
    target, logged = _model(labels), []
    before = target.get_layer("category").get_weights()
    done = init_from.initialise(target, str(source_dir), labels, log=logged.append)
    assert done["copied"] == ["image_encoder"] and set(done["initialised"]) == {"category", "level1", "level2"}
    assert all(np.array_equal(a, b) for a, b in zip(target.get_layer("category").get_weights(), before))
    assert "Left freshly initialised: " in logged[1] and "class list differs" in logged[1]


@pytest.mark.parametrize("path, message", [
    ("missing", "--init_from={path}: no {path}/model.keras (a model_dir whose training finished)"),
    ("missing/best.keras", "--init_from={path}: no {path}"),
])
def test_init_from_a_missing_path_is_one_line(tmp_path, path, message):
    path = str(tmp_path / path)
    with pytest.raises(UserError) as error:
        init_from.source_file(path)
    assert str(error.value) == message.format(path=path)


def test_init_from_another_backbone_is_refused(labels, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    _model(labels, image_size=71, backbone="xception").save(other / model_dir_lib.MODEL_FILE)
    with pytest.raises(UserError, match="its image encoder does not fit this one"):
        init_from.initialise(_model(labels), str(other), labels, log=lambda line: None)


@pytest.mark.parametrize("keep", [0, 3000, -100])  # bytes kept: none, the first 3000, all but the last 100
def test_a_keras_file_cut_short_is_named_damaged_wherever_it_is_loaded(source_dir, labels, tmp_path, keep):
    """Issue 28 item 3: Keras called a truncated or 0-byte .keras "File not found" (a 30-line
    traceback). --init_from, evaluate.py's models (ensemble members) and best.keras at the end of a
    (resumed) run all load through keras_file.load."""
    from model.evaluation import predict
    from model.network import keras_file

    cut = tmp_path / "cut"
    shutil.copytree(source_dir, cut)
    (cut / model_dir_lib.CONFIG_FILE).write_text("{}")
    whole = (source_dir / model_dir_lib.MODEL_FILE).read_bytes()
    (cut / model_dir_lib.MODEL_FILE).write_bytes(whole[:keep])
    path = str(cut / model_dir_lib.MODEL_FILE)
    expected = f"{path} is damaged: not a whole .keras file (cut short, or empty?); copy it again or train it again"
    target = _model(labels)
    for load in (lambda: init_from.initialise(target, path, labels, log=lambda line: None),
                 lambda: init_from.initialise(target, str(cut), labels, log=lambda line: None),
                 lambda: predict.load_model(str(cut)),
                 lambda: keras_file.load(path)):
        with pytest.raises(UserError) as error:
            load()
        assert str(error.value) == expected
    assert keras_file.is_whole(str(source_dir / model_dir_lib.MODEL_FILE))
