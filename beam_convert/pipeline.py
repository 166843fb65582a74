"""The Beam graph: index each BSON file, convert index ranges in parallel, then finalize.

  files -> IndexFile -> ranges ---------> Reshuffle -> ConvertRange -> range results
                     \\-> file summaries -> dataset index (side input: labels, duplicate ids)
  range results -> plan -> Reshuffle -> finalize tasks (shards, rejected, digests) -> metadata.json

Elements are coarse (an index range of thousands of products), because Beam's per-element cost
is paid per element, not per byte. Every range writes its own temporary files under
`output_dir/_tmp-RUN/`; finalizing renames (or concatenates) them into the named shards and
writes metadata.json last, so a failed run never leaves output that looks complete.
"""

import collections
import dataclasses
import io
import json
import time
from typing import Iterable, Optional

import apache_beam as beam
import bson
import numpy as np
from apache_beam.metrics import Metrics

import record_schema
from beam_convert import files, labels, products
from beam_convert.bson_reader import CorruptBsonError, iter_documents, peek_keys

METRICS_NAMESPACE = "beam_convert"
TOO_MANY_IMAGES = "too_many_images"
_DIGEST_ROW = np.dtype([("digest", "<i8"), ("category_id", "<i8"), ("split", "u1")])
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    output_dir: str
    tmp_dir: str
    max_images: int = record_schema.MAX_IMAGES
    val_fraction: float = 0.05
    num_shards: Optional[int] = None  # per split; None: one shard per index range
    skip_corrupt: bool = False
    range_size: int = 10_000  # products per index range
    categories: Optional[tuple[labels.Category, ...]] = None  # from --categories


@dataclasses.dataclass(frozen=True)
class IndexRange:
    path: str
    file_index: int
    start: int
    end: int
    documents: int
    labelled: bool

    @property
    def range_id(self) -> str:
        return f"{self.file_index:05d}-{self.start:015d}"


@dataclasses.dataclass
class FileSummary:
    path: str
    file_index: int
    documents: int = 0
    labelled_documents: int = 0
    category_ids: set = dataclasses.field(default_factory=set)
    product_ids: np.ndarray = None
    offsets: np.ndarray = None
    corrupt_rejections: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """What every range needs to know about all the input: the side input of ConvertRange."""

    labelled_files: frozenset
    category_ids_seen: tuple  # in labelled files, sorted
    duplicate_keepers: dict  # product_id -> (file_index, offset) of the occurrence that is kept
    documents: int
    corrupt_rejections: int  # documents the index scan could not frame (--skip_corrupt)


def _count(name: str, value: int = 1) -> None:
    Metrics.counter(METRICS_NAMESPACE, name).inc(value)


def rejection_line(product_id, source: str, offset: int, reason: str, detail: str) -> bytes:
    record = {"_id": product_id, "source": source, "offset": offset, "reason": reason, "detail": detail}
    return (json.dumps(record) + "\n").encode()


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
        labelled = summary.labelled_documents > 0
        for number, start in enumerate(boundaries):
            range_end = boundaries[number + 1] if number + 1 < len(boundaries) else end
            count = min(self.config.range_size, summary.documents - number * self.config.range_size)
            yield IndexRange(path, file_index, start, range_end, count, labelled)
        files.write_bytes(
            files.join(self.config.tmp_dir, "progress", f"index-{file_index:05d}.json"),
            json.dumps({"path": path, "documents": summary.documents}).encode(),
        )
        yield beam.pvalue.TaggedOutput(self.SUMMARY, summary)

    def _reject_rest_of_file(self, error: CorruptBsonError, file_index: int) -> None:
        _count(products.CORRUPT_BSON)
        files.write_bytes(
            files.join(self.config.tmp_dir, "rejected", f"{file_index:05d}-index.jsonl"),
            rejection_line(None, error.path, error.offset, products.CORRUPT_BSON, error.reason + "; rest of file skipped"),
        )


def build_dataset_index(summaries: list[FileSummary]) -> DatasetIndex:
    labelled = frozenset(s.path for s in summaries if s.labelled_documents)
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


def _finished_result(marker: str) -> Optional[dict]:
    """The result of a range converted by an earlier, interrupted run, if its files are all there."""
    try:
        result = json.loads(files.read_bytes(marker))["result"]
    except (OSError, ValueError, KeyError):
        return None
    paths = [counts["path"] for counts in result["records"].values()] + [result.get("digests")]
    if not all(files.FileSystems.exists(path) for path in paths if path):
        return None
    return result


class ConvertRange(beam.DoFn):
    """Reads one index range, validates its products, writes them to temporary TFRecords."""

    def __init__(self, config: ConvertConfig):
        self.config = config
        self._labels_for = None  # (DatasetIndex id, labels map) cached across bundles

    def _label_map(self, index: DatasetIndex) -> dict:
        if self._labels_for is None or self._labels_for[0] is not index:
            categories = self.config.categories or labels.categories_from_ids(index.category_ids_seen)
            self._labels_for = (index, labels.label_map(list(categories)))
        return self._labels_for[1]

    def process(self, index_range: IndexRange, index: DatasetIndex):
        started = time.monotonic()
        config = self.config
        marker = files.join(config.tmp_dir, "progress", f"range-{index_range.range_id}.json")
        finished = _finished_result(marker)
        if finished is not None:  # converted by an earlier run of the same job
            _count("ranges_resumed")
            for reason, count in finished["rejected"].items():
                _count(reason, count)
            yield finished
            return
        label_map = self._label_map(index) if index_range.labelled else None
        range_id = index_range.range_id
        writers: dict[str, files.BufferedWriter] = {}
        rejected: list[bytes] = []
        digest_rows: list[tuple[int, int, int]] = []
        result = {
            "range_id": range_id,
            "records": {},  # split -> {"path", "products", "images"}
            "images_per_product": collections.Counter(),
            "rejected": collections.Counter(),
            TOO_MANY_IMAGES: 0,
        }

        def reject(product_id, offset, reason, detail):
            rejected.append(rejection_line(product_id, index_range.path, offset, reason, detail))
            result["rejected"][reason] += 1
            _count(reason)

        with files.open_read(index_range.path) as stream:
            stream.seek(index_range.start)
            for offset, raw in iter_documents(stream, index_range.path, index_range.start, index_range.end):
                try:
                    document = bson.decode(raw)
                except Exception as error:  # noqa: BLE001 - bson raises several types
                    if not config.skip_corrupt:
                        raise CorruptBsonError(index_range.path, offset, f"invalid BSON: {error}") from None
                    reject(None, offset, products.CORRUPT_BSON, f"invalid BSON: {error}")
                    continue
                outcome = products.to_product(document, labels=label_map, max_images=config.max_images)
                if isinstance(outcome, products.Rejection):
                    reject(outcome.product_id, offset, outcome.reason, outcome.detail)
                    continue
                keeper = index.duplicate_keepers.get(outcome.product_id)
                if keeper is not None and keeper != (index_range.file_index, offset):
                    reject(outcome.product_id, offset, products.DUPLICATE_ID,
                           f"_id {outcome.product_id} also at byte offset {keeper[1]} of input file {keeper[0]}, kept there")
                    continue
                self._write(outcome, writers, result, digest_rows, range_id)
        for writer in writers.values():
            writer.close()
        if rejected:
            files.write_bytes(files.join(config.tmp_dir, "rejected", f"{range_id}.jsonl"), b"".join(rejected))
        if digest_rows:
            rows = np.array(digest_rows, dtype=_DIGEST_ROW)
            buffer = io.BytesIO()
            np.save(buffer, rows)
            path = files.join(config.tmp_dir, "digests", f"{range_id}.npy")
            files.write_bytes(path, buffer.getvalue())
            result["digests"] = path
        for split, counts in result["records"].items():
            _count(f"{split}_products", counts["products"])  # per range: a counter call costs ~20 us
        converted = sum(r["products"] for r in result["records"].values())
        # Written last: its presence means this range's files are complete (see _finished_result).
        files.write_bytes(marker, json.dumps({
            "documents": index_range.documents, "products": converted,
            "seconds": time.monotonic() - started, "result": result}).encode())
        yield result

    def _write(self, product: products.Product, writers, result, digest_rows, range_id) -> None:
        config = self.config
        if product.label == record_schema.UNLABELLED:
            split = "test"
        else:
            digests = [record_schema.image_digest(image) for image in product.images]
            split = products.choose_split(products.split_key(digests), config.val_fraction)
            code = _SPLIT_CODES[split]
            digest_rows.extend((digest, product.category_id, code) for digest in digests)
        writer = writers.get(split)
        if writer is None:
            path = files.join(config.tmp_dir, "records", split, f"{range_id}.tfrecord")
            writer = writers[split] = files.BufferedWriter(path)
            result["records"][split] = {"path": path, "products": 0, "images": 0}
        writer.write(files.tfrecord_frame(record_schema.encode_example(
            product.product_id, product.category_id, product.label, product.images, config.max_images)))
        counts = result["records"][split]
        counts["products"] += 1
        counts["images"] += len(product.images)
        result["images_per_product"][str(len(product.images))] += 1  # str: the result goes through JSON
        if product.dropped_images:
            result[TOO_MANY_IMAGES] += 1
            _count(TOO_MANY_IMAGES)


# --- finalize -----------------------------------------------------------------------------------

def plan_finalize(results: list[dict], config: ConvertConfig) -> Iterable[tuple]:
    """Tasks that turn temporary files into the output: one per shard, plus rejected and digests."""
    _delete_previous_output(config.output_dir)
    by_split = collections.defaultdict(list)
    for result in sorted(results, key=lambda r: r["range_id"]):
        for split, counts in result["records"].items():
            by_split[split].append(counts["path"])
    for split, paths in sorted(by_split.items()):
        count = config.num_shards or len(paths)
        for shard in range(count):
            group = paths[shard * len(paths) // count : (shard + 1) * len(paths) // count]
            destination = files.join(config.output_dir, record_schema.shard_name(split, shard, count))
            yield ("concat", tuple(group), destination)
    rejected_sources = files.glob(files.join(config.tmp_dir, "rejected", "*.jsonl"))
    yield ("concat", tuple(rejected_sources), files.join(config.output_dir, record_schema.shard_name("rejected", 0, 1, "jsonl")))
    digest_sources = sorted(r["digests"] for r in results if "digests" in r)
    if digest_sources:
        yield ("digests", tuple(digest_sources), files.join(config.output_dir, record_schema.IMAGE_DIGESTS_FILE))


def _delete_previous_output(output_dir: str) -> None:
    """Removes an earlier run's output (--overwrite), metadata.json first so it never looks whole."""
    patterns = [record_schema.METADATA_FILE, record_schema.LABELS_FILE, record_schema.IMAGE_DIGESTS_FILE,
                "rejected-*-of-*.jsonl"] + [record_schema.shard_pattern(split) for split in record_schema.SPLITS]
    for pattern in patterns:
        files.delete(files.glob(files.join(output_dir, pattern)))


def run_finalize_task(task: tuple) -> dict:
    kind, sources, destination = task
    if kind == "digests":
        return {"digests": write_digest_table(sources, destination)}
    if len(sources) == 1:
        files.FileSystems.rename(list(sources), [destination])
    else:
        with files.create(destination) as out:
            for source in sources:
                with files.open_read(source) as f:
                    while chunk := f.read(files.BufferedWriter.FLUSH_BYTES):
                        out.write(chunk)
        files.delete(list(sources))
    return {}


def write_digest_table(sources: Iterable[str], destination: str) -> dict:
    """Train image digest -> category ids with counts (the duplicate-image lookup at evaluation).

    npz arrays `digest` (int64, record_schema.image_digest of the JPEG bytes), `category_id`
    (int64) and `count` (int64), one row per distinct (digest, category_id), sorted by both.
    """
    rows = np.concatenate([np.load(io.BytesIO(files.read_bytes(path))) for path in sources])
    train = rows[rows["split"] == _SPLIT_CODES["train"]]
    pairs, counts = np.unique(np.stack([train["digest"], train["category_id"]], axis=1), axis=0, return_counts=True)
    buffer = io.BytesIO()
    np.savez(buffer, digest=pairs[:, 0].astype(np.int64), category_id=pairs[:, 1].astype(np.int64),
             count=counts.astype(np.int64))
    files.write_bytes(destination, buffer.getvalue())
    train_digests = np.unique(train["digest"])
    val_digests = np.unique(rows[rows["split"] == _SPLIT_CODES["val"]]["digest"])
    return {
        "train_distinct_images": int(len(train_digests)),
        "val_distinct_images": int(len(val_digests)),
        "images_on_both_sides": int(len(np.intersect1d(train_digests, val_digests))),
    }


def write_metadata(task_outputs: list[dict], results: list[dict], index: DatasetIndex,
                   config: ConvertConfig, inputs: list[str]) -> dict:
    categories = list(config.categories or labels.categories_from_ids(index.category_ids_seen))
    files.write_bytes(files.join(config.output_dir, record_schema.LABELS_FILE), labels.labels_csv(categories).encode())
    splits = collections.defaultdict(lambda: {"products": 0, "images": 0, "shards": 0})
    images_per_product = collections.Counter()
    rejected = collections.Counter()
    too_many = 0
    for result in results:
        for split, counts in result["records"].items():
            splits[split]["products"] += counts["products"]
            splits[split]["images"] += counts["images"]
        images_per_product.update(result["images_per_product"])
        rejected.update(result["rejected"])
        too_many += result[TOO_MANY_IMAGES]
    if index.corrupt_rejections:
        rejected[products.CORRUPT_BSON] += index.corrupt_rejections
    for split in splits:
        splits[split]["shards"] = len(files.glob(files.join(config.output_dir, record_schema.shard_pattern(split))))
    digests = next((t["digests"] for t in task_outputs if "digests" in t), None)
    metadata = {
        "schema_version": record_schema.SCHEMA_VERSION,
        "num_classes": len(categories),
        "max_images": config.max_images,
        "splits": dict(sorted(splits.items())),
        "images_per_product": {k: images_per_product[k] for k in sorted(images_per_product, key=int)},
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        TOO_MANY_IMAGES: too_many,
        "documents": index.documents,
        "inputs": inputs,
        "labelled_inputs": sorted(index.labelled_files),
        "categories": "file" if config.categories else "seen in the data",
        "val_fraction": config.val_fraction,
        "split_key": "smallest image digest of the product (beam_convert/products.py: split_key)",
        "image_digests": (record_schema.IMAGE_DIGESTS_FILE if digests else None),
        "split_overlap": digests,
    }
    # Last, so that its presence means the output is complete.
    files.write_bytes(files.join(config.output_dir, record_schema.METADATA_FILE),
                      (json.dumps(metadata, indent=2) + "\n").encode())
    files.delete_tree(config.tmp_dir)
    return metadata


def build(pipeline: beam.Pipeline, inputs: list[str], config: ConvertConfig) -> beam.PCollection:
    """Adds the conversion to `pipeline`; returns the PCollection holding the final metadata."""
    indexed = (
        pipeline
        | "ListFiles" >> beam.Create(list(enumerate(inputs)))
        | "IndexFiles" >> beam.ParDo(IndexFile(config)).with_outputs(IndexFile.SUMMARY, main="ranges")
    )
    dataset_index = (
        indexed[IndexFile.SUMMARY]
        | "CollectSummaries" >> beam.combiners.ToList()
        | "BuildDatasetIndex" >> beam.Map(build_dataset_index)
    )
    results = (
        indexed.ranges
        | "SpreadRanges" >> beam.Reshuffle()
        | "ConvertRanges" >> beam.ParDo(ConvertRange(config), beam.pvalue.AsSingleton(dataset_index))
        | "CollectResults" >> beam.combiners.ToList()
    )
    task_outputs = (
        results
        | "PlanFinalize" >> beam.FlatMap(plan_finalize, config)
        | "SpreadTasks" >> beam.Reshuffle()
        | "RunFinalize" >> beam.Map(run_finalize_task)
        | "CollectTasks" >> beam.combiners.ToList()
    )
    return task_outputs | "WriteMetadata" >> beam.Map(
        write_metadata,
        beam.pvalue.AsSingleton(results),
        beam.pvalue.AsSingleton(dataset_index),
        config,
        inputs,
    )
