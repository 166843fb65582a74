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
from beam_convert.bson_reader import CorruptBsonError, iter_documents, peek_keys, resync
from beam_convert.job import (
    INDEX_MARKER, ConvertConfig, DatasetIndex, FileSummary, IndexRange, UnframedBson, increment, progress_marker,
    rejection_line, rejection_report)


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
        ranges = []  # [start, end, documents] of each range: range_size documents, cut at a skipped span
        with files.open_read(path) as stream:
            for offset, document, after_gap in self._documents(stream, summary):
                if after_gap or not ranges or ranges[-1][2] == self.config.range_size:
                    ranges.append([offset, offset, 0])
                ranges[-1][1:] = offset + len(document), ranges[-1][2] + 1
                keys = peek_keys(document)
                if keys.product_id is not None:
                    ids.append(keys.product_id)
                    offsets.append(offset)
                if keys.category_id is not None:
                    summary.labelled_documents += 1
                    summary.category_ids.add(keys.category_id)
                summary.documents += 1
                summary.framed_bytes += len(document)
        summary.product_ids = np.asarray(ids, dtype=np.int64)
        summary.offsets = np.asarray(offsets, dtype=np.int64)
        for start, end, count in ranges:
            yield IndexRange(path, file_index, start, end, count, summary.labelled)
        files.write_bytes(
            progress_marker(self.config.tmp_dir, INDEX_MARKER, f"{file_index:05d}"),
            json.dumps({"path": path, "documents": summary.documents}).encode(),
        )
        yield beam.pvalue.TaggedOutput(self.SUMMARY, summary)

    def _documents(self, stream, summary: FileSummary):
        """(offset, document, whether bytes were skipped just before it) of each framed document.
        A document that cannot be framed raises, or with --skip_corrupt is reported and read past
        (bson_reader.resync): one line a skipped span, in the file's own rejection report."""
        start, after_gap, report = 0, False, []
        try:
            while True:
                try:
                    for offset, document in iter_documents(stream, summary.path, start):
                        yield offset, document, after_gap
                        after_gap = False
                    return
                except CorruptBsonError as error:
                    if not self.config.skip_corrupt:
                        raise
                    span = resync(stream, error.offset)
                    report.append(self._rejected(error, span, summary))
                    if span.rest_of_file:
                        return
                    stream.seek(span.end)
                    start, after_gap = span.end, True
        finally:
            if report:
                files.write_bytes(rejection_report(self.config.tmp_dir, f"{summary.file_index:05d}-index"),
                                  b"".join(report))

    @staticmethod
    def _rejected(error: CorruptBsonError, span, summary: FileSummary) -> bytes:
        increment(products.CORRUPT_BSON)
        summary.corrupt_rejections += 1
        if not span.one_document:
            summary.unframed_bytes += span.end - span.start
            summary.unframed_spans += 1
        return rejection_line(span.product_id, error.path, error.offset, products.CORRUPT_BSON,
                              span.describe(error.reason))


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
    lost = sum(s.unframed_bytes for s in summaries)
    unframed = UnframedBson(lost, sum(s.unframed_spans for s in summaries),
                            sum(s.framed_bytes for s in summaries)) if lost else None
    return DatasetIndex(labelled, tuple(sorted(seen)), keepers, sum(s.documents for s in summaries),
                        sum(s.corrupt_rejections for s in summaries), unframed)
