"""Distributed training of MIDL models with the backends' own APIs.

The distributed runs need several devices, which exist only if the process
is configured before the backend initializes (`XLA_FLAGS` for JAX, logical
CPU devices for TensorFlow), so each runs in a fresh subprocess that
prints its results as JSON. Each compares a distributed run with a
single-device run from the same initial weights, on the same global
batch: per-step losses and final weights must agree to `rtol=1e-4`,
`atol=1e-5` (only the order of float32 reductions differs).
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from backend_utils import BACKEND

from keras_midl import MIDL
from keras_midl.distribution import midl_layouts

RTOL = 1e-4
ATOL = 1e-5

# Shared by both subprocesses: a small MIDL model, four steps of SGD on
# one fixed global batch of 32, per-step losses and final weights.
_COMMON = """
import json
import numpy as np
import keras
from keras_midl import MIDL

def make_model():
    return keras.Sequential([
        keras.Input((16,)),
        MIDL(32, k_ratio=0.5, rank=4, activation="relu", name="midl"),
        keras.layers.Dense(4, name="head"),
    ])

keras.utils.set_random_seed(7)
initial_weights = make_model().get_weights()
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 16)).astype("float32")
y = rng.integers(0, 4, size=32)

def train(make=make_model):
    model = make()
    model.set_weights(initial_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    return model, {
        "losses": losses,
        "weights": [w.tolist() for w in model.get_weights()],
    }
"""

_JAX_SCRIPT = (
    _COMMON
    + """
import jax
from keras_midl.distribution import midl_layouts

devices = keras.distribution.list_devices()
results = {"num_devices": len(devices)}
_, results["single"] = train()

mesh = keras.distribution.DeviceMesh((4,), ["batch"], devices)
keras.distribution.set_distribution(
    keras.distribution.DataParallel(device_mesh=mesh)
)
_, results["data_parallel"] = train()

mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
layout_map = keras.distribution.LayoutMap(mesh)
layout_map.update(midl_layouts())
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
)
model, results["model_parallel"] = train()
results["specs"] = {
    v.path.split("/", 1)[1]: [
        None if a is None else str(a) for a in v.value.sharding.spec
    ]
    for v in model.weights
}
print("RESULTS" + json.dumps(results))
"""
)

_TF_SCRIPT = (
    """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 4
)
"""
    + _COMMON
    + """
results = {"num_devices": len(tf.config.list_logical_devices("CPU"))}
_, results["single"] = train()
strategy = tf.distribute.MirroredStrategy(
    [f"/cpu:{i}" for i in range(4)]
)
results["replicas"] = strategy.num_replicas_in_sync

def make_in_scope():
    with strategy.scope():
        return make_model()

model, results["mirrored"] = train(make_in_scope)
results["mirrored_variables"] = all(
    isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights
)
print("RESULTS" + json.dumps(results))
"""
)


def _run(script, **env):
    environment = {
        **os.environ,
        "KERAS_BACKEND": BACKEND,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **env,
    }
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [
        line
        for line in completed.stdout.splitlines()
        if line.startswith("RESULTS")
    ]
    assert completed.returncode == 0 and lines, completed.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS") :])


def _assert_same_training(reference, candidate):
    np.testing.assert_allclose(
        candidate["losses"], reference["losses"], rtol=RTOL, atol=ATOL
    )
    assert reference["losses"][-1] < reference["losses"][0]
    for expected, actual in zip(
        reference["weights"], candidate["weights"], strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_midl_layouts_shard_every_weight_along_units():
    model = keras.Sequential(
        [
            keras.Input((12,)),
            MIDL(20, rank=3, name="midl"),
            MIDL(10, rank=3, light_path="zero", use_bias=False, name="midl_2"),
            keras.layers.Dense(5, name="head"),
        ]
    )
    layouts = midl_layouts()
    for layer in model.layers:
        for variable in layer.weights:
            matches = [
                axes
                for pattern, axes in layouts.items()
                if re.fullmatch(pattern, variable.path)
            ]
            if not isinstance(layer, MIDL):
                assert matches == [], variable.path
                continue
            assert len(matches) == 1, variable.path
            (axes,) = matches
            assert len(axes) == len(variable.shape)
            sharded = [
                size
                for size, axis in zip(variable.shape, axes, strict=True)
                if axis
            ]
            expected = (
                [] if variable.path.endswith("projection") else [layer.units]
            )
            assert sharded == expected, (variable.path, axes)


def test_midl_layouts_custom_names_and_validation():
    layouts = midl_layouts(layer_name="encoder_dense", model_axis="tp")
    assert layouts["(.*/)?encoder_dense/kernel"] == ("tp", None)
    assert layouts["(.*/)?encoder_dense/gate_kernel"] == (None, "tp")
    with pytest.raises(ValueError, match="layer_name"):
        midl_layouts(layer_name="")
    with pytest.raises(ValueError, match="model_axis"):
        midl_layouts(model_axis=None)


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution runs on JAX only (TensorFlow: tf.distribute; "
    "torch: DistributedDataParallel, see the README)",
)
def test_jax_data_and_model_parallel_match_single_device():
    results = _run(
        _JAX_SCRIPT, XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    assert results["num_devices"] == 4
    _assert_same_training(results["single"], results["data_parallel"])
    _assert_same_training(results["single"], results["model_parallel"])
    specs = results["specs"]
    assert specs["midl/kernel"] == ["model", None]
    assert specs["midl/bias"] == ["model"]
    assert specs["midl/gate_kernel"] == [None, "model"]
    assert specs["midl/gate_bias"] == ["model"]
    assert specs["midl/light_kernel"] == [None, "model"]
    assert specs["midl/projection"] == [None, None]
    assert specs["head/kernel"] == [None, None]


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute.MirroredStrategy needs the TensorFlow backend",
)
def test_tf_mirrored_strategy_matches_single_device():
    results = _run(_TF_SCRIPT)
    assert results["num_devices"] == 4
    assert results["replicas"] == 4
    assert results["mirrored_variables"]
    _assert_same_training(results["single"], results["mirrored"])
