"""`python -m model.data_service dispatcher|worker` (docs/DATA_SERVICE.md): the command is
model/commands/data_service.py."""

if __name__ == "__main__":
    from model.commands import console

    console.data_service()
