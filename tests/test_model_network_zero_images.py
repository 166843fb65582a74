"""No replica and no backbone call ever sees zero images, with oneDNN on as on AVX-512 CPUs.

TensorFlow's oneDNN Conv2D (the CPU wheel's default on CPUs with AVX-512) allocates a zero-size
batch's output with the input's shape, and the next BatchNorm fails ("Incompatible shapes:
[0,32,32,3] vs. [8]"); cuDNN refuses empty batches too. Two ways to get one: the last validation
batch leaves a replica without a product, and a batch whose every mask is 0 (a request to the
SavedModel with no valid picture). Each case runs in a subprocess with TF_ENABLE_ONEDNN_OPTS=1,
which takes the oneDNN path on any x86-64 CPU, so the test fails without the fix on every machine.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.record_helpers import REPO

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
import numpy as np, tensorflow as tf, keras
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from model.network.multi_image import ModelConfig, build_model

packed = sys.argv[1] == "packed"
config = ModelConfig(num_classes=5, image_size=32, backbone="tiny", fusion="mean_max", packed=packed)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, [3, 4, 32, 32, 3], dtype=np.uint8)
mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
images[mask == 0] = 0
labels = np.array([3, 1, 4])

def compiled(model):
    model.compile(loss={"category": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                  metrics={"category": [keras.metrics.SparseCategoricalAccuracy(name="top1")]})
    return model

single = compiled(build_model(config))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
with strategy.scope():
    mirrored = compiled(build_model(config))
mirrored.set_weights(single.get_weights())

def evaluate(model, batch):
    ds = tf.data.Dataset.from_tensor_slices(({"images": images, "mask": mask}, {"category": labels})).batch(batch)
    return model.evaluate(ds, return_dict=True, verbose=0)

# 3 products in batches of 2: the last batch holds one product, so one replica gets none.
out = {"single": evaluate(single, 2), "mirrored": evaluate(mirrored, 2)}
# Every mask 0: no image in the whole batch, in inference.
empty = single({"images": np.zeros([2, 4, 32, 32, 3], np.uint8), "mask": np.zeros([2, 4], np.float32)}, training=False)
out["empty_logits"] = np.asarray(empty["category"]).tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_a_replica_without_products_and_a_batch_without_images_with_onednn(mode):
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Exact: the empty replica adds nothing, the short batch counts its one product once.
    assert out["mirrored"]["loss"] == pytest.approx(out["single"]["loss"], rel=1e-5)
    top1 = next(key for key in out["single"] if key.endswith("top1"))
    assert out["mirrored"][top1] == pytest.approx(out["single"][top1])
    assert len(out["empty_logits"]) == 2 and all(len(row) == 5 for row in out["empty_logits"])
