"""`python evaluate.py --data_dir=DIR --model_dir=DIR --split=val|test` (docs/FORMATS.md section 4):
the command is model/commands/evaluate.py."""

if __name__ == "__main__":
    from model.commands import console

    console.evaluate()
