"""Where a stream's records come from, before any parse or decode: the files of one pipeline's
share, and the four sources `create_dataset` starts from.

    evaluation_records  every record in file order, then record order
    shuffled_records    unseeded training: files and records shuffled, new numbers every run
    seeded_passes       seeded training: pass p a pure function of (seed, p), so it can start anywhere
    service_splits      tf.data service workers under dynamic sharding: files handed out by the dispatcher

Each gives serialized records; `dataset.py` batches, parses and decodes them.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Mapping, Sequence

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions hold no Python control flow on tensors, so AutoGraph has nothing to
# convert; skipping it saves tracing time.
_plain = tf.autograph.experimental.do_not_convert
# Files read at once: parallel reads (latency on GCS) and a better mix for the record shuffle.
_CYCLE = 16


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """Where a seeded training stream begins: at its batch `batch`, exactly as the stream begun at
    0 gives it from there. records_per_file (path -> readable records, e.g. from
    `shards.check_split`) says where each pass ends; a start past batch 0 needs every file's."""

    batch: int = 0
    records_per_file: Mapping[str, int] | None = None

    def records_of(self, path: str, pipelines: int = 1, pipeline_id: int = 0) -> int:
        """Records this pipeline reads from `path`: all of them, or every pipelines-th one from
        pipeline_id when the pipelines share files record by record."""
        if self.records_per_file is None or path not in self.records_per_file:
            raise ValueError(f"a start batch needs the records of every file: {path} has none")
        count = self.records_per_file[path]
        return count if pipelines == 1 else max(0, (count - pipeline_id + pipelines - 1) // pipelines)


@dataclasses.dataclass(frozen=True)
class Share:
    """One input pipeline's share of the files: whole files when there are at least as many files
    as pipelines (each file read by one pipeline; shards are balanced by the converter), else
    every file with every n-th record of each (exact, costs redundant reads)."""

    files: list[str]
    pipelines: int = 1
    pipeline_id: int = 0
    by_record: bool = False

    @classmethod
    def of(cls, files: list[str], input_context: tf.distribute.InputContext | None) -> "Share":
        if input_context is None:
            return cls(files)
        pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
        by_record = pipelines > 1 and len(files) < pipelines
        if pipelines > 1 and not by_record:
            files = files[pipeline_id::pipelines]  # before any shuffle, so the shares are disjoint
        return cls(files, pipelines, pipeline_id, by_record)

    def reader(self, skip_corrupt_records: bool) -> Callable[[tf.Tensor], tf.data.Dataset]:
        """path -> the records of the file this pipeline reads."""

        @_plain
        def read(path):
            records = tf.data.TFRecordDataset(path)
            if skip_corrupt_records:  # TensorFlow's reader cannot resynchronise: the rest of the file goes
                records = records.ignore_errors()
            return records.shard(self.pipelines, self.pipeline_id) if self.by_record else records

        return read

    def records(self, start: StreamStart) -> list[int]:
        """The records this pipeline reads from each of its files."""
        pipelines = self.pipelines if self.by_record else 1
        return [start.records_of(path, pipelines, self.pipeline_id) for path in self.files]


def list_files(file_pattern: str, *, repeat: bool) -> list[str]:
    """The files matching file_pattern, sorted by name, the empty ones left out. An empty file
    holds no record; left in, a pipeline whose share is only empty files would repeat nothing
    forever (a spinning, silent hang at step 1 under a multi-worker strategy)."""
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {file_pattern!r}")
    records = [path for path in files if tf.io.gfile.stat(path).length > 0]
    if repeat and not records:
        raise ValueError(f"every file matching {file_pattern!r} is empty: nothing to repeat")
    return records or files


# ---------------------------------------------------------------------------------------------
# The sources


def evaluation_records(files: list[str], read) -> tf.data.Dataset:
    """Every record, file order then record order."""
    return tf.data.Dataset.from_tensor_slices(files).flat_map(read)


def shuffled_records(files: list[str], read, *, shuffle_buffer: int, repeat: bool) -> tf.data.Dataset:
    """Files shuffled, several read at once, records shuffled in a buffer: new numbers every run
    and every pass."""
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()  # at file level: no drained buffers and no short batch at epoch ends
    ds = ds.interleave(read, cycle_length=min(len(files), _CYCLE), num_parallel_calls=AUTOTUNE)
    return ds.shuffle(shuffle_buffer, reshuffle_each_iteration=True)


def service_splits(files: list[str], read, *, seed: int | None, shuffle_buffer: int, repeat: bool,
                   first_pass: int) -> tf.data.Dataset:
    """The pipeline of a tf.data service worker under dynamic sharding (docs/DATA_SERVICE.md):
    `file_splits` first, whose splits the dispatcher hands to the workers, then each worker's
    reads and record shuffle. No file shuffle or repeat on the workers (the first would let one
    worker take every file of a pass into its buffer, the second gives each worker passes of its
    own). `seed` orders the files only: each worker's record shuffle draws its own numbers."""
    ds = file_splits(files, seed=seed, repeat=repeat, first_pass=first_pass)
    ds = ds.interleave(read, cycle_length=min(len(files), _CYCLE), num_parallel_calls=AUTOTUNE)
    return ds.shuffle(shuffle_buffer, reshuffle_each_iteration=True)


def service_first_pass(start: StreamStart, batch_size: int, files: list[str]) -> int:
    """The pass a service stream's start falls in: start.batch counts batches of the whole job
    (all replicas); the passes before it are not handed out, and that pass is read again from
    its start."""
    if not start.batch:
        return 0
    return start.batch * batch_size // max(1, sum(start.records_of(path) for path in files))


def file_splits(files, *, seed: int | None, repeat: bool, first_pass: int = 0) -> tf.data.Dataset:
    """The split source for dynamic sharding: a dataset of file names, every file once per pass in
    a new seeded order each pass, endless when repeat (else one pass).

    A `Dataset.range` (splittable: the dispatcher hands out one index per request) mapped on the
    worker to `files[permutation_p(k mod n)]` for pass p = k div n, the permutation drawn by
    `tf.random.experimental.index_shuffle` from [seed, p]. Stateless, so the dispatcher's cursor
    alone says which files are taken, and no worker buffers more names than its interleave reads.
    seed=None draws one now (Python's `random.SystemRandom`). first_pass: the passes before it are
    not handed out (a resumed run starts at the pass its next batch falls in)."""
    names = tf.constant(list(files), tf.string)
    count = int(names.shape[0])
    if count < 1:
        raise ValueError("file_splits needs at least one file")
    if seed is None:
        seed = random.SystemRandom().getrandbits(62)
    seed = tf.constant(int(seed), tf.int64)
    first = first_pass * count
    total = (1 << 62) if repeat else first + count  # 2^62 splits: endless for any run

    def name(k):
        position, passes = k % count, k // count
        index = tf.random.experimental.index_shuffle(position, tf.stack([seed, passes]), max_index=count - 1)
        return tf.gather(names, index)

    return tf.data.Dataset.range(first, total).map(_plain(name))


# ---------------------------------------------------------------------------------------------
# The seeded training stream: passes over the share, each a pure function of (seed, pass)


def seeded_passes(files: list[str], read, *, seed: int, shuffle_buffer: int, repeat: bool, skip_records: int,
                  share_records: Sequence[int] | None) -> tf.data.Dataset:
    """The records of the seeded stream from its record skip_records on: pass p reads the files in
    an order drawn from (seed, p) and shuffles their records in blocks of shuffle_buffer, each by a
    permutation drawn from (seed, p, block); passes follow one another (with repeat).

    Whole passes before skip_records are not read at all (each holds sum(share_records) records);
    the rest of the skip is taken from the pass it falls in, before any parse or decode."""
    first_pass, skip = 0, skip_records
    if skip_records:
        per_pass = sum(share_records)
        if per_pass < 1:
            raise ValueError("the files hold no record: nothing to start a stream in")
        first_pass, skip = divmod(skip_records, per_pass)
        if first_pass and not repeat:
            raise ValueError(f"start past the one pass: {skip_records} records of {per_pass}")
    one_pass = _one_pass(files, read, seed=seed, shuffle_buffer=shuffle_buffer)
    passes = tf.data.Dataset.counter(first_pass) if repeat else tf.data.Dataset.range(first_pass, first_pass + 1)
    return passes.flat_map(one_pass).skip(skip)


def _one_pass(files: list[str], read, *, seed: int, shuffle_buffer: int):
    """pass index -> the records of that pass (see seeded_passes)."""
    names = tf.constant(files, tf.string)
    count = len(files)

    @_plain
    def one_pass(pass_index):
        pass_seed = tf.stack([tf.constant(seed, tf.int64), pass_index])
        order = tf.random.experimental.index_shuffle(tf.range(count, dtype=tf.int64), pass_seed, max_index=count - 1)
        records = tf.data.Dataset.from_tensor_slices(tf.gather(names, order)).interleave(
            read, cycle_length=min(count, _CYCLE), num_parallel_calls=AUTOTUNE, deterministic=True)
        # Shuffled in blocks of shuffle_buffer records, each by a permutation drawn from (seed,
        # pass, block): stateless, so the pass is a pure function of its seed. Dataset.shuffle
        # cannot take a seed computed here: TensorFlow's seed helper compares the seed pair with
        # (0, 0) in Python, which fails on a tensor whenever the process's global seed is 0.
        return records.batch(shuffle_buffer).enumerate().map(
            lambda block, window: tf.random.experimental.stateless_shuffle(
                window, tf.random.experimental.stateless_fold_in(pass_seed, block))).unbatch()

    return one_pass
