"""The conversion stage: each index range, in parallel, into temporary TFRecord files.

  IndexRange elements -> Reshuffle -> ConvertRange (side input: the DatasetIndex) -> RangeResults,
  collected into one list for finalize

Elements are coarse (an index range of thousands of products), because Beam's per-element cost
is paid per element, not per byte. A range writes its temporary files under tmp_dir (records/,
ids/, sizes/, digests/, rejected/), then its progress marker holding its RangeResult: a re-run of
an interrupted job takes the result from there instead of converting the range again.

A range's records of a split are written in bucket order (mix.range_order: by a hash of the
product id), not in input order, so that finalize can deal every range into every shard
(beam_convert/mix.py). So a range holds its records in memory until it ends: ~80 MB for the
default 10,000 real products.
"""

import collections
import json
import time
from typing import Optional

import apache_beam as beam
import bson
import numpy as np

import record_schema
from beam_convert import categories, files, mix, products
from beam_convert.bson_reader import CorruptBsonError, iter_documents
from beam_convert.job import (
    DIGEST_ROW, RANGE_MARKER, SPLIT_CODES, TOO_MANY_IMAGES, ConvertConfig, DatasetIndex, IndexRange, RangeResult,
    SplitFile, increment, npy_bytes, progress_marker, rejection_line, rejection_report)


class ConvertRanges(beam.PTransform):
    """IndexRanges -> a one-element PCollection holding the list of every range's RangeResult."""

    def __init__(self, config: ConvertConfig, dataset_index: beam.PCollection):
        super().__init__()
        self.config = config
        self.dataset_index = dataset_index

    def expand(self, ranges):
        return (
            ranges
            | "SpreadRanges" >> beam.Reshuffle()
            | "ConvertRange" >> beam.ParDo(ConvertRange(self.config), beam.pvalue.AsSingleton(self.dataset_index))
            | "CollectResults" >> beam.combiners.ToList()
        )


def finished_ranges(tmp_dir: str) -> int:
    """How many ranges an interrupted run left converted, ready for the same command to take up."""
    return sum(_finished_result(marker) is not None for marker in files.glob(progress_marker(tmp_dir, RANGE_MARKER)))


def _finished_result(marker: str, buckets: Optional[int] = None) -> Optional[RangeResult]:
    """The result that an earlier, interrupted run stored for a range, if its files are all there
    and in the record order this version writes (`buckets`: the job's, if known)."""
    try:
        result = RangeResult.from_json(json.loads(files.read_bytes(marker))["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(not (split_file.ids and split_file.sizes) for split_file in result.records.values()):
        return None  # a marker of a version that kept no id lists or record sizes: convert the range again
    if not result.buckets or (buckets is not None and result.buckets != buckets):
        return None  # records in input order (an earlier version), or dealt into other buckets
    if not all(files.FileSystems.exists(path) for path in result.temporary_files()):
        return None
    return result


class ConvertRange(beam.DoFn):
    """Reads one index range, validates its products, writes them to temporary TFRecords."""

    def __init__(self, config: ConvertConfig):
        self.config = config
        self._labels_for = None  # (DatasetIndex id, labels map) cached across bundles

    def _label_map(self, index: DatasetIndex) -> dict:
        if self._labels_for is None or self._labels_for[0] is not index:
            classes = self.config.categories or categories.categories_from_ids(index.category_ids_seen)
            self._labels_for = (index, categories.label_map(list(classes)))
        return self._labels_for[1]

    def process(self, index_range: IndexRange, index: DatasetIndex):
        started = time.monotonic()
        marker = progress_marker(self.config.tmp_dir, RANGE_MARKER, index_range.range_id)
        finished = _finished_result(marker, mix.bucket_count(self.config.range_size))
        if finished is not None:  # converted by an earlier run of the same job
            increment("ranges_resumed")
            for reason, count in finished.rejected.items():
                increment(reason, count)
            yield finished
            return
        result = self._convert(index_range, index)
        for split, split_file in result.records.items():
            increment(f"{split}_products", split_file.products)  # per range: a counter call costs ~20 us
        # Written last: its presence means this range's files are complete (see _finished_result).
        files.write_bytes(marker, json.dumps({
            "documents": index_range.documents, "products": result.products,
            "seconds": time.monotonic() - started, "result": result.to_json()}).encode())
        yield result

    def _convert(self, index_range: IndexRange, index: DatasetIndex) -> RangeResult:
        config = self.config
        label_map = self._label_map(index) if index_range.labelled else None
        output = _RangeOutput(config, index_range)
        with files.open_read(index_range.path) as stream:
            stream.seek(index_range.start)
            for offset, raw in iter_documents(stream, index_range.path, index_range.start, index_range.end):
                try:
                    document = bson.decode(raw)
                except Exception as error:  # noqa: BLE001 - bson raises several types
                    if not config.skip_corrupt:
                        raise CorruptBsonError(index_range.path, offset, f"invalid BSON: {error}") from None
                    output.reject(None, offset, products.CORRUPT_BSON, f"invalid BSON: {error}")
                    continue
                outcome = products.to_product(document, labels=label_map, max_images=config.max_images)
                if isinstance(outcome, products.Rejection):
                    output.reject(outcome.product_id, offset, outcome.reason, outcome.detail)
                    continue
                keeper = index.duplicate_keepers.get(outcome.product_id)
                if keeper is not None and keeper != (index_range.file_index, offset):
                    output.reject(outcome.product_id, offset, products.DUPLICATE_ID,
                                  f"_id {outcome.product_id} also at byte offset {keeper[1]} of input file "
                                  f"{keeper[0]}, kept there")
                    continue
                output.write(outcome)
        return output.finish()


class _SplitWriter:
    """A range's temporary TFRecord file of one split: its records, held until the range ends and
    then written in bucket order (mix.range_order), with their ids and sizes in that order."""

    def __init__(self, path: str, ids_path: str, sizes_path: str, buckets: int):
        self._path = path
        self._ids_path = ids_path
        self._sizes_path = sizes_path
        self._buckets = buckets
        self._frames: list[bytes] = []
        self.product_ids: list[int] = []
        self.images = 0

    def write(self, record: bytes, product_id: int, images: int) -> None:
        self._frames.append(files.tfrecord_frame(record))
        self.product_ids.append(product_id)
        self.images += images

    def close(self) -> SplitFile:
        ids = np.array(self.product_ids, np.int64)
        order = mix.range_order(ids, self._buckets)
        writer = files.BufferedWriter(self._path)
        for position in order:
            writer.write(self._frames[position])
        writer.close()
        sizes = np.array([len(frame) for frame in self._frames], np.int64)  # where finalize may cut the file
        files.write_bytes(self._ids_path, npy_bytes(ids[order]))
        files.write_bytes(self._sizes_path, npy_bytes(sizes[order]))
        self._frames = []
        return SplitFile(self._path, len(ids), self.images, self._ids_path, self._sizes_path)


class _RangeOutput:
    """What one range has written and counted so far; `finish` closes it into a RangeResult."""

    def __init__(self, config: ConvertConfig, index_range: IndexRange):
        self.config = config
        self.source = index_range.path
        self.range_id = index_range.range_id
        self.writers: dict[str, _SplitWriter] = {}
        self.rejection_lines: list[bytes] = []
        self.rejected = collections.Counter()
        self.images_per_product = collections.Counter()
        self.too_many_images = 0
        self.digest_rows: list[tuple[int, int, int]] = []
        self.buckets = mix.bucket_count(config.range_size)

    def reject(self, product_id, offset: int, reason: str, detail: str) -> None:
        self.rejection_lines.append(rejection_line(product_id, self.source, offset, reason, detail))
        self.rejected[reason] += 1
        increment(reason)

    def write(self, product: products.Product) -> None:
        config = self.config
        if product.label == record_schema.UNLABELLED:
            split = "test"
        else:
            digests = [record_schema.image_digest(image) for image in product.images]
            split = products.choose_split(products.split_key(digests), config.val_fraction)
            code = SPLIT_CODES[split]
            self.digest_rows.extend((digest, product.category_id, code) for digest in digests)
        writer = self.writers.get(split)
        if writer is None:
            path = files.join(config.tmp_dir, "records", split, f"{self.range_id}.tfrecord")
            ids_path = files.join(config.tmp_dir, "ids", split, f"{self.range_id}.npy")
            sizes_path = files.join(config.tmp_dir, "sizes", split, f"{self.range_id}.npy")
            writer = self.writers[split] = _SplitWriter(path, ids_path, sizes_path, self.buckets)
        writer.write(record_schema.encode_example(
            product.product_id, product.category_id, product.label, product.images, config.max_images),
            product.product_id, len(product.images))
        self.images_per_product[str(len(product.images))] += 1
        if product.dropped_images:
            self.too_many_images += 1
            increment(TOO_MANY_IMAGES)

    def finish(self) -> RangeResult:
        records = {split: writer.close() for split, writer in self.writers.items()}
        if self.rejection_lines:
            files.write_bytes(rejection_report(self.config.tmp_dir, self.range_id), b"".join(self.rejection_lines))
        return RangeResult(self.range_id, records, dict(self.images_per_product), dict(self.rejected),
                           self.too_many_images, self._write_digest_rows(), self.buckets)

    def _write_digest_rows(self) -> Optional[str]:
        if not self.digest_rows:
            return None
        path = files.join(self.config.tmp_dir, "digests", f"{self.range_id}.npy")
        files.write_bytes(path, npy_bytes(np.array(self.digest_rows, dtype=DIGEST_ROW)))
        return path
