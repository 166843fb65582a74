"""model/config.py: each setting declared once (its flag is made from the field), the choices it
declares are the ones the code implements, "no crop" is None below the command line, and a
train_config.json of the earlier spelling (crop_size 0) still loads."""

import dataclasses
import types

import pytest
from absl import flags

from model import cli, config


def flag_values_of(config_class, module_name="some_command"):
    values = flags.FlagValues()
    cli.define_flags(config_class, types.ModuleType(module_name), flag_values=values)
    return values


def test_the_declared_choices_are_the_implemented_ones():
    from model.evaluation import ensemble, evaluate
    from model.network import backbone, fusion
    from model.training import optimization

    assert config.BACKBONES == tuple(backbone.SPECS)
    assert config.FUSIONS == tuple(fusion.FUSIONS)
    assert config.OPTIMIZERS == tuple(optimization.OPTIMIZERS)
    assert ensemble.MEANS == config.ENSEMBLE_MEANS and evaluate.DUP_LOOKUP_LEVELS == config.DUP_LOOKUP_LEVELS


@pytest.mark.parametrize("config_class", [config.TrainConfig, config.EvalConfig])
def test_every_field_is_a_flag_of_the_same_default_with_its_help(config_class):
    values = flag_values_of(config_class)
    values(["command", "--data_dir=d", "--model_dir=m"])
    made = cli.config_from_flags(config_class, values)
    assert made == config_class(data_dir="d", model_dir="m")
    for field in dataclasses.fields(config_class):
        assert field.metadata["help"] and values[field.name].help.endswith(field.metadata["help"]), field.name
    # --help lists them under the command's own name (absl lists only the main module's flags).
    assert {flag.name for flag in values.get_key_flags_for_module("some_command")} == \
        {field.name for field in dataclasses.fields(config_class)}


def test_the_main_module_s_flags_are_filed_under_its_file_name(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])
    values = flag_values_of(config.EvalConfig, module_name="__main__")
    assert len(values.get_flags_for_module("train.py")) == len(dataclasses.fields(config.EvalConfig))


@pytest.mark.parametrize("flag", ["--crop_size=-1", "--dropout=0.95", "--epochs=0", "--backbone=resnet",
                                  "--precision=float16", "--bn_momentum=1"])
def test_bounds_and_choices_reject_at_parse_time(flag):
    values = flag_values_of(config.TrainConfig)
    with pytest.raises(flags.IllegalFlagValueError):
        values(["train.py", "--data_dir=d", "--model_dir=m", flag])


@pytest.mark.parametrize("flag,crop", [("--crop_size=0", None), ("--crop_size=160", 160), ("--image_size=180", None)])
def test_no_crop_is_none_below_the_command_line(flag, crop):
    values = flag_values_of(config.TrainConfig)
    values(["train.py", "--data_dir=d", "--model_dir=m", flag])
    assert values.crop_size == (crop or 0)  # the flag's spelling, as flags.txt keeps it
    cfg = cli.config_from_flags(config.TrainConfig, values)
    assert cfg.crop_size == crop and cfg.image == config.ImageSpec(180, crop)


def test_a_train_config_json_of_the_earlier_spelling_still_loads():
    from model.evaluation import predict
    from model.training import run_state

    earlier = {**dataclasses.asdict(config.TrainConfig(data_dir="d", model_dir="m")), "crop_size": 0}
    assert config.config_from_json(earlier).crop_size is None
    assert config.ImageSpec.from_train_json(earlier) == config.ImageSpec(180, None)
    member = predict.Member("m", "final", model=None, config={"train": earlier, "model": {}})
    assert member.image == config.ImageSpec(180, None)
    # A run saved with crop_size 0 is the same run as one of no crop: it resumes.
    assert run_state.settings_differences(earlier, config.TrainConfig(data_dir="d", model_dir="m")) == []
    assert run_state.settings_differences(earlier, config.TrainConfig(data_dir="d", model_dir="m", crop_size=160))


def test_the_model_config_takes_the_train_fields_of_its_names():
    from model.training import loop

    cfg = config.TrainConfig(data_dir="d", model_dir="m", backbone="tiny", fusion="gated", image_size=40,
                             crop_size=32, dropout=0.3, bn_momentum=0.9, flip=False, packed=False, seed=7)
    labels = types.SimpleNamespace(num_classes=5)
    model = loop.model_config(cfg, labels, {"level1": 2})
    assert (model.backbone, model.fusion, model.image_size, model.dropout, model.bn_momentum, model.flip,
            model.packed, model.seed, model.weights) == ("tiny", "gated", 32, 0.3, 0.9, False, False, 7, None)
    assert (model.num_classes, model.num_level1, model.num_level2) == (5, 2, 0)


def another_value(field):
    """A value of the field's type other than its default, inside its bounds and choices."""
    meta, default = field.metadata, field.default
    if default is None and meta.get("flag_none") is not None:  # an int whose flag writes None as 0
        return 40
    if meta.get("choices"):
        return next(choice for choice in meta["choices"] if choice != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        upper = meta.get("upper_bound")
        value = default + 1 if isinstance(default, int) else default + 0.5
        return value if upper is None or value <= upper else (default + upper) / 2
    return "given"


@pytest.mark.parametrize("config_class", [config.TrainConfig, config.EvalConfig])
def test_every_flag_given_reaches_its_field(config_class):
    values = flag_values_of(config_class)
    given = {field.name: another_value(field) for field in dataclasses.fields(config_class)
             if field.name not in ("data_dir", "model_dir")}
    argv = [f"--{name}" if value is True else f"--no{name}" if value is False else f"--{name}={value}"
            for name, value in given.items()]
    values(["command", "--data_dir=d", "--model_dir=m", *argv])
    made = cli.config_from_flags(config_class, values)
    assert {name: getattr(made, name) for name in given} == given
