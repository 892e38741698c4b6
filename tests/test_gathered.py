"""`keras_midl.ops.gathered`: the `keras.ops` reference of the gathered
inference path equals the masked path, whole or chunked, float or int8,
on every backend and inside traces."""

import keras
import numpy as np
import pytest
from backend_utils import BACKEND
from inference_utils import INPUT_DIM
from inference_utils import UNITS
from inference_utils import as_numpy

from keras_midl.midl import MIDL
from keras_midl.ops import dispatch
from keras_midl.ops import gathered


def _masked_layer(**kwargs):
    kwargs.setdefault("k_ratio", 0.45)
    layer = MIDL(UNITS, bias_initializer="random_normal", **kwargs)
    layer.build((None, INPUT_DIM))
    return layer


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
@pytest.mark.parametrize("selection", ["top_k", "bisection"])
def test_reference_equals_masked(chunk, selection, rng):
    """The keras.ops reference, whole or chunked, on every backend."""
    layer = _masked_layer()
    x = rng.normal(size=(2, 3, INPUT_DIM)).astype("float32")
    expected = as_numpy(layer.masked_outputs(x, training=False))
    outputs = gathered.gathered_outputs(
        x,
        dispatch.layer_weights(layer),
        layer.k,
        selection=selection,
        chunk=chunk,
    )
    assert tuple(outputs.shape) == (2, 3, UNITS)
    np.testing.assert_allclose(as_numpy(outputs), expected, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
def test_reference_without_light_path_or_bias(rows, rng):
    layer = _masked_layer(light_path="zero", use_bias=False, k_ratio=0.25)
    weights = dispatch.layer_weights(layer)
    assert weights["light_kernel"] is None and weights["bias"] is None
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    outputs = as_numpy(gathered.gathered_outputs(x, weights, layer.k))
    np.testing.assert_allclose(
        outputs, as_numpy(layer.masked_outputs(x)), atol=1e-5
    )
    # Outside the k selected neurons the output is the (zero) light path.
    np.testing.assert_array_equal((outputs != 0).sum(-1), layer.k)


def test_reference_of_an_int8_layer_equals_its_masked_path(rng):
    layer = _masked_layer()
    layer.quantize("int8")
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    outputs = gathered.gathered_outputs(
        x,
        dispatch.layer_weights(layer),
        layer.k,
        inputs_quantizer=layer.inputs_quantizer,
    )
    np.testing.assert_allclose(
        as_numpy(outputs), as_numpy(layer.masked_outputs(x)), atol=1e-5
    )


def test_reference_in_half_precision(rng):
    layer = _masked_layer()
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    expected = as_numpy(layer.masked_outputs(x))
    outputs = gathered.gathered_outputs(
        x, dispatch.layer_weights(layer), layer.k, compute_dtype="bfloat16"
    )
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    outputs = as_numpy(keras.ops.cast(outputs, "float32"))
    np.testing.assert_allclose(outputs, expected, rtol=0.05, atol=0.05)


def test_reference_inside_a_trace(rng):
    """It is written in `keras.ops` only: it traces (a `tf.function`,
    `jax.jit`) with a batch size unknown while tracing."""
    layer = _masked_layer()
    weights = dispatch.layer_weights(layer)

    def forward(x):
        return gathered.gathered_outputs(x, weights, layer.k, chunk=5)

    if BACKEND == "tensorflow":
        import tensorflow as tf

        forward = tf.function(
            forward,
            input_signature=[tf.TensorSpec((None, INPUT_DIM), tf.float32)],
        )
    elif BACKEND == "jax":
        import jax

        forward = jax.jit(forward)
    for rows in (1, 5):
        x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
        np.testing.assert_allclose(
            as_numpy(forward(x)),
            as_numpy(layer.masked_outputs(x)),
            atol=1e-5,
        )


def test_gathered_full_path_dequantizes(rng):
    """An int8 kernel with per-neuron scales (Keras's convention: float =
    int / scale) and per-row input scales gives the float dot products."""
    kernel = rng.integers(-127, 128, size=(UNITS, INPUT_DIM)).astype("int8")
    scale = rng.uniform(0.5, 2.0, size=(UNITS,)).astype("float32")
    rows = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    rows_scale = rng.uniform(0.5, 2.0, size=(3, 1)).astype("float32")
    selected = np.stack([rng.permutation(UNITS)[:7] for _ in range(3)])
    for chunk in (None, 3):
        values = gathered.gathered_full_path(
            rows,
            kernel,
            selected.astype("int32"),
            chunk=chunk,
            kernel_scale=scale,
            rows_scale=rows_scale,
        )
        dense = (rows @ kernel.T.astype("float32")) / scale / rows_scale
        expected = np.take_along_axis(dense, selected, axis=1)
        np.testing.assert_allclose(as_numpy(values), expected, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("chunk", [None, 2, 7])
def test_gathered_full_path_adds_the_bias(rows, chunk, rng):
    kernel = rng.normal(size=(UNITS, INPUT_DIM)).astype("float32")
    bias = rng.normal(size=(UNITS,)).astype("float32")
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    selected = np.stack([rng.permutation(UNITS)[:7] for _ in range(rows)])
    values = gathered.gathered_full_path(
        x, kernel, selected.astype("int32"), chunk=chunk, bias=bias
    )
    expected = np.take_along_axis(x @ kernel.T + bias, selected, axis=1)
    np.testing.assert_allclose(
        as_numpy(values), expected, rtol=1e-5, atol=1e-5
    )


def test_selected_indices_without_top_k(rng):
    mask = np.zeros((4, 30), "float32")
    for row in mask:
        row[rng.permutation(30)[:9]] = 1.0
    indices = as_numpy(gathered.selected_indices(mask, 9))
    expected = np.stack([np.flatnonzero(row) for row in mask])
    np.testing.assert_array_equal(indices, expected)
