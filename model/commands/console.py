"""The console scripts setup.py installs: each runs one command of this package as the program,
as `python train.py`, `python evaluate.py`, `python -m model.predict` and `python -m
model.data_service` do (those entry points call these)."""

import importlib


def _run(name: str) -> None:
    from model import cli

    cli.configure_environment()  # before TensorFlow loads: it reads these at import
    from model.commands import launch

    launch(importlib.import_module(f"model.commands.{name}"))


def train() -> None:
    """cdiscount-train"""
    _run("train")


def evaluate() -> None:
    """cdiscount-evaluate"""
    _run("evaluate")


def predict() -> None:
    """cdiscount-predict"""
    _run("predict")


def data_service() -> None:
    """cdiscount-data-service"""
    _run("data_service")
