"""The split source of dynamic sharding: the training files, every one once a pass, in a new
seeded order each pass. The input pipeline starts from it when its stream is to be distributed
(docs/DATA_SERVICE.md, "Processing mode")."""

from __future__ import annotations

import random


def file_splits(files, *, seed: int | None, repeat: bool, first_pass: int = 0):
    """The split source for dynamic sharding: a dataset of file names, every file once per pass in
    a new seeded order each pass, endless when repeat (else one pass).

    A `Dataset.range` (splittable: the dispatcher hands out one index per request) mapped on the
    worker to `files[permutation_p(k mod n)]` for pass p = k div n, the permutation drawn by
    `tf.random.experimental.index_shuffle` from [seed, p]. Stateless, so the dispatcher's cursor
    alone says which files are taken, and no worker buffers more names than its interleave reads.
    seed=None draws one now (Python's `random.SystemRandom`). first_pass: the passes before it are
    not handed out (a resumed run starts at the pass its next batch falls in)."""
    import tensorflow as tf

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

    return tf.data.Dataset.range(first, total).map(tf.autograph.experimental.do_not_convert(name))
