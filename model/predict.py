"""`python -m model.predict` (docs/FORMATS.md section 4): the command is model/commands/predict.py."""

if __name__ == "__main__":
    from model.commands import console

    console.predict()
