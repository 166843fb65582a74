"""model/training/distribution.py: replicas and batch checks before TensorFlow builds anything, the
strategy's one-line description, where each worker of a cluster writes, the CPU device split, and
the reduce patch that lets Keras fit start under MultiWorkerMirroredStrategy.

The conftest split the CPU into 2 logical devices; the strategies here run no all-reduce (see
test_model_network's `strategy` fixture for why a second one could not)."""

import types

import pytest
import tensorflow as tf

from model.training import distribution


# ---------------------------------------------------------------------------------------------
# Replicas and the global batch


@pytest.mark.parametrize("cpu_devices, replicas", [(0, 1), (1, 1), (2, 2), (8, 8)])
def test_num_replicas_for_cpu(cpu_devices, replicas):
    assert not tf.config.list_physical_devices("GPU")  # this machine
    assert distribution.num_replicas_for(cpu_devices) == replicas


@pytest.mark.parametrize("cpu_devices", [0, 4])
def test_num_replicas_for_gpus_is_the_gpu_count_whatever_cpu_devices(monkeypatch, cpu_devices):
    physical = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["gpu"] * 3 if kind == "GPU" else physical(kind))
    assert distribution.num_replicas_for(cpu_devices) == 3


@pytest.mark.parametrize("batch_size, replicas, error", [
    (256, 8, None),
    (8, 1, None),
    (2, 2, None),
    (10, 4, "--batch_size=10 is not divisible by the 4 replicas: use a multiple of 4"),
    (1, 2, "--batch_size=1 is not divisible by the 2 replicas: use a multiple of 2"),
    (100, 3, "--batch_size=100 is not divisible by the 3 replicas: use a multiple of 3"),
])
def test_check_batch_divisible(batch_size, replicas, error):
    if error is None:
        distribution.check_batch_divisible(batch_size, replicas)
        return
    with pytest.raises(ValueError) as raised:
        distribution.check_batch_divisible(batch_size, replicas)
    assert str(raised.value) == error


# ---------------------------------------------------------------------------------------------
# describe


class MirroredStrategy:
    """Stands in for a strategy on devices this machine has not got (its class name is printed)."""

    def __init__(self, devices):
        self.extended = types.SimpleNamespace(worker_devices=tuple(devices))
        self.num_replicas_in_sync = len(devices)


class FakeMultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
    """A MultiWorkerMirroredStrategy (for isinstance) that starts no server: `total` replicas in
    the cluster, `devices` of them here."""

    def __new__(cls, devices, total):
        strategy = object.__new__(cls)
        strategy._fake = (tuple(devices), total)
        return strategy

    def __init__(self, devices, total):
        pass

    @property
    def extended(self):
        return types.SimpleNamespace(worker_devices=self._fake[0])

    @property
    def num_replicas_in_sync(self):
        return self._fake[1]


def gpus(n, host="/job:localhost/replica:0/task:0"):
    return [f"{host}/device:GPU:{i}" for i in range(n)]


@pytest.mark.parametrize("strategy, line", [
    (MirroredStrategy(gpus(8)), "8 replicas on GPU:0..7 (MirroredStrategy)"),
    (MirroredStrategy(gpus(1)), "1 replica on GPU:0 (MirroredStrategy)"),
    (MirroredStrategy(["/job:localhost/replica:0/task:0/device:GPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"]),
     "2 replicas on GPU:0, CPU:0 (MirroredStrategy)"),
    (FakeMultiWorker(gpus(2, "/job:worker/replica:0/task:1"), 4),
     "4 replicas: 2 here on GPU:0..1 (MultiWorkerMirroredStrategy)"),
    (FakeMultiWorker(["/job:worker/replica:0/task:0/device:CPU:0"], 2),
     "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)"),
])
def test_describe(strategy, line):
    assert distribution.describe(strategy) == line


@pytest.mark.parametrize("cpu_devices, line", [
    (0, "1 replica on CPU (MirroredStrategy)"),
    (1, "1 replica on CPU (MirroredStrategy)"),
    (2, "2 replicas on CPU:0..1 (MirroredStrategy)"),
])
def test_make_strategy_on_cpu_and_its_description(cpu_devices, line):
    strategy = distribution.make_strategy(cpu_devices)
    assert distribution.describe(strategy) == line
    assert not distribution.is_multi_worker(strategy)


# ---------------------------------------------------------------------------------------------
# worker_model_dir


def cluster_strategy(cluster: dict, task_type, task_id):
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
    return types.SimpleNamespace(cluster_resolver=resolver)


WORKERS = {"worker": ["w0:1", "w1:1", "w2:1"]}
WITH_CHIEF = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]}


@pytest.mark.parametrize("strategy, expected", [
    (types.SimpleNamespace(), "gs://b/run"),  # no cluster resolver: a local strategy
    (cluster_strategy(WORKERS, None, None), "gs://b/run"),  # a resolver but no task
    (cluster_strategy(WORKERS, "worker", 0), "gs://b/run"),  # worker 0 is the chief when none is named
    (cluster_strategy(WORKERS, "worker", 2), "gs://b/run/workers/worker_2"),
    (cluster_strategy(WITH_CHIEF, "chief", 0), "gs://b/run"),
    (cluster_strategy(WITH_CHIEF, "worker", 0), "gs://b/run/workers/worker_0"),
    (cluster_strategy(WITH_CHIEF, "worker", 1), "gs://b/run/workers/worker_1"),
])
def test_worker_model_dir(strategy, expected):
    assert distribution.worker_model_dir("gs://b/run", strategy) == expected


def test_worker_model_dir_of_a_real_local_strategy():
    assert distribution.worker_model_dir("/run", distribution.make_strategy(0)) == "/run"


# ---------------------------------------------------------------------------------------------
# configure_cpu_devices


def test_configure_cpu_devices_after_tensorflow_started():
    assert len(tf.config.list_logical_devices("CPU")) == 2  # starts the runtime: the split is fixed now
    distribution.configure_cpu_devices(0)  # nothing asked
    distribution.configure_cpu_devices(1)
    distribution.configure_cpu_devices(2)  # what the runtime has: fine
    with pytest.raises(RuntimeError) as raised:
        distribution.configure_cpu_devices(3)
    assert str(raised.value) == "--cpu_devices=3 but TensorFlow is already initialised with 2 CPU devices"
    assert len(tf.config.list_logical_devices("CPU")) == 2


# ---------------------------------------------------------------------------------------------
# The reduce patch (exercised on two local replicas: the same calls Keras makes)


def test_patched_reduce_takes_nested_values_and_scalars_with_an_axis():
    strategy = distribution._patch_nested_reduce(distribution.make_strategy(2))

    def per_replica():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        value = tf.cast(replica, tf.float32)
        return {"images": tf.fill([2, 3], value), "mask": tf.fill([2], value + 10)}, value * 4

    batch, scalar = strategy.run(per_replica)
    # A nested batch: the first replica's, as it is (Keras only reads its shapes).
    first = strategy.reduce("MEAN", batch, axis=None)
    assert first["images"].shape == (2, 3) and first["mask"].shape == (2,)
    assert first["images"].numpy().tolist() == [[0.0] * 3] * 2 and first["mask"].numpy().tolist() == [10.0, 10.0]
    # A scalar log value reduced "along axis 0" (what Keras does when multi-worker): the mean.
    assert float(strategy.reduce("MEAN", scalar, axis=0)) == 2.0
    assert float(strategy.reduce("SUM", scalar, axis=None)) == 4.0
    # Tensors with a batch axis are reduced as before.
    assert strategy.reduce("SUM", batch["mask"], axis=0).numpy().tolist() == 10.0 * 2 + 11.0 * 2
