"""Input beyond one host's CPUs: the training pipeline on tf.data service workers. The package
stands above the input pipeline it distributes (a worker runs `create_dataset`'s
`sources.service_splits` source under dynamic sharding).

stream: `distribute`, what a trainer calls; probe: the dispatcher's state, over plain gRPC;
launchers: the dispatcher and worker processes, which `python -m model.data_service dispatcher|worker`
starts (its flags and main: model/commands/data_service.py; __main__ hands it to commands.launch).
The design and its measured effects: docs/DATA_SERVICE.md.
"""
