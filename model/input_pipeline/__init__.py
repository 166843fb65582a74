"""The input side on one host: a beam_convert output folder -> batches of decoded image stacks.

`create_dataset` (docs/FORMATS.md section 3), in dataset, is the public entry point; decode
parses and decodes a batch of records (training, evaluation and serving alike); `data_folder`
reads the folder's metadata and splits, `shards` checks them, `labels` reads labels.csv.
"""

from model.input_pipeline.dataset import create_dataset

__all__ = ["create_dataset"]
