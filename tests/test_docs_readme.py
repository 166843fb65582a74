"""The README's commands run as written.

Every command of the README's ```bash blocks is either run here, in README order, or listed in
SKIPPED with the reason it cannot run on this machine (no network, no cloud, no GPU, a server
that never exits). A command added to the README is therefore run by this test, or fails it until
it is listed; a listed command that left the README fails it too.

How the commands run unchanged: in a temporary folder laid out like this checkout (its files and
folders linked, `.venv` the running interpreter's environment, `data/` a fresh folder holding the
sample files), in which the files the Kaggle download leaves are stood in for by the sample
data under the names the README uses: `train.bson` (and `cdiscount/train.bson`) is
data/train_example.bson, the first 82 products of the real train.bson; `test.bson` the same
products without their category, as test.bson has none; `category_names.csv` the real one. The
README's relative output folders (`data/train`, `runs/tiny`, `tfrecords/train`, ...) are then
temporary folders. PYTHONPATH names this checkout, so its code is what runs.
"""

import os
import pathlib
import subprocess
import sys

import bson
import pytest

import demo
from tests import test_docs_readme_paths as readme

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "train_example.bson"
CATEGORIES = REPO / "data" / "category_names.csv"

NETWORK = "downloads from PyPI or Kaggle: no network here"
KAGGLE = "Kaggle's API (network and an API token): not here"
CLOUD = "Google Cloud (gs://, Dataflow): not here; tests/test_convert_run.py builds the Dataflow job with --dry_run=True"
DOWNLOAD = "works on the downloaded zip (skipped): the test stands the sample files in for what it unpacks"
GPU_RUN = "needs runs/xception, made by the 8-GPU training (skipped)"

# The README's commands that do not run here (normalised: readme.Command.key), and why.
SKIPPED = {
    "make demo": "the demo (4-5 minutes, `make demo` is its own check); its steps are sections 1-3's "
                 "commands, which run here",
    "make test": "the whole test suite, this test included",
    "python -m beam_convert --input=gs://BUCKET/train.bson --output_dir=gs://BUCKET/tfrecords/train "
    "--categories=gs://BUCKET/category_names.csv --runner=DataflowRunner --project=PROJECT --region=REGION "
    "--temp_location=gs://BUCKET/tmp --setup_file=./setup.py": CLOUD,
    ".venv/bin/tensorboard --logdir=runs/tiny/logs": "a server that does not exit",
    "python3 -m venv .venv": "creates the environment this test already runs in (and " + NETWORK + ")",
    "CDISCOUNT_TENSORFLOW=tensorflow[and-cuda] .venv/bin/pip install -c constraints.txt -e .": NETWORK + "; TensorFlow's CUDA build",
    ".venv/bin/pip install kaggle": NETWORK,
    ".venv/bin/kaggle competitions download -c cdiscount-image-classification-challenge -p cdiscount": KAGGLE,
    "unzip cdiscount/cdiscount-image-classification-challenge.zip -d cdiscount": DOWNLOAD,
    "rm cdiscount/cdiscount-image-classification-challenge.zip": DOWNLOAD,
    ".venv/bin/python train.py --flagfile=configs/xception_gpu.flags --data_dir=tfrecords/train "
    "--model_dir=runs/xception": "8 GPUs and the ImageNet weights (a download); the same code path trains "
                                 "in section 2's tiny command, which runs here",
    ".venv/bin/python evaluate.py --data_dir=tfrecords/train --model_dir=runs/xception --split=val": GPU_RUN,
    ".venv/bin/python evaluate.py --data_dir=tfrecords/test --model_dir=runs/xception --split=test": GPU_RUN,
    ".venv/bin/kaggle competitions submit -c cdiscount-image-classification-challenge "
    "-f runs/xception/eval_test/submission.csv -m xception mean_max, configs/xception_gpu.flags": KAGGLE,
    "gsutil -m cp cdiscount/train.bson cdiscount/test.bson cdiscount/category_names.csv gs://BUCKET/cdiscount/": CLOUD,
    ".venv/bin/python -m beam_convert --input=gs://BUCKET/cdiscount/train.bson "
    "--output_dir=gs://BUCKET/tfrecords/train --categories=gs://BUCKET/cdiscount/category_names.csv "
    "--runner=DataflowRunner --project=PROJECT --region=REGION --temp_location=gs://BUCKET/tmp "
    "--setup_file=./setup.py": CLOUD,
    ".venv/bin/python -m beam_convert --input=gs://BUCKET/cdiscount/test.bson "
    "--output_dir=gs://BUCKET/tfrecords/test --runner=DataflowRunner --project=PROJECT --region=REGION "
    "--temp_location=gs://BUCKET/tmp --setup_file=./setup.py": CLOUD,
    "gsutil -m cp -r gs://BUCKET/tfrecords .": CLOUD,
    'TF_CONFIG={"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, "task": {"type": "worker", '
    '"index": 0}} python train.py --flagfile=configs/xception_gpu.flags --data_dir=gs://BUCKET/tfrecords/train '
    "--model_dir=gs://BUCKET/runs/x2": "two hosts with 8 GPUs each and gs://; tests/test_model_training_multi_worker.py runs "
                                       "two workers on one host",
    "python -m model.data_service dispatcher --port=5050 --work_dir=/var/lib/data_service/run1":
        "a server that does not exit (tests/test_model_data_service.py starts and stops one)",
    "python -m model.data_service worker --dispatcher=DISPATCHER_HOST:5050 --port=5051":
        "a server that does not exit, and DISPATCHER_HOST is another machine",
    "python train.py --flagfile=configs/xception_gpu.flags --data_dir=gs://BUCKET/tfrecords/train "
    "--model_dir=gs://BUCKET/runs/x1 --data_service=grpc://DISPATCHER_HOST:5050": "GPUs, gs:// and a remote "
                                                                                   "dispatcher",
}

# README "Beyond one run": the commands demo.py runs, as written, on its own output.
DEMO = "runs on make demo's output (demo_output/); demo.py runs this very command (checked below)"
BEYOND_ONE_RUN = [".venv/bin/python " + command for command in demo.BEYOND_ONE_RUN]
SKIPPED.update({command: DEMO for command in BEYOND_ONE_RUN})

# Inside the temporary checkout: what the Kaggle download and unzip would leave, under the
# names the README's commands read.
TRAIN_BSON = ("train.bson", "cdiscount/train.bson")
TEST_BSON = ("test.bson", "cdiscount/test.bson")
CATEGORY_FILES = ("category_names.csv", "cdiscount/category_names.csv")
NOT_LINKED = {".git", ".venv", "data", "runs", "tfrecords", "cdiscount", "demo_output", "__pycache__"}

COMMANDS = readme.readme_commands()


def unlabelled_sample() -> bytes:
    with open(SAMPLE, "rb") as f:
        documents = list(bson.decode_file_iter(f))
    return b"".join(bson.encode({k: v for k, v in doc.items() if k != "category_id"}) for doc in documents)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("readme_checkout")
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith(".pytest"):
            (root / entry.name).symlink_to(entry)
    if sys.prefix != sys.base_prefix:  # a virtual environment: .venv/bin/python, pip, tensorboard
        (root / ".venv").symlink_to(sys.prefix)
    else:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (root / "data").mkdir()
    for entry in (REPO / "data").iterdir():
        if entry.is_file():
            (root / "data" / entry.name).symlink_to(entry)
    (root / "cdiscount").mkdir()
    unlabelled = unlabelled_sample()
    for name in TRAIN_BSON:
        (root / name).write_bytes(SAMPLE.read_bytes())
    for name in TEST_BSON:
        (root / name).write_bytes(unlabelled)
    for name in CATEGORY_FILES:
        (root / name).write_bytes(CATEGORIES.read_bytes())
    return root


def expected_outputs(command: readme.Command) -> list[str]:
    """Files the command must have written, relative to the checkout."""
    if command.program == "beam_convert":
        return [f"{command.option('output_dir')}/metadata.json"]
    if command.program == "train.py":
        return [f"{command.option('model_dir')}/model.keras", f"{command.option('model_dir')}/export"]
    if command.program == "evaluate.py":
        split = command.option("split") or "val"
        folder = command.option("output_dir") or f"{command.option('model_dir')}/eval_{split}"
        return [f"{folder}/metrics.json"] + ([f"{folder}/submission.csv"] if split == "test" else [])
    return []


def test_the_beyond_one_run_commands_are_the_demos():
    """The README section's block is demo.BEYOND_ONE_RUN, in order: what the README shows is
    what `make demo` runs."""
    section = [c.key for c in COMMANDS if c.section.startswith("Beyond one run")]
    assert section == BEYOND_ONE_RUN


def test_every_skipped_command_is_in_the_readme():
    keys = {command.key for command in COMMANDS}
    stale = [key for key in SKIPPED if key not in keys]
    assert not stale, f"listed as skipped but no longer in the README: {stale}"


def test_the_readme_runs_commands_here():
    """The run below is more than a list of skips: each section with sample-data commands has some."""
    ran = [c for c in COMMANDS if c.key not in SKIPPED]
    assert {c.program for c in ran} >= {"beam_convert", "train.py", "evaluate.py"}
    assert len(ran) >= 6


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}:{c.program}" for c in COMMANDS])
def test_readme_command(command, checkout):
    if command.key in SKIPPED:
        pytest.skip(SKIPPED[command.key])
    env = {**os.environ, "PATH": f"{checkout / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(["bash", "-c", command.text], cwd=checkout, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (
        f"README line {command.line}: exit status {result.returncode}\n$ {command.text}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    missing = [path for path in expected_outputs(command) if not (checkout / path).exists()]
    assert not missing, f"README line {command.line}: {command.key} wrote no {missing}"
