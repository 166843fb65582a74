"""The input side on one host: a beam_convert output folder -> batches of decoded image stacks.

`create_dataset` (docs/FORMATS.md section 3) is the public entry point: `dataset` holds it and
the tail every stream shares (batch, parse and decode, options, prefetch), `sources` the records
it starts from (evaluation, shuffled, seeded passes, tf.data service splits) and `StreamStart`,
`decode` the parse and decode; `data_folder` reads the folder's metadata and splits, `shards`
checks them, `labels` reads labels.csv.
"""

from model.input_pipeline.dataset import create_dataset
from model.input_pipeline.sources import StreamStart

__all__ = ["create_dataset", "StreamStart"]
