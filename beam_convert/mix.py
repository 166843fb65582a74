"""Where each record of a split goes: an order that mixes the whole input into every shard.

Training reads 16 shards at a time through a shuffle buffer a few thousand records deep, so a
batch can only hold the classes of the catalogue stretches those 16 shards are at. Cut from the
input in its order, a catalogue dumped in category order gives batches of a few classes. Here:

  * each index range writes its records of a split grouped into `bucket_count(range_size)`
    buckets by a hash of the product id, in hash order within a bucket (`range_order`), so the
    records of a bucket are a random sample of the range, ~PIECE_RECORDS of them;
  * the split's stream is bucket 0 of every range, then bucket 1 of every range, ..., and each
    bucket visits the ranges in its own seeded order (`stream_pieces`);
  * the stream is cut into even shards (`cut`): a shard is about M/S buckets, so it crosses the
    whole input, in an order of its own, a piece of ~PIECE_RECORDS records at a time.

A reader of 16 shards then sees 16 unrelated places of the catalogue, each changing every
~PIECE_RECORDS records. Plain striping (record i to shard i mod S) would not do: every shard would
walk the catalogue in the same order, and 16 shards read together would stay in one window.

Everything is a pure function of the product ids and the range ids (themselves a function of the
input and --range_size): the same whatever the workers, and a resumed run writes the same bytes.
The hash is splitmix64 (Steele et al. 2014), vectorised in numpy: finalize re-derives the buckets
from the ranges' id lists instead of keeping them in another temporary file.
"""

import hashlib

import numpy as np

# Records of a range in one bucket, on average: what a reader takes from one place of the input
# before it moves to another. Smaller mixes better, but a shard is copied from that many more
# pieces (one copy call each): ~N / PIECE_RECORDS calls for a split of N records (BUILD_NOTES.md
# "Class-mixed shards").
PIECE_RECORDS = 16

# Records of one split's stream, in order: which range's temporary file, records [first, end).
PIECE = np.dtype([("source", "<i8"), ("first", "<i8"), ("end", "<i8")])

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (the output function of SplitMix64), on uint64 arrays."""
    z = np.asarray(values).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & _MASK


def mix_keys(product_ids: np.ndarray) -> np.ndarray:
    """Each product's place key (uint64): a hash of its id, so no order of the input survives."""
    return splitmix64(np.asarray(product_ids, dtype=np.int64).view(np.uint64))


def bucket_count(range_size: int) -> int:
    """Buckets per range: a range's records of a split are dealt into this many by their key."""
    return max(1, -(-range_size // PIECE_RECORDS))


def buckets_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    return (keys % np.uint64(buckets)).astype(np.int64)


def range_order(product_ids: np.ndarray, buckets: int) -> np.ndarray:
    """The order in which a range writes its records of a split: by bucket, then by key."""
    keys = mix_keys(product_ids)
    return np.lexsort((keys, buckets_of(keys, buckets)))


def range_key(range_id: str) -> int:
    """A range's own 64-bit seed, from its id (a function of the input file and offset)."""
    return int.from_bytes(hashlib.blake2b(range_id.encode(), digest_size=8).digest(), "little")


def stream_pieces(range_ids: list[str], product_ids: list[np.ndarray], buckets: int) -> np.ndarray:
    """One split's records in their output order, as PIECE rows (source = index in range_ids).

    product_ids[r] is range r's id list in record order (as `range_order` wrote it). The stream
    is bucket 0, 1, ... of every range; within bucket b the ranges come in the order of a hash
    of (range, b), so every bucket, and so every shard, crosses the ranges in an order of its own.
    """
    sources, bucket_column, firsts, ends = [], [], [], []
    for source, ids in enumerate(product_ids):
        present = buckets_of(mix_keys(ids), buckets)
        if len(present) and np.any(np.diff(present) < 0):
            raise ValueError(f"range {range_ids[source]}: records not in bucket order")
        values, starts, counts = np.unique(present, return_index=True, return_counts=True)
        sources.append(np.full(len(values), source, np.int64))
        bucket_column.append(values)
        firsts.append(starts)
        ends.append(starts + counts)
    if not sources:
        return np.zeros(0, PIECE)
    source = np.concatenate(sources)
    bucket = np.concatenate(bucket_column)
    keys = np.array([range_key(range_id) for range_id in range_ids], np.uint64)
    visit = splitmix64(keys[source] ^ splitmix64(bucket.astype(np.uint64)))
    order = np.lexsort((source, visit, bucket))  # source: a tie-break that never decides in practice
    pieces = np.zeros(len(order), PIECE)
    pieces["source"] = source[order]
    pieces["first"] = np.concatenate(firsts)[order]
    pieces["end"] = np.concatenate(ends)[order]
    return pieces


def cut(pieces: np.ndarray, shards: int) -> list[np.ndarray]:
    """The stream cut into `shards` even shards: shard k holds its records [k*N/S, (k+1)*N/S).

    A piece that straddles a cut is split there. `shards` must be in 1..N.
    """
    sizes = pieces["end"] - pieces["first"]
    total = int(sizes.sum())
    if not 1 <= shards <= total:
        raise ValueError(f"{shards} shards of {total} records")
    starts = np.concatenate([[0], np.cumsum(sizes)])  # stream position of each piece's first record
    result = []
    for shard in range(shards):
        begin, end = shard * total // shards, (shard + 1) * total // shards
        first_piece = np.searchsorted(starts, begin, side="right") - 1
        last_piece = np.searchsorted(starts, end, side="left")  # exclusive
        part = pieces[first_piece:last_piece].copy()
        part["first"][0] += begin - starts[first_piece]
        part["end"][-1] -= starts[last_piece] - end
        result.append(part)
    return result
