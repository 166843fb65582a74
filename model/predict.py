"""`python -m model.predict` (docs/FORMATS.md section 4): the command is model/commands/predict.py."""

if __name__ == "__main__":
    from model import cli

    cli.configure_environment()  # before TensorFlow loads: it reads these at import
    from model.commands import launch, predict

    launch(predict)
