"""The training stream on the service's workers: `distribute` registers a training pipeline with
the dispatcher and reads its batches back, the real images only over the wire
(docs/DATA_SERVICE.md)."""

from __future__ import annotations

import hashlib
import json

import record_schema
from model.data_service.probe import PROTOCOL, parse_service

PROCESSING_MODES = ("dynamic", "off")
COMPRESSIONS = ("AUTO", None)
IMAGES, MASK = record_schema.IMAGES, record_schema.MASK


def job_name_for(*settings) -> str:
    """A job name that every replica and every trainer of one run computes alike, and that differs
    for another run or other data settings: consumers that share a job name share its stream, and
    TensorFlow joins a name to the job already running under it whatever dataset is registered.
    Pass the run's model_dir as given on the command line and the settings that shape a batch
    (data_dir, image/crop size, per-replica batch, seed, shuffle buffer)."""
    digest = hashlib.sha1(json.dumps(settings, default=str, sort_keys=True).encode()).hexdigest()
    return f"cdiscount-train-{digest[:16]}"


def distribute(dataset, service: str, *, job_name: str, processing_mode: str = "dynamic",
               compression: str | None = "AUTO", pack: bool = True,
               max_outstanding_requests: int | None = None):
    """`dataset` (a training pipeline, e.g. create_dataset(..., training=True, repeat=True,
    dynamic_sharding=True)) produced by the service's workers and read here.

    service: "grpc://HOST:PORT" (or "HOST:PORT") of the dispatcher.
    job_name: shared by every consumer of one training run (all replicas, all trainers): they
        read one job, first come first served; see `job_name_for`.
    processing_mode: "dynamic" (ShardingPolicy.DYNAMIC: the dataset's first source, the file
        list, is split across the workers, each file read once per pass) or "off" (every worker
        produces the whole dataset; only for unsplittable datasets, with seed=None).
    compression: "AUTO" (TensorFlow snappy-compresses elements on the worker) or None.
    pack: for elements `({"images": [B, M, S, S, 3], "mask": [B, M], ...}, label)`, send only the
        real images (the slots whose mask is > 0) and put the padded stack back together here:
        at 1.7 images a product, 4 slots are 2.35x the pixels. The elements read here are the
        dataset's, exactly. Other element structures go as they are.
    max_outstanding_requests: cap on elements requested at once (memory: that many batches);
        None lets tf.data tune it.

    The dataset is registered with the dispatcher when this is called (it must be reachable:
    call `wait_for_workers` first) and marked non-deterministic: under the service the order
    depends on which worker serves first anyway, so no stage should wait to keep one.
    """
    import tensorflow as tf

    if processing_mode not in PROCESSING_MODES:
        raise ValueError(f"processing_mode must be one of {PROCESSING_MODES}, got {processing_mode!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not job_name:
        raise ValueError("distribute needs a job_name shared by the run's consumers (see job_name_for)")
    address = parse_service(service)
    policy = {"dynamic": tf.data.experimental.service.ShardingPolicy.DYNAMIC,
              "off": tf.data.experimental.service.ShardingPolicy.OFF}[processing_mode]
    spec = dataset.element_spec
    pack = pack and _packable(spec)
    if pack:
        dataset = dataset.map(_pack_images, num_parallel_calls=tf.data.AUTOTUNE)
    if dataset.options().deterministic is not False:
        options = tf.data.Options()
        options.deterministic = False
        dataset = dataset.with_options(options)
    remote = dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=policy, service=f"{PROTOCOL}://{address}", job_name=job_name,
        compression=compression, max_outstanding_requests=max_outstanding_requests))
    if pack:
        images_spec = spec[0][IMAGES]
        unpack = tf.autograph.experimental.do_not_convert(lambda features, label: _unpack_images(features, label, images_spec))
        remote = remote.map(unpack, num_parallel_calls=tf.data.AUTOTUNE)
    return remote


IMAGES, MASK = "images", "mask"  # record_schema's feature names (not imported: the launchers stay light)


def _packable(spec) -> bool:
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], dict)):
        return False
    images, mask = spec[0].get(IMAGES), spec[0].get(MASK)
    return (images is not None and mask is not None and images.shape.rank == 5 and mask.shape.rank == 2
            and images.shape[2:].is_fully_defined())


def _pack_images(features, label):
    """[B, M, S, S, 3] padded stack -> [N, S, S, 3], the real images in slot order (worker side)."""
    import tensorflow as tf

    images = features[IMAGES]
    real = tf.reshape(features[MASK] > 0, [-1])
    flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0))
    return {**features, IMAGES: tf.gather(flat, tf.where(real)[:, 0])}, label


def _unpack_images(features, label, images_spec):
    """The real images back into their slots, zeros elsewhere (trainer side): one gather from a
    pool whose element 0 is the zero image, as input_pipeline.decode_images writes the stack
    (a scatter_nd is ~8x slower on CPU)."""
    import tensorflow as tf

    mask = features[MASK]
    real = tf.reshape(mask > 0, [-1])
    side = images_spec.shape[2:].as_list()
    place = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)), 0)  # a slot's element in the pool
    pool = tf.concat([tf.zeros([1, *side], images_spec.dtype), features[IMAGES]], 0)
    images = tf.reshape(tf.gather(pool, place), tf.concat([tf.shape(mask), side], 0))
    return {**features, IMAGES: tf.ensure_shape(images, images_spec.shape)}, label
