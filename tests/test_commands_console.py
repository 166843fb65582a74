"""The console scripts setup.py installs (README "Commands"): each is its command, under its own
name, from any folder. Their --help runs as subprocesses (all at once), since only an installed
script shows that the installation is right."""

import importlib
import os
import re
import subprocess
import sys

import pytest

from tests.record_helpers import REPO

SCRIPTS = {
    "cdiscount-convert": ("beam_convert.__main__", "run", "--output_dir"),
    "cdiscount-train": ("model.commands.console", "train", "--flagfile"),
    "cdiscount-evaluate": ("model.commands.console", "evaluate", "--ensemble_weights"),
    "cdiscount-predict": ("model.commands.console", "predict", "Exit status: 0 when every product was answered; 1 when any was"),
    "cdiscount-data-service": ("model.commands.console", "data_service", "dispatcher"),
}


def declared_scripts() -> dict:
    with open(os.path.join(REPO, "setup.py")) as f:
        text = f.read()
    return {name: (module, function) for name, module, function in
            re.findall(r'"([\w-]+) = ([\w.]+):(\w+)"', text)}


def test_setup_declares_a_script_for_every_command_and_each_names_a_function():
    assert declared_scripts() == {name: (module, function) for name, (module, function, _) in SCRIPTS.items()}
    for module, function, _ in SCRIPTS.values():
        assert callable(getattr(importlib.import_module(module), function)), (module, function)


def test_every_console_script_helps_from_another_folder(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    missing = [name for name in SCRIPTS if not os.path.exists(os.path.join(bin_dir, name))]
    if missing:
        pytest.fail(f"not installed in {bin_dir}: {missing}; run `pip install -e .` (make does)")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    running = {name: subprocess.Popen([os.path.join(bin_dir, name), "--help"], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in SCRIPTS}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert "Traceback" not in err, err[-3000:]
        assert process.returncode in (0, 1), err[-3000:]  # absl's --help exits 1; argparse's 0
        assert SCRIPTS[name][2] in out, out[-2000:]
        if name == "cdiscount-predict":
            assert "--product" in out and "--checkpoint" in out
    assert os.listdir(tmp_path) == []  # --help writes nothing
