"""The finalize stage: the ranges' temporary files -> the named output files, metadata.json last.

  [RangeResult] -> require a product -> move previous output aside (--overwrite) -> plan ->
  Reshuffle -> finalize tasks in parallel (shards, id lists, rejected, digests) -> labels.csv,
  metadata.json

Each split's records are put in one stream that mixes the whole input (beam_convert/mix.py:
bucket 0 of every range, in an order of its own, then bucket 1, ...), and the stream is cut into
shards of even record counts: shard k of S holds records [k*N/S, (k+1)*N/S) of the N, so shard
sizes differ by one record at most, whatever the number of ranges, and no shard is empty (S is
capped at N). A shard is copied from record intervals of the ranges' temporary files (the plan
turns them into byte intervals from the ranges' record sizes). The temporary files are only
read: they are deleted with tmp_dir after metadata.json is written, last, so a failed run never
leaves output that looks complete and a re-run converts no range again.
"""

import collections
import dataclasses
import io
import json
from typing import Iterable, Iterator, Optional

import apache_beam as beam
import numpy as np

import record_schema
from beam_convert.categories import categories_from_ids, labels_csv
from beam_convert import files, mix, products
from beam_convert.errors import NothingConverted
from beam_convert.job import (
    SPLIT_CODES, TOO_MANY_IMAGES, ConvertConfig, DatasetIndex, RangeResult, SplitFile, npy_bytes, rejection_report)
from beam_convert.output_folder import move_previous_output_aside


class RunFinalize(beam.PTransform):
    """The one-element list of RangeResults -> a one-element PCollection holding the final metadata."""

    def __init__(self, config: ConvertConfig, inputs: list[str], dataset_index: beam.PCollection):
        super().__init__()
        self.config = config
        self.inputs = inputs
        self.dataset_index = dataset_index

    def expand(self, results):
        config, inputs = self.config, self.inputs
        task_outputs = (
            results
            | "RequireProducts" >> beam.Map(
                require_products, beam.pvalue.AsSingleton(self.dataset_index), config, inputs)
            | "MovePreviousOutputAside" >> beam.Map(move_previous_output_aside, config)
            | "PlanFinalize" >> beam.FlatMap(plan_finalize, config)
            | "SpreadTasks" >> beam.Reshuffle()
            | "RunTasks" >> beam.Map(run_finalize_task)
            | "CollectTasks" >> beam.combiners.ToList()
        )
        return task_outputs | "WriteMetadata" >> beam.Map(
            write_metadata, beam.pvalue.AsSingleton(results), beam.pvalue.AsSingleton(self.dataset_index), config,
            inputs)


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
    """Joins the sources, in order, into the destination (the sources stay, for a re-run)."""

    def run(self) -> None:
        files.concatenate(self.sources, self.destination)


# One copy into a shard: bytes [start, end) of the task's source number `source`.
BYTE_PIECE = np.dtype([("source", "<i8"), ("start", "<i8"), ("end", "<i8")])


@dataclasses.dataclass(frozen=True, eq=False)
class WriteShard(FinalizeTask):
    """Copies byte intervals of the ranges' temporary files, in order, into one shard."""

    pieces: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, BYTE_PIECE))

    def run(self) -> None:
        with files.naming(self.destination), files.create(self.destination) as out:
            for source, start, end in self.pieces.tolist():
                files.copy_range(self.sources[source], start, end, out)


@dataclasses.dataclass(frozen=True, eq=False)
class JoinProductIds(FinalizeTask):
    """Writes one split's product ids in record order (the shards in name order, then record order),
    taken from the ranges' id lists as the split's stream takes their records (mix.PIECE rows,
    `source` an index in sources), so that a reader can tell which products a damaged shard lost."""

    pieces: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, mix.PIECE))

    def run(self) -> None:
        ids = [np.load(io.BytesIO(files.read_bytes(path))) for path in self.sources]
        parts = [ids[source][first:end] for source, first, end in self.pieces.tolist()]
        files.write_bytes(self.destination, npy_bytes(np.concatenate(parts or [np.zeros(0, np.int64)])))


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
    files.concatenate(files.glob(rejection_report(config.tmp_dir)), destination)
    return destination


def plan_finalize(results: list[RangeResult], config: ConvertConfig) -> Iterator[FinalizeTask]:
    """Tasks that turn temporary files into the output: one per shard and per split's id list, plus
    rejected and digests."""
    yield from _plan_splits(results, config)
    rejected_sources = files.glob(rejection_report(config.tmp_dir))
    yield ConcatFiles(tuple(rejected_sources), files.join(config.output_dir, record_schema.rejected_name()))
    digest_sources = tuple(sorted(result.digests for result in results if result.digests))
    if digest_sources:
        yield WriteDigestTable(digest_sources, files.join(config.output_dir, record_schema.IMAGE_DIGESTS_FILE))


def _load_array(path: str, length: int, what: str) -> np.ndarray:
    array = np.load(io.BytesIO(files.read_bytes(path)))
    if len(array) != length:
        raise ValueError(f"{path}: {len(array):,} {what}, the range wrote {length:,} records")
    return array


def shard_pieces(range_ids: list[str], split_files: list[SplitFile], num_shards: Optional[int],
               buckets: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One split's shards as BYTE_PIECE rows over split_files, and its stream as mix.PIECE rows.

    The stream (mix.stream_pieces) is cut into S even shards (mix.cut): S is num_shards (None: one
    per range file), at most the split's N records. Reads the ranges' id lists and record sizes.
    """
    ids = [_load_array(split_file.ids, split_file.products, "product ids") for split_file in split_files]
    stream = mix.stream_pieces(range_ids, ids, buckets)
    shards = mix.cut(stream, min(num_shards or len(split_files), sum(map(len, ids))))
    # Each range's byte offset of every record boundary, end to end in one array.
    offsets = [np.concatenate([[0], np.cumsum(_load_array(split_file.sizes, split_file.products, "record sizes"))])
               for split_file in split_files]
    base = np.concatenate([[0], np.cumsum([len(o) for o in offsets])[:-1]])
    offsets = np.concatenate(offsets)
    byte_shards = []
    for shard in shards:
        pieces = np.zeros(len(shard), BYTE_PIECE)
        pieces["source"] = shard["source"]
        pieces["start"] = offsets[base[shard["source"]] + shard["first"]]
        pieces["end"] = offsets[base[shard["source"]] + shard["end"]]
        byte_shards.append(pieces)
    return byte_shards, np.concatenate(shards)


def _plan_splits(results: list[RangeResult], config: ConvertConfig) -> Iterator[FinalizeTask]:
    """Per split: one WriteShard per shard (shard_pieces), and the JoinProductIds of its id list."""
    by_split = collections.defaultdict(list)
    for result in sorted(results, key=lambda r: r.range_id):
        for split, split_file in result.records.items():
            if split_file.products:
                by_split[split].append((result.range_id, split_file))
    buckets = mix.bucket_count(config.range_size)
    for split, entries in sorted(by_split.items()):
        range_ids = [range_id for range_id, _ in entries]
        split_files = [split_file for _, split_file in entries]
        shards, stream = shard_pieces(range_ids, split_files, config.num_shards, buckets)
        for shard, pieces in enumerate(shards):
            used, pieces["source"] = np.unique(pieces["source"], return_inverse=True)  # only its own sources
            destination = files.join(config.output_dir, record_schema.shard_name(split, shard, len(shards)))
            yield WriteShard(tuple(split_files[n].path for n in used), destination, pieces)
        yield JoinProductIds(tuple(split_file.ids for split_file in split_files),
                             files.join(config.output_dir, record_schema.product_ids_name(split)), stream)


def run_finalize_task(task: FinalizeTask) -> Optional[SplitOverlap]:
    return task.run()


def write_digest_table(sources: Iterable[str], destination: str) -> SplitOverlap:
    """Train image digest -> category ids with counts (the duplicate-image lookup at evaluation).

    npz arrays `digest` (int64, record_schema.image_digest of the JPEG bytes), `category_id`
    (int64) and `count` (int64), one row per distinct (digest, category_id), sorted by both.
    """
    rows = np.concatenate([np.load(io.BytesIO(files.read_bytes(path))) for path in sources])
    train = rows[rows["split"] == SPLIT_CODES["train"]]
    pairs, counts = np.unique(np.stack([train["digest"], train["category_id"]], axis=1), axis=0, return_counts=True)
    buffer = io.BytesIO()
    np.savez(buffer, digest=pairs[:, 0].astype(np.int64), category_id=pairs[:, 1].astype(np.int64),
             count=counts.astype(np.int64))
    files.write_bytes(destination, buffer.getvalue())
    train_digests = np.unique(train["digest"])
    val_digests = np.unique(rows[rows["split"] == SPLIT_CODES["val"]]["digest"])
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
        shards = files.glob_with_sizes(files.join(output_dir, record_schema.shard_pattern(split)))
        splits[split]["shards"] = len(shards)
        splits[split][record_schema.SHARD_FILES] = shard_files(shards, splits[split]["products"])
    return dict(sorted(splits.items()))


def shard_files(shards: list[tuple[str, int]], records: int) -> dict:
    """metadata.json's {shard name: {"records", "bytes"}} of one split's (path, size) shards, in name
    order: shard k of S holds records [k*N/S, (k+1)*N/S) of the split's N (the plan's even cut)."""
    count = len(shards)
    return {path.rsplit("/", 1)[-1]: {"records": (k + 1) * records // count - k * records // count, "bytes": size}
            for k, (path, size) in enumerate(shards)}


def _unframed(index: DatasetIndex) -> Optional[dict]:
    """What --skip_corrupt skipped where no document could be framed (null: nothing)."""
    if index.unframed is None:
        return None
    return {"bytes": index.unframed.lost_bytes, "spans": index.unframed.spans,
            "estimated_documents": index.unframed.estimated_documents(index.documents)}


def write_metadata(task_outputs: list[Optional[SplitOverlap]], results: list[RangeResult], index: DatasetIndex,
                   config: ConvertConfig, inputs: list[str]) -> dict:
    categories = list(config.categories or categories_from_ids(index.category_ids_seen))
    files.write_bytes(files.join(config.output_dir, record_schema.LABELS_FILE),
                      labels_csv(categories).encode())
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
        "unframed_bson": _unframed(index),
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
