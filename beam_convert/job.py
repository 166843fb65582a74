"""The job's plain types, which cross its stages, and the layout of its temporary folder.

  ConvertConfig   the options of one conversion (defaults: those of `python -m beam_convert`)
  IndexRange      a run of documents of one input file: the unit of parallel work
  FileSummary     what indexing one file found; DatasetIndex: all of them, the side input of the
                  conversion and of finalize; UnframedBson: the input bytes it had to skip
  SplitFile, RangeResult   what converting one range wrote (also kept in its progress marker)

Every range writes its own temporary files under `output_dir/_tmp-JOB/`, and a progress marker
holding its RangeResult once they are complete, so that a re-run of an interrupted job skips it.
Finalize only reads them (it copies record intervals into the shards); they go with the tmp folder
once metadata.json is written, so a run that fails while finalizing resumes without converting.
"""

import dataclasses
import io
import json
from typing import Optional

import numpy as np
from apache_beam.metrics import Metrics

import record_schema
from beam_convert.categories import Category
from beam_convert import files

METRICS_NAMESPACE = "beam_convert"
TOO_MANY_IMAGES = "too_many_images"
# A range's temporary digest rows (convert writes them, finalize turns them into the digest table).
DIGEST_ROW = np.dtype([("digest", "<i8"), ("category_id", "<i8"), ("split", "u1")])
SPLIT_CODES = {"train": 0, "val": 1}


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
    categories: Optional[tuple[Category, ...]] = None  # from --categories


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
    framed_bytes: int = 0  # the documents' bytes
    unframed_bytes: int = 0  # skipped with --skip_corrupt where no document could be framed
    unframed_spans: int = 0

    @property
    def labelled(self) -> bool:
        """A file is labelled when at least half of its documents have a category_id. Judged on
        the whole file, so that one stray document cannot turn a test file into training data:
        products.to_product rejects the documents that differ from their file."""
        return self.labelled_documents > 0 and 2 * self.labelled_documents >= self.documents


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """What every range needs to know about all the input: the side input of ConvertRange."""

    labelled_files: frozenset
    category_ids_seen: tuple  # in labelled files, sorted
    duplicate_keepers: dict  # product_id -> (file_index, offset) of the occurrence that is kept
    documents: int
    corrupt_rejections: int  # rejection lines of the index scan (--skip_corrupt): a document or span it could not frame
    unframed: Optional["UnframedBson"] = None  # None: no byte skipped unframed


@dataclasses.dataclass(frozen=True)
class UnframedBson:
    """The input bytes the index scan skipped with --skip_corrupt because no document could be
    framed in them: their documents are lost and cannot be counted, only estimated from the
    input's mean document size (framed_bytes over the documents framed)."""

    lost_bytes: int
    spans: int
    framed_bytes: int

    def estimated_documents(self, documents: int) -> int:
        return round(self.lost_bytes * documents / self.framed_bytes) if self.framed_bytes else 0


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """One range's temporary TFRecord file of one split, what it holds, its product ids, and the
    byte length of each of its records (finalize copies it in pieces cut there), both in the
    file's record order (mix.range_order)."""

    path: str
    products: int
    images: int
    ids: str = ""  # temporary .npy of the records' product ids, in record order ("" in older markers)
    sizes: str = ""  # temporary .npy (int64) of each record's framed length in bytes ("" in older markers)


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
    digests: Optional[str] = None  # temporary .npy of DIGEST_ROW rows; None without labelled products
    buckets: int = 0  # the records' order: mix.range_order over this many buckets (0: input order, older markers)

    @property
    def products(self) -> int:
        return sum(split_file.products for split_file in self.records.values())

    def temporary_files(self) -> list[str]:
        paths = [path for split_file in self.records.values()
                 for path in (split_file.path, split_file.ids, split_file.sizes)]
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
            buckets=data.get("buckets", 0),
        )


# Progress markers in tmp_dir/progress/: one per input file indexed, one per range converted (which
# also stores the range's result). The terminal adds up their "documents" to print progress.
INDEX_MARKER = "index"
RANGE_MARKER = "range"


def progress_marker(tmp_dir: str, kind: str, name: str = "*") -> str:
    """The marker of one indexed file or converted range; with the default name, the glob of a kind."""
    return files.join(tmp_dir, "progress", f"{kind}-{name}.json")


def rejection_report(tmp_dir: str, name: str = "*") -> str:
    """A temporary rejection report (one per range, one per file cut short); "*": the glob of all."""
    return files.join(tmp_dir, "rejected", f"{name}.jsonl")


def rejection_line(product_id, source: str, offset: int, reason: str, detail: str) -> bytes:
    record = {"_id": product_id, "source": source, "offset": offset, "reason": reason, "detail": detail}
    return (json.dumps(record) + "\n").encode()


def increment(name: str, value: int = 1) -> None:
    """Adds to one of the job's counters (Beam metrics, namespace beam_convert)."""
    Metrics.counter(METRICS_NAMESPACE, name).inc(value)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
