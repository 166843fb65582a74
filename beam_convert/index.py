"""The index stage: scan each BSON file for document boundaries, cut them into ranges.

  (file_index, path) -> IndexFile -> IndexRange elements (to the conversion)
                                 \\-> FileSummary per file -> DatasetIndex (one element: labelled
                                     files, categories seen, which occurrence of a repeated _id is kept)

BSON has no sync markers: a reader dropped at a byte offset cannot find the next document, so each
file is read once, sequentially, reading only each document's length, `_id` and `category_id`.
"""

import json

import apache_beam as beam
import numpy as np

from beam_convert import files, products
from beam_convert.bson_reader import CorruptBsonError, iter_documents, peek_keys
from beam_convert.job import (
    INDEX_MARKER, ConvertConfig, DatasetIndex, FileSummary, IndexRange, increment, progress_marker, rejection_line,
    rejection_report)


class IndexFiles(beam.PTransform):
    """The input files -> (their IndexRanges, a one-element PCollection holding the DatasetIndex)."""

    def __init__(self, inputs: list[str], config: ConvertConfig):
        super().__init__()
        self.inputs = inputs
        self.config = config

    def expand(self, pipeline):
        indexed = (
            pipeline
            | "ListFiles" >> beam.Create(list(enumerate(self.inputs)))
            | "ScanFiles" >> beam.ParDo(IndexFile(self.config)).with_outputs(IndexFile.SUMMARY, main="ranges")
        )
        dataset_index = (
            indexed[IndexFile.SUMMARY]
            | "CollectSummaries" >> beam.combiners.ToList()
            | "BuildDatasetIndex" >> beam.Map(build_dataset_index)
        )
        return indexed.ranges, dataset_index


class IndexFile(beam.DoFn):
    """Scans one BSON file for document boundaries; emits ranges, and its summary on a side tag."""

    SUMMARY = "summary"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def process(self, element: tuple[int, str]):
        file_index, path = element
        summary = FileSummary(path, file_index)
        ids, offsets = [], []
        boundaries = []  # (start, documents) of each range
        end = 0
        with files.open_read(path) as stream:
            documents = iter_documents(stream, path)
            while True:
                try:
                    offset, document = next(documents)
                except StopIteration:
                    break
                except CorruptBsonError as error:
                    if not self.config.skip_corrupt:
                        raise
                    # No sync markers: nothing after a broken length prefix can be framed.
                    self._reject_rest_of_file(error, file_index)
                    summary.corrupt_rejections += 1
                    break
                if summary.documents % self.config.range_size == 0:
                    boundaries.append(offset)
                keys = peek_keys(document)
                if keys.product_id is not None:
                    ids.append(keys.product_id)
                    offsets.append(offset)
                if keys.category_id is not None:
                    summary.labelled_documents += 1
                    summary.category_ids.add(keys.category_id)
                summary.documents += 1
                end = offset + len(document)
        summary.product_ids = np.asarray(ids, dtype=np.int64)
        summary.offsets = np.asarray(offsets, dtype=np.int64)
        labelled = summary.labelled
        for number, start in enumerate(boundaries):
            range_end = boundaries[number + 1] if number + 1 < len(boundaries) else end
            count = min(self.config.range_size, summary.documents - number * self.config.range_size)
            yield IndexRange(path, file_index, start, range_end, count, labelled)
        files.write_bytes(
            progress_marker(self.config.tmp_dir, INDEX_MARKER, f"{file_index:05d}"),
            json.dumps({"path": path, "documents": summary.documents}).encode(),
        )
        yield beam.pvalue.TaggedOutput(self.SUMMARY, summary)

    def _reject_rest_of_file(self, error: CorruptBsonError, file_index: int) -> None:
        increment(products.CORRUPT_BSON)
        files.write_bytes(
            rejection_report(self.config.tmp_dir, f"{file_index:05d}-index"),
            rejection_line(None, error.path, error.offset, products.CORRUPT_BSON, error.reason + "; rest of file skipped"),
        )


def build_dataset_index(summaries: list[FileSummary]) -> DatasetIndex:
    labelled = frozenset(s.path for s in summaries if s.labelled)
    seen = set()
    for summary in summaries:
        if summary.path in labelled:
            seen |= summary.category_ids
    ids = np.concatenate([s.product_ids for s in summaries] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([s.offsets for s in summaries] or [np.zeros(0, np.int64)])
    file_indices = np.concatenate(
        [np.full(len(s.product_ids), s.file_index, np.int64) for s in summaries] or [np.zeros(0, np.int64)]
    )
    order = np.lexsort((offsets, file_indices, ids))
    ids, offsets, file_indices = ids[order], offsets[order], file_indices[order]
    repeated = np.flatnonzero(ids[1:] == ids[:-1]) + 1  # positions of second and later occurrences
    first_of = {}
    for position in repeated:
        keeper = position - 1
        while keeper in first_of:  # the run's first occurrence
            keeper = first_of[keeper]
        first_of[position] = keeper
    keepers = {int(ids[k]): (int(file_indices[k]), int(offsets[k])) for k in set(first_of.values())}
    return DatasetIndex(labelled, tuple(sorted(seen)), keepers, sum(s.documents for s in summaries),
                        sum(s.corrupt_rejections for s in summaries))
