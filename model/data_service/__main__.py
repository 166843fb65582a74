"""`python -m model.data_service dispatcher|worker` (docs/DATA_SERVICE.md): the command is
model/commands/data_service.py."""

if __name__ == "__main__":
    from model import cli

    cli.configure_environment()  # before TensorFlow loads: quiet C++ logs, the pooling allocator
    from model.commands import data_service, launch

    launch(data_service)
