"""The Beam graph: index each BSON file, convert index ranges in parallel, then finalize.

Over 400 lines: one Beam graph, index -> convert -> finalize, whose stages share the dataclasses that cross them; the finalize stage is the candidate to move out next.

  files -> IndexFile -> ranges ---------> Reshuffle -> ConvertRange -> range results
                     \\-> file summaries -> dataset index (side input: labels, duplicate ids)
  range results -> require a product -> move previous output aside -> plan -> Reshuffle ->
                   finalize tasks (shards, rejected, digests) -> labels.csv, metadata.json

Elements are coarse (an index range of thousands of products), because Beam's per-element cost
is paid per element, not per byte. Every range writes its own temporary files under
`output_dir/_tmp-RUN/`, and a progress marker holding its RangeResult once they are complete, so
that a re-run of an interrupted job skips it. Finalizing renames (or concatenates) the temporary
files into the named shards and writes metadata.json last, so a failed run never leaves output
that looks complete.
"""

import collections
import dataclasses
import io
import json
import time
from typing import Iterable, Iterator, Optional

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


class NothingConverted(Exception):
    """The input gave no product. An error, so that an empty data set never looks like a finished one."""


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """The conversion's options; its defaults are the defaults of `python -m beam_convert`."""

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


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """One range's temporary TFRecord file of one split, what it holds, and its product ids."""

    path: str
    products: int
    images: int
    ids: str = ""  # temporary .npy of the records' product ids, in record order ("" in older markers)


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """What converting one index range produced: temporary files and counts.

    Also stored as JSON in the range's progress marker, so that a re-run of an interrupted job
    can take it from there instead of converting the range again.
    """

    range_id: str
    records: dict[str, SplitFile]  # by split
    images_per_product: dict[str, int]  # str(image count) -> products: JSON keys are strings
    rejected: dict[str, int]  # reason -> products
    too_many_images: int  # products converted without the pictures beyond max_images
    digests: Optional[str] = None  # temporary .npy of _DIGEST_ROW rows; None without labelled products

    @property
    def products(self) -> int:
        return sum(split_file.products for split_file in self.records.values())

    def temporary_files(self) -> list[str]:
        paths = [path for split_file in self.records.values() for path in (split_file.path, split_file.ids)]
        return [path for path in paths + [self.digests] if path]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RangeResult":
        return cls(
            range_id=data["range_id"],
            records={split: SplitFile(**split_file) for split, split_file in data["records"].items()},
            images_per_product=data["images_per_product"],
            rejected=data["rejected"],
            too_many_images=data["too_many_images"],
            digests=data.get("digests"),  # markers of earlier versions leave it out when there is none
        )


# Progress markers in tmp_dir/progress/: one per input file indexed, one per range converted (which
# also stores the range's result). __main__ adds up their "documents" to print progress.
INDEX_MARKER = "index"
RANGE_MARKER = "range"


def progress_marker(tmp_dir: str, kind: str, name: str = "*") -> str:
    """The marker of one indexed file or converted range; with the default name, the glob of a kind."""
    return files.join(tmp_dir, "progress", f"{kind}-{name}.json")


def _rejection_report(tmp_dir: str, name: str = "*") -> str:
    """A temporary rejection report (one per range, one per file cut short); "*": the glob of all."""
    return files.join(tmp_dir, "rejected", f"{name}.jsonl")


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
            progress_marker(self.config.tmp_dir, INDEX_MARKER, f"{file_index:05d}"),
            json.dumps({"path": path, "documents": summary.documents}).encode(),
        )
        yield beam.pvalue.TaggedOutput(self.SUMMARY, summary)

    def _reject_rest_of_file(self, error: CorruptBsonError, file_index: int) -> None:
        _count(products.CORRUPT_BSON)
        files.write_bytes(
            _rejection_report(self.config.tmp_dir, f"{file_index:05d}-index"),
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


def finished_ranges(tmp_dir: str) -> int:
    """How many ranges an interrupted run left converted, ready for the same command to take up."""
    return sum(_finished_result(marker) is not None for marker in files.glob(progress_marker(tmp_dir, RANGE_MARKER)))


def _finished_result(marker: str) -> Optional[RangeResult]:
    """The result that an earlier, interrupted run stored for a range, if its files are all there."""
    try:
        result = RangeResult.from_json(json.loads(files.read_bytes(marker))["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(not split_file.ids for split_file in result.records.values()):
        return None  # a marker of a version that kept no id lists: convert the range again
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
            categories = self.config.categories or labels.categories_from_ids(index.category_ids_seen)
            self._labels_for = (index, labels.label_map(list(categories)))
        return self._labels_for[1]

    def process(self, index_range: IndexRange, index: DatasetIndex):
        started = time.monotonic()
        marker = progress_marker(self.config.tmp_dir, RANGE_MARKER, index_range.range_id)
        finished = _finished_result(marker)
        if finished is not None:  # converted by an earlier run of the same job
            _count("ranges_resumed")
            for reason, count in finished.rejected.items():
                _count(reason, count)
            yield finished
            return
        result = self._convert(index_range, index)
        for split, split_file in result.records.items():
            _count(f"{split}_products", split_file.products)  # per range: a counter call costs ~20 us
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
    """A range's temporary TFRecord file of one split, open for writing, and its counts."""

    def __init__(self, path: str, ids_path: str):
        self._writer = files.BufferedWriter(path)
        self._ids_path = ids_path
        self.product_ids: list[int] = []
        self.images = 0

    def write(self, record: bytes, product_id: int, images: int) -> None:
        self._writer.write(files.tfrecord_frame(record))
        self.product_ids.append(product_id)
        self.images += images

    def close(self) -> SplitFile:
        self._writer.close()
        files.write_bytes(self._ids_path, _npy_bytes(np.array(self.product_ids, np.int64)))
        return SplitFile(self._writer.path, len(self.product_ids), self.images, self._ids_path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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

    def reject(self, product_id, offset: int, reason: str, detail: str) -> None:
        self.rejection_lines.append(rejection_line(product_id, self.source, offset, reason, detail))
        self.rejected[reason] += 1
        _count(reason)

    def write(self, product: products.Product) -> None:
        config = self.config
        if product.label == record_schema.UNLABELLED:
            split = "test"
        else:
            digests = [record_schema.image_digest(image) for image in product.images]
            split = products.choose_split(products.split_key(digests), config.val_fraction)
            code = _SPLIT_CODES[split]
            self.digest_rows.extend((digest, product.category_id, code) for digest in digests)
        writer = self.writers.get(split)
        if writer is None:
            path = files.join(config.tmp_dir, "records", split, f"{self.range_id}.tfrecord")
            ids_path = files.join(config.tmp_dir, "ids", split, f"{self.range_id}.npy")
            writer = self.writers[split] = _SplitWriter(path, ids_path)
        writer.write(record_schema.encode_example(
            product.product_id, product.category_id, product.label, product.images, config.max_images),
            product.product_id, len(product.images))
        self.images_per_product[str(len(product.images))] += 1
        if product.dropped_images:
            self.too_many_images += 1
            _count(TOO_MANY_IMAGES)

    def finish(self) -> RangeResult:
        records = {split: writer.close() for split, writer in self.writers.items()}
        if self.rejection_lines:
            files.write_bytes(_rejection_report(self.config.tmp_dir, self.range_id), b"".join(self.rejection_lines))
        return RangeResult(self.range_id, records, dict(self.images_per_product), dict(self.rejected),
                           self.too_many_images, self._write_digest_rows())

    def _write_digest_rows(self) -> Optional[str]:
        if not self.digest_rows:
            return None
        path = files.join(self.config.tmp_dir, "digests", f"{self.range_id}.npy")
        files.write_bytes(path, _npy_bytes(np.array(self.digest_rows, dtype=_DIGEST_ROW)))
        return path


# --- finalize -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitOverlap:
    """How many distinct images each side of the split has, and how many both (metadata.json)."""

    train_distinct_images: int
    val_distinct_images: int
    images_on_both_sides: int


@dataclasses.dataclass(frozen=True)
class FinalizeTask:
    """Turns temporary files into one output file; the tasks run in parallel."""

    sources: tuple[str, ...]
    destination: str

    def run(self) -> Optional[SplitOverlap]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ConcatFiles(FinalizeTask):
    """Joins the sources, in order, into the destination: a rename when there is one."""

    def run(self) -> None:
        if len(self.sources) == 1:
            files.FileSystems.rename(list(self.sources), [self.destination])
            return
        files.concatenate(self.sources, self.destination)
        files.delete(list(self.sources))


@dataclasses.dataclass(frozen=True)
class JoinProductIds(FinalizeTask):
    """Joins the ranges' product id lists of one split, in the shards' order: the split's ids in
    record order, so that a reader can tell which products a damaged shard lost."""

    def run(self) -> None:
        ids = [np.load(io.BytesIO(files.read_bytes(path))) for path in self.sources]
        files.write_bytes(self.destination, _npy_bytes(np.concatenate(ids or [np.zeros(0, np.int64)])))
        files.delete(list(self.sources))


@dataclasses.dataclass(frozen=True)
class WriteDigestTable(FinalizeTask):
    """Turns the ranges' temporary digest rows into the output's image digest table."""

    def run(self) -> SplitOverlap:
        return write_digest_table(self.sources, self.destination)


def require_products(results: list[RangeResult], index: DatasetIndex, config: ConvertConfig,
                     inputs: list[str]) -> list[RangeResult]:
    """Passes the ranges' results on if they hold a product, else stops the job with one line.

    Runs before the previous output is touched, so an empty --overwrite run leaves it as it was.
    The finished ranges stay in tmp_dir: the same command fails again at once, without converting.
    """
    if any(result.products for result in results):
        return results
    source = describe_inputs(inputs)
    rejected = collections.Counter()
    for result in results:
        rejected.update(result.rejected)
    rejected[products.CORRUPT_BSON] += index.corrupt_rejections
    rejected = +rejected  # drops the zero count
    if not rejected:
        files.delete_tree(config.tmp_dir)  # nothing in it worth keeping
        raise NothingConverted(f"{source}: 0 products: the input has no document")
    report = keep_rejection_report(config)
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in rejected.most_common())
    raise NothingConverted(f"{source}: 0 products: every one of {sum(rejected.values()):,} documents was "
                           f"rejected ({reasons}), see {report}")


def describe_inputs(paths: list[str]) -> str:
    """The input files, for a message; a long glob's list is cut short."""
    if len(paths) <= 2:
        return ", ".join(paths)
    return f"{paths[0]} and {len(paths) - 1:,} more input files"


def keep_rejection_report(config: ConvertConfig) -> str:
    """Puts the rejection report of a run that converted nothing where the user can read it.

    It goes into tmp_dir, not output_dir: a failed run adds nothing to output_dir (which may hold
    an earlier conversion that --overwrite must not disturb). The ranges' own reports are copied,
    not moved, so the finished ranges stay whole.
    """
    destination = files.join(config.tmp_dir, record_schema.rejected_name())
    files.concatenate(files.glob(_rejection_report(config.tmp_dir)), destination)
    return destination


# --overwrite: the earlier conversion waits in tmp_dir/previous/ until the new one is in place.
_PREVIOUS_OUTPUT = "previous"
_MOVED_ASIDE = "moved-aside"  # written once every earlier file is in previous/


def output_files(output_dir: str) -> list[str]:
    """The files of a conversion in output_dir (docs/FORMATS.md section 1)."""
    patterns = [record_schema.METADATA_FILE, record_schema.LABELS_FILE, record_schema.IMAGE_DIGESTS_FILE,
                record_schema.rejected_pattern()]
    patterns += [record_schema.shard_pattern(split) for split in record_schema.SPLITS]
    patterns += [record_schema.product_ids_name(split) for split in record_schema.SPLITS]
    return [path for pattern in patterns for path in files.glob(files.join(output_dir, pattern))]


def _move(paths: list[str], folder: str) -> None:
    if paths:
        files.make_folder(folder)
        files.FileSystems.rename(paths, [files.join(folder, path.rsplit("/", 1)[-1]) for path in paths])


def _split_off_metadata(paths: list[str]) -> tuple[list[str], list[str]]:
    """([metadata.json] if it is among paths, else []; the other paths)."""
    metadata = [path for path in paths if path.rsplit("/", 1)[-1] == record_schema.METADATA_FILE]
    return metadata, [path for path in paths if path not in metadata]


def move_previous_output_aside(results: list[RangeResult], config: ConvertConfig) -> list[RangeResult]:
    """Moves an earlier conversion (--overwrite) into tmp_dir/previous/, metadata.json first so
    that output_dir never looks complete.

    Takes and passes on every range's result so that it runs once all ranges are converted: a run
    that fails before then leaves the earlier output where it was. write_metadata deletes it with
    tmp_dir once the new output is complete; if finalizing fails, restore_previous_output puts it
    back.
    """
    aside = files.join(config.tmp_dir, _PREVIOUS_OUTPUT)
    if files.FileSystems.exists(files.join(aside, _MOVED_ASIDE)):  # a retry of this step
        return results
    metadata, others = _split_off_metadata(output_files(config.output_dir))
    _move(metadata, aside)
    _move(others, aside)
    files.write_bytes(files.join(aside, _MOVED_ASIDE), b"")
    return results


def restore_previous_output(output_dir: str, tmp_dir: str) -> bool:
    """Puts back an earlier conversion that a failed or killed --overwrite run had moved aside.

    Does nothing when there is none, or when the new conversion is complete (its metadata.json is
    in place). Returns whether it put one back.
    """
    aside = files.join(tmp_dir, _PREVIOUS_OUTPUT)
    exists = files.FileSystems.exists
    if not exists(files.join(aside, record_schema.METADATA_FILE)) or exists(
            files.join(output_dir, record_schema.METADATA_FILE)):
        return False
    if exists(files.join(aside, _MOVED_ASIDE)):  # then output_dir holds the new output's beginning
        files.delete(output_files(output_dir))
    metadata, others = _split_off_metadata(output_files(aside))
    _move(others, output_dir)
    _move(metadata, output_dir)  # last: output_dir looks complete only once everything is back
    files.delete_tree(aside)
    return True


def plan_finalize(results: list[RangeResult], config: ConvertConfig) -> Iterator[FinalizeTask]:
    """Tasks that turn temporary files into the output: one per shard and per split's id list, plus
    rejected and digests."""
    yield from _plan_shards(results, config)
    ids = collections.defaultdict(list)
    for result in sorted(results, key=lambda r: r.range_id):  # the shards' order
        for split, split_file in result.records.items():
            ids[split].append(split_file.ids)
    for split, sources in sorted(ids.items()):
        yield JoinProductIds(tuple(sources), files.join(config.output_dir, record_schema.product_ids_name(split)))
    rejected_sources = files.glob(_rejection_report(config.tmp_dir))
    yield ConcatFiles(tuple(rejected_sources), files.join(config.output_dir, record_schema.rejected_name()))
    digest_sources = tuple(sorted(result.digests for result in results if result.digests))
    if digest_sources:
        yield WriteDigestTable(digest_sources, files.join(config.output_dir, record_schema.IMAGE_DIGESTS_FILE))


def _plan_shards(results: list[RangeResult], config: ConvertConfig) -> Iterator[ConcatFiles]:
    """Each split's range files, in range order, cut into num_shards consecutive groups."""
    by_split = collections.defaultdict(list)
    for result in sorted(results, key=lambda r: r.range_id):
        for split, split_file in result.records.items():
            by_split[split].append(split_file.path)
    for split, paths in sorted(by_split.items()):
        count = config.num_shards or len(paths)
        for shard in range(count):
            group = paths[shard * len(paths) // count : (shard + 1) * len(paths) // count]
            destination = files.join(config.output_dir, record_schema.shard_name(split, shard, count))
            yield ConcatFiles(tuple(group), destination)


def run_finalize_task(task: FinalizeTask) -> Optional[SplitOverlap]:
    return task.run()


def write_digest_table(sources: Iterable[str], destination: str) -> SplitOverlap:
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
    return SplitOverlap(
        train_distinct_images=int(len(train_digests)),
        val_distinct_images=int(len(val_digests)),
        images_on_both_sides=int(len(np.intersect1d(train_digests, val_digests))),
    )


def _split_totals(results: list[RangeResult], output_dir: str) -> dict:
    """split -> products, images and shards, in split order."""
    splits = collections.defaultdict(lambda: {"products": 0, "images": 0, "shards": 0})
    for result in results:
        for split, split_file in result.records.items():
            splits[split]["products"] += split_file.products
            splits[split]["images"] += split_file.images
    for split in splits:
        splits[split]["shards"] = len(files.glob(files.join(output_dir, record_schema.shard_pattern(split))))
    return dict(sorted(splits.items()))


def write_metadata(task_outputs: list[Optional[SplitOverlap]], results: list[RangeResult], index: DatasetIndex,
                   config: ConvertConfig, inputs: list[str]) -> dict:
    categories = list(config.categories or labels.categories_from_ids(index.category_ids_seen))
    files.write_bytes(files.join(config.output_dir, record_schema.LABELS_FILE), labels.labels_csv(categories).encode())
    images_per_product = collections.Counter()
    rejected = collections.Counter()
    for result in results:
        images_per_product.update(result.images_per_product)
        rejected.update(result.rejected)
    if index.corrupt_rejections:
        rejected[products.CORRUPT_BSON] += index.corrupt_rejections
    overlap = next((output for output in task_outputs if output is not None), None)
    metadata = {
        "schema_version": record_schema.SCHEMA_VERSION,
        "num_classes": len(categories),
        "max_images": config.max_images,
        "splits": _split_totals(results, config.output_dir),
        "images_per_product": {k: images_per_product[k] for k in sorted(images_per_product, key=int)},
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        TOO_MANY_IMAGES: sum(result.too_many_images for result in results),
        "documents": index.documents,
        "inputs": inputs,
        "labelled_inputs": sorted(index.labelled_files),
        "categories": "file" if config.categories else "seen in the data",
        "val_fraction": config.val_fraction,
        "split_key": "smallest image digest of the product (beam_convert/products.py: split_key)",
        "image_digests": record_schema.IMAGE_DIGESTS_FILE if overlap is not None else None,
        "split_overlap": dataclasses.asdict(overlap) if overlap is not None else None,
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
        | "RequireProducts" >> beam.Map(require_products, beam.pvalue.AsSingleton(dataset_index), config, inputs)
        | "MovePreviousOutputAside" >> beam.Map(move_previous_output_aside, config)
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
