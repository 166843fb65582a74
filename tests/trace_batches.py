"""A test aid: every batch the training streams make, with its index in the stream.

`traced(split_dataset, record)` wraps data_folder.split_dataset: each training stream (the ones
train.py starts at a step, with record_counts) calls record(pipeline, batch, product_ids) for each
batch it makes, batch counted from the stream's beginning (a resumed stream's first is its start
step). Streams read ahead of training, so the batches made include some never trained on.
"""

import tensorflow as tf


def traced(split_dataset, record):
    def traced_split_dataset(cfg, split, **options):
        ds = split_dataset(cfg, split, **options)
        if "record_counts" not in options:  # not a training stream (sample grid, calibration)
            return ds
        pipeline = options["input_context"].input_pipeline_id

        def log(index, ids):
            record(pipeline, int(index), tuple(ids.numpy().tolist()))
            return index

        def write(index, batch):
            done = tf.py_function(log, [index, batch[0]["product_id"]], tf.int64)
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, batch)

        return ds.enumerate(options["start_batch"]).map(write)

    return traced_split_dataset
