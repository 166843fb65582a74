"""`python train.py --flagfile=configs/cpu_tiny.flags --data_dir=DIR --model_dir=DIR` (docs/FORMATS.md
section 4): the command is model/commands/train.py."""

if __name__ == "__main__":
    from model.commands import console

    console.train()
