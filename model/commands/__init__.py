"""Every command's CLI, above every role: a module per command with its docstring (the --help
preamble), `define_flags()` and `main(argv)`, the body absl's app.run calls. What a user types
runs one of them through `launch`, from an entry point of a few lines:

evaluate       python evaluate.py: one model or an ensemble on a split; metrics, report, submission
train          python train.py: trains (or resumes) into a model_dir
predict        python -m model.predict (model/predict.py): products from JPEG files through the SavedModel
data_service   python -m model.data_service dispatcher|worker (model/data_service/__main__.py)
console        the console scripts setup.py installs (cdiscount-train, ...), which those entry points call
"""


def launch(command) -> None:
    """Runs `command`, a module of this package, as the program. Call it after
    cli.configure_environment(), before TensorFlow loads."""
    import sys

    from absl import app, flags

    command.define_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(command):  # --help lists the main module's only
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # absl's name for the main module
    sys.modules["__main__"].__doc__ = command.__doc__  # absl prints the main module's docstring
    app.run(command.main)
