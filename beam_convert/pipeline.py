"""The Beam graph: index each BSON file, convert index ranges in parallel, then finalize.

  IndexFiles     files -> index ranges, and the dataset index (labels, duplicate ids) as a side input
  ConvertRanges  index ranges -> Reshuffle -> temporary TFRecords per range -> [RangeResult]
  RunFinalize    [RangeResult] -> named shards, id lists, rejected, digests, labels.csv, metadata.json

One module per stage (index.py, convert.py, finalize.py), their shared types in job.py; the
labels above are the stages the Dataflow console shows.
"""

import apache_beam as beam

from beam_convert.convert import ConvertRanges
from beam_convert.finalize import RunFinalize
from beam_convert.index import IndexFiles
from beam_convert.job import ConvertConfig


def build(pipeline: beam.Pipeline, inputs: list[str], config: ConvertConfig) -> beam.PCollection:
    """Adds the conversion to `pipeline`; returns the PCollection holding the final metadata."""
    ranges, dataset_index = pipeline | "IndexFiles" >> IndexFiles(inputs, config)
    results = ranges | "ConvertRanges" >> ConvertRanges(config, dataset_index)
    return results | "RunFinalize" >> RunFinalize(config, inputs, dataset_index)
