"""The model side: TFRecords in, a trained classifier out. Packages by role, bottom to top:

errors, config, model_dir   what every role may use: the user error, the run's settings, model_dir's file names
atomic, signals             files written whole or not at all; SIGINT/SIGTERM as requests to stop
input_pipeline              a beam_convert folder -> batches of decoded image stacks (create_dataset)
network                     backbone, fusion under the mask, the multi-image model
export, data_service        the SavedModel that serves raw JPEG bytes; the training stream on tf.data service workers
training, evaluation        the train loop and what it needs; predictions, metrics, report, submission
cli                         what train.py and evaluate.py share before TensorFlow loads

A module imports its own role and the roles below it (tests/test_layout.py).
"""
