"""keras_midl.lowrank: the truncated-SVD factors and `MIDL.from_dense`."""

import keras
import numpy as np
import pytest
from backend_utils import built_dense
from keras import ops

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl.lowrank import lowrank_factors


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


# --- lowrank_factors and from_dense ----------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_lowrank_factors_are_the_best_rank_r_approximation(rank, rng):
    kernel = rng.normal(size=(12, 8))
    v, u = lowrank_factors(kernel, rank)
    singular = np.linalg.svd(kernel, compute_uv=False)
    error = np.linalg.norm(kernel - v @ u)
    # Eckart-Young: the error is the norm of the discarded singular values.
    np.testing.assert_allclose(
        error, np.linalg.norm(singular[rank:]), atol=1e-9
    )
    # The singular values are split evenly: both factors have the same norms.
    np.testing.assert_allclose(
        np.linalg.norm(v, axis=0), np.linalg.norm(u, axis=1)
    )


@pytest.mark.parametrize("rank", [0, 9, 2.5])
def test_lowrank_factors_reject_bad_rank(rank):
    with pytest.raises(ValueError, match=rf"`rank`.*rank={rank}"):
        lowrank_factors(np.ones((12, 8)), rank)


@pytest.mark.parametrize("use_bias", [True, False])
def test_from_dense_copies_weights_and_svd(use_bias, rng):
    dense = built_dense(use_bias=use_bias, rng=rng)
    layer = MIDL.from_dense(dense, k_ratio=0.5, rank=4)
    kernel = to_numpy(dense.kernel)
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel.T)
    v, u = lowrank_factors(kernel, 4)
    np.testing.assert_allclose(to_numpy(layer.projection), v, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.light_kernel), u, rtol=1e-5)
    np.testing.assert_array_equal(
        to_numpy(layer.gate_kernel), to_numpy(layer.light_kernel)
    )
    if use_bias:
        bias = to_numpy(dense.bias)
        np.testing.assert_array_equal(to_numpy(layer.bias), bias)
        np.testing.assert_array_equal(to_numpy(layer.light_bias), bias)
        np.testing.assert_array_equal(to_numpy(layer.gate_bias), bias)
    else:
        assert layer.bias is None and layer.light_bias is None
        np.testing.assert_array_equal(to_numpy(layer.gate_bias), 0.0)


def test_from_dense_carries_the_dense_options():
    dense = keras.layers.Dense(
        6,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.01),
        bias_regularizer=keras.regularizers.L1(0.02),
        activity_regularizer=keras.regularizers.L2(0.03),
        kernel_constraint=keras.constraints.NonNeg(),
        bias_constraint=keras.constraints.MaxNorm(2.0),
        dtype="bfloat16",
    )
    dense.build((None, 5))
    layer = MIDL.from_dense(dense, rank=2, name="converted", seed=3)
    config = layer.get_config()
    assert config["activation"] == "tanh"
    assert config["name"] == "converted" and config["seed"] == 3
    for key in (
        "kernel_regularizer",
        "bias_regularizer",
        "activity_regularizer",
        "kernel_constraint",
        "bias_constraint",
    ):
        assert getattr(layer, key) is getattr(dense, key), key
        assert config[key] is not None, key
    assert layer.dtype_policy.name == "bfloat16"


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("rank", [None, 3])
def test_from_dense_with_k_ratio_one_is_the_dense_layer(activation, rank, rng):
    dense = built_dense(activation=activation, rng=rng)
    x = rng.normal(size=(16, 12)).astype("float32")
    layer = MIDL.from_dense(dense, k_ratio=1.0, rank=rank)
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(layer(x, training=training)),
            to_numpy(dense(x)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_from_dense_at_full_rank_is_exact_for_any_k_ratio(rng):
    # rank = min(d, n): the light path is the full path.
    dense = built_dense(input_dim=8, units=10, activation="relu", rng=rng)
    layer = MIDL.from_dense(dense, k_ratio=0.3, rank=8)
    x = rng.normal(size=(16, 8)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(dense(x)), rtol=1e-4, atol=1e-4
    )


def test_lowrank_gate_picks_the_largest_approximate_preactivations(rng):
    dense = built_dense(rng=rng)
    layer = MIDL.from_dense(dense, k_ratio=0.25, rank=4)
    x = rng.normal(size=(32, 12)).astype("float32")
    v, u = lowrank_factors(to_numpy(dense.kernel), 4)
    approx = x @ v @ u + to_numpy(dense.bias)
    top = np.argsort(-approx, axis=-1)[:, : layer.k]
    expected = np.zeros_like(approx)
    np.put_along_axis(expected, top, 1.0, axis=-1)
    np.testing.assert_array_equal(to_numpy(layer.gate(x)["mask"]), expected)


def test_random_gate_init_keeps_midl_initializers(rng):
    dense = built_dense(rng=rng)
    layer = MIDL.from_dense(dense, rank=4, gate_init="random")
    assert not np.allclose(
        to_numpy(layer.gate_kernel), to_numpy(layer.light_kernel)
    )
    np.testing.assert_array_equal(to_numpy(layer.gate_bias), 0.0)


def test_from_dense_errors(rng):
    dense = built_dense(rng=rng)
    with pytest.raises(ValueError, match="keras.layers.Dense.*EinsumDense"):
        MIDL.from_dense(keras.layers.EinsumDense("ab,bc->ac", (4,)))
    with pytest.raises(ValueError, match="not built"):
        MIDL.from_dense(keras.layers.Dense(4))
    with pytest.raises(ValueError, match=r"`rank`.*\[1, 12\].*rank=13"):
        MIDL.from_dense(dense, rank=13)
    with pytest.raises(ValueError, match="`gate_init`.*gate_init='zeros'"):
        MIDL.from_dense(dense, gate_init="zeros")
    with pytest.raises(ValueError, match=r"\['activation', 'units'\]"):
        MIDL.from_dense(dense, units=3, activation="relu")
    with pytest.raises(ValueError, match="`k_ratio`.*k_ratio=0"):
        MIDL.from_dense(dense, k_ratio=0)
    quantized = built_dense(rng=rng)
    quantized.quantize("int8")
    with pytest.raises(ValueError, match="quantized.*Convert the float"):
        MIDL.from_dense(quantized)


# --- from_conv2d ------------------------------------------------------------


def built_conv2d(rng, data_format="channels_last", use_bias=True, **kwargs):
    kwargs.setdefault("activation", "relu")
    layer = keras.layers.Conv2D(
        8, (3, 3), data_format=data_format, use_bias=use_bias, **kwargs
    )
    shape = (None, 6, 6, 3) if data_format == "channels_last" else (
        None, 3, 6, 6
    )
    layer.build(shape)
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_from_conv2d_with_k_ratio_one_is_the_conv2d_layer(
    data_format, use_bias, rng
):
    conv = built_conv2d(
        rng, data_format, use_bias, strides=2, padding="same"
    )
    layer = MIDLConv2D.from_conv2d(conv, k_ratio=1.0, rank=3)
    assert (layer.strides, layer.padding, layer.data_format) == (
        (2, 2), "same", data_format
    )
    assert layer.use_bias is use_bias and layer.activation is conv.activation
    shape = (4, 6, 6, 3) if data_format == "channels_last" else (4, 3, 6, 6)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(conv(x)), rtol=1e-5, atol=1e-5
    )


def test_from_conv2d_copies_weights_and_svd(rng):
    conv = built_conv2d(rng)
    layer = MIDLConv2D.from_conv2d(conv, k_ratio=0.5, rank=4)
    kernel = to_numpy(conv.kernel)
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    light_conv = to_numpy(layer.light_conv_kernel).reshape(27, 4)
    light = to_numpy(layer.light_kernel)
    singular = np.linalg.svd(kernel.reshape(27, 8), compute_uv=False)
    error = np.linalg.norm(kernel.reshape(27, 8) - light_conv @ light)
    np.testing.assert_allclose(
        error, np.linalg.norm(singular[4:]), rtol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(layer.projection),
        to_numpy(layer.light_conv_kernel).sum(axis=(0, 1)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(to_numpy(layer.gate_kernel), light)
    for name in ("gate_bias", "light_bias"):
        np.testing.assert_array_equal(
            to_numpy(getattr(layer, name)), to_numpy(conv.bias)
        )


def test_from_conv2d_lowrank_gate_ranks_the_mean_preactivation(rng):
    """At full rank, on a constant image and away from the borders, the
    gate logits are the convolution's pre-activation."""
    conv = built_conv2d(rng, activation=None)
    layer = MIDLConv2D.from_conv2d(conv, k_ratio=0.25, rank=8)
    x = np.ones((2, 6, 6, 3), "float32") * np.array(
        [[[[0.5, -1.0, 2.0]]], [[[1.0, 0.3, -0.2]]]], "float32"
    )
    logits = to_numpy(layer.gate(x)["logits"])
    np.testing.assert_allclose(
        logits, to_numpy(conv(x))[:, 1, 1, :], rtol=1e-4, atol=1e-4
    )


def test_from_conv2d_random_gate_and_errors(rng):
    conv = built_conv2d(rng)
    keras.utils.set_random_seed(5)
    layer = MIDLConv2D.from_conv2d(conv, gate_init="random", rank=2)
    assert not np.allclose(
        to_numpy(layer.gate_kernel), to_numpy(layer.light_kernel)
    )
    assert layer.effective_rank == 2
    assert MIDLConv2D.from_conv2d(conv).effective_rank == 1  # the default
    with pytest.raises(ValueError, match="Conv2D"):
        MIDLConv2D.from_conv2d(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="not built"):
        MIDLConv2D.from_conv2d(keras.layers.Conv2D(4, 3))
    grouped = keras.layers.Conv2D(4, 3, groups=2)
    grouped.build((None, 6, 6, 4))
    with pytest.raises(ValueError, match="groups=2"):
        MIDLConv2D.from_conv2d(grouped)
    with pytest.raises(ValueError, match="rank=9"):
        MIDLConv2D.from_conv2d(conv, rank=9)
    with pytest.raises(ValueError, match="gate_init='svd'"):
        MIDLConv2D.from_conv2d(conv, gate_init="svd")
    with pytest.raises(ValueError, match="padding"):
        MIDLConv2D.from_conv2d(conv, padding="same")
