"""The model side: TFRecords in, a trained classifier out. Packages by role, bottom to top:

errors, config, model_dir   what every role may use: the user error, the run's settings, model_dir's file names
atomic, signals             files written whole or not at all; SIGINT/SIGTERM as requests to stop
input_pipeline              a beam_convert folder -> batches of decoded image stacks (create_dataset)
network                     backbone, fusion under the mask, the multi-image model
export, data_service        the SavedModel that serves raw JPEG bytes; the training stream on tf.data service workers
training, evaluation        the train loop and what it needs; predictions, metrics, report, submission
cli                         what train.py and evaluate.py share before TensorFlow loads
predict                     python -m model.predict: runs commands/predict (products' JPEG files through the export)
commands                    every command's CLI (flags, main); model/predict.py and data_service/__main__.py run one

The roles and the rule between them (a module imports its own role and the roles below it) are
MODEL_LAYERS in tests/test_layout.py, which also checks that these docstrings name every module.
"""
