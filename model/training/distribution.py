"""Where training runs: device set-up, the tf.distribute strategy, and what each worker writes.

MirroredStrategy over the visible GPUs (or over logical CPU devices with --cpu_devices), and
MultiWorkerMirroredStrategy when TF_CONFIG names a cluster.
"""

from __future__ import annotations

import os

import tensorflow as tf

from model.model_dir import worker_dir


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices; must run before TensorFlow initialises."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        # Already initialised (for example by the tests' conftest): fine if the count matches.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise RuntimeError(
                f"--cpu_devices={count} but TensorFlow is already initialised with {have} CPU devices"
            ) from None


def make_strategy(cpu_devices: int = 0) -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG is set, else Mirrored over GPUs or logical CPUs."""
    if os.environ.get("TF_CONFIG"):
        # Keras 3 model.fit under MultiWorkerMirroredStrategy is an open upstream problem
        # (keras-team/keras#20585, tensorflow/tensorflow#72388): see _patch_nested_reduce.
        return _patch_nested_reduce(tf.distribute.MultiWorkerMirroredStrategy())
    if tf.config.list_physical_devices("GPU"):  # does not initialise the runtime
        return tf.distribute.MirroredStrategy()
    configure_cpu_devices(cpu_devices)
    cpus = tf.config.list_logical_devices("CPU")
    if cpu_devices > 1:
        # Several CPU replicas reduce through one device: NCCL is GPU only.
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus[:cpu_devices]],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    return tf.distribute.MirroredStrategy([cpus[0].name])


def _patch_nested_reduce(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Lets Keras 3 fit() start under MultiWorkerMirroredStrategy.

    Before the first step, fit() (trainer._maybe_symbolic_build, Keras 3.15) pulls one input
    batch and calls strategy.reduce("MEAN", batch, axis=None) on the whole nested batch, only
    to learn its shapes. CollectiveAllReduceStrategy.reduce takes a single tensor, so it raises
    "Attempt to convert a value ({'images': PerReplica...}) ... to a Tensor" (keras-team/keras
    #20585). For a nested value this returns the first local replica's batch, which has the
    shapes Keras wants, with no collective at all.
    Then every train step reduces its scalar logs (loss, metrics) with reduce("MEAN", v, axis=0)
    when multi-worker (trainer.reduce_per_replica), which fails on a 0-d value ("Invalid
    reduction dimension 0 for input with 0 dimensions"): a scalar is reduced with axis=None.
    """
    reduce = strategy.reduce

    def nested_safe_reduce(reduce_op, value, axis=None):
        if tf.nest.is_nested(value):
            return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], value)
        if axis is not None and strategy.experimental_local_results(value)[0].shape.rank == 0:
            axis = None
        return reduce(reduce_op, value, axis)

    strategy.reduce = nested_safe_reduce
    return strategy


def describe(strategy: tf.distribute.Strategy) -> str:
    """"8 replicas on GPU:0..7 (MirroredStrategy)", "1 replica on CPU (MirroredStrategy)", or for
    several hosts "4 replicas: 2 here on GPU:0..1 (MultiWorkerMirroredStrategy)": the line that
    tells a user at start whether the accelerators are in use."""
    devices = [tf.DeviceSpec.from_string(d) for d in strategy.extended.worker_devices]
    kinds = sorted({d.device_type for d in devices})
    indices = sorted(d.device_index or 0 for d in devices)
    if len(devices) == 1 and kinds == ["CPU"]:
        where = "CPU"
    elif len(kinds) == 1:
        where = f"{kinds[0]}:{indices[0]}" + (f"..{indices[-1]}" if len(indices) > 1 else "")
    else:
        where = ", ".join(f"{d.device_type}:{d.device_index}" for d in devices)
    total = strategy.num_replicas_in_sync
    plural = "replica" if total == 1 else "replicas"
    if is_multi_worker(strategy):
        return f"{total} {plural}: {len(devices)} here on {where} (MultiWorkerMirroredStrategy)"
    return f"{total} {plural} on {where} ({strategy.__class__.__name__})"


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_model_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes: model_dir for the chief (or the only worker); under
    multi-worker training the others write the same files to model_dir/workers/TYPE_ID, since
    every worker must take part in each save (they are collective) but only one may own the
    files."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return model_dir
    cluster = resolver.cluster_spec().as_dict()
    chief = ("chief", 0) if "chief" in cluster else ("worker", 0)
    if (resolver.task_type, resolver.task_id) == chief:
        return model_dir
    return worker_dir(model_dir, resolver.task_type, resolver.task_id)


def num_replicas_for(cpu_devices: int) -> int:
    """Replicas the local strategy will have, known before TensorFlow builds anything."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return len(gpus)
    return max(1, cpu_devices)


def check_batch_divisible(batch_size: int, replicas: int) -> None:
    """The global batch is split evenly across replicas."""
    if batch_size % replicas:
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by the {replicas} replicas: "
            f"use a multiple of {replicas}"
        )
