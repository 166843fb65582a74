"""A test aid: every batch the training streams make, with its index in the stream.

`traced(batches, record)` wraps a source of training batches (model.training.inputs.folder_batches,
what `loop.train(..., training_batches=...)` takes): each training stream calls
record(pipeline, batch, product_ids) for each batch it makes, batch counted from the stream's
beginning (a resumed stream's first is its start step). Streams read ahead of training, so the
batches made include some never trained on.
"""

import tensorflow as tf


def traced(batches, record):
    def traced_batches(cfg, pipeline):
        ds = batches(cfg, pipeline)

        def log(index, ids):
            record(pipeline.input_context.input_pipeline_id, int(index), tuple(ids.numpy().tolist()))
            return index

        def write(index, batch):
            done = tf.py_function(log, [index, batch[0]["product_id"]], tf.int64)
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, batch)

        return ds.enumerate(pipeline.start.batch).map(write)

    return traced_batches
