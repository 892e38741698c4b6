"""Tests for `MIDL.from_dense` and `keras_midl.convert`."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_midl
from keras_midl import MIDL
from keras_midl.convert import set_calibration_trainable
from keras_midl.lowrank import lowrank_factors


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def built_dense(input_dim=12, units=20, rng=None, **kwargs):
    rng = rng or np.random.default_rng(0)
    kwargs.setdefault("activation", "relu")
    layer = keras.layers.Dense(units, **kwargs)
    layer.build((None, input_dim))
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer


def mlp(input_dim=12, rng=None):
    rng = rng or np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(24, activation="relu", name="hidden_0"),
            keras.layers.Dense(16, activation="relu", name="hidden_1"),
            keras.layers.Dense(3, activation="softmax", name="output"),
        ]
    )
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def nested_functional(rng):
    """Functional model around a Sequential block, with a BatchNorm."""
    block = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="inner_0"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(16, activation="gelu", name="inner_1"),
        ],
        name="block",
    )
    inputs = keras.Input((10,))
    x = keras.layers.Dense(16, activation="tanh", name="stem")(inputs)
    x = block(x)
    outputs = keras.layers.Dense(4, name="output")(x)
    model = keras.Model(inputs, outputs)
    for variable in model.weights:
        value = rng.normal(size=variable.shape).astype("float32")
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value)
    return model


def layer_types(model):
    return {
        layer.name: type(layer).__name__
        for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.layers.InputLayer)
    }


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


# --- convert ----------------------------------------------------------------


def test_convert_sequential_default_layers_and_exactness(rng):
    model = mlp(rng=rng)
    x = rng.normal(size=(32, 12)).astype("float32")
    converted = keras_midl.convert(model, k_ratio=1.0)
    assert isinstance(converted, keras.Sequential)
    assert layer_types(converted) == {
        "hidden_0": "MIDL",
        "hidden_1": "MIDL",
        "output": "Dense",
    }
    np.testing.assert_allclose(
        converted.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_convert_nested_functional_exact_and_weights_copied(rng):
    model = nested_functional(rng)
    x = rng.normal(size=(32, 10)).astype("float32")
    converted = keras_midl.convert(model, k_ratio=1.0, rank=2)
    types = layer_types(converted)
    assert [types[n] for n in ("stem", "inner_0", "inner_1", "output")] == [
        "MIDL",
        "MIDL",
        "MIDL",
        "Dense",
    ]
    np.testing.assert_allclose(
        converted.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-4,
        atol=1e-5,
    )
    old = {v.path: to_numpy(v) for v in model.get_layer("block").weights}
    for variable in converted.get_layer("block").get_layer("norm").weights:
        match = [p for p in old if p.endswith(variable.path.split("/")[-1])]
        assert any(np.array_equal(old[p], to_numpy(variable)) for p in match)


def test_convert_leaves_the_original_untouched(rng):
    model = nested_functional(rng)
    before = [w.copy() for w in model.get_weights()]
    layers_before = list(model._flatten_layers())
    converted = keras_midl.convert(model, k_ratio=0.5)
    converted.compile("adam", "mse")
    converted.fit(
        rng.normal(size=(16, 10)).astype("float32"),
        rng.normal(size=(16, 4)).astype("float32"),
        epochs=1,
        verbose=0,
    )
    assert list(model._flatten_layers()) == layers_before
    assert not any(isinstance(layer, MIDL) for layer in layers_before)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    own = {id(v) for v in model.weights}
    assert not any(id(v) in own for v in converted.weights)


def test_convert_named_layers(rng):
    model = nested_functional(rng)
    converted = keras_midl.convert(model, layers=["inner_1", "output"])
    types = layer_types(converted)
    assert [types[n] for n in ("stem", "inner_0", "inner_1", "output")] == [
        "Dense",
        "Dense",
        "MIDL",
        "MIDL",
    ]
    assert converted.get_layer("output").k_ratio == 0.5


@pytest.mark.parametrize(
    "layers, message",
    [
        (["hidden_9"], r"\['hidden_9'\] not found.*\['hidden_0', 'hidden_1'"),
        (["dropout"], "is a Dropout"),
        ([], "non-empty list"),
        (3, "non-empty list"),
    ],
)
def test_convert_bad_layer_names(layers, message, rng):
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(24, activation="relu", name="hidden_0"),
            keras.layers.Dropout(0.1, name="dropout"),
            keras.layers.Dense(16, activation="relu", name="hidden_1"),
            keras.layers.Dense(3, name="output"),
        ]
    )
    with pytest.raises(ValueError, match=message):
        keras_midl.convert(model, layers=layers)


def test_convert_errors(rng):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="Sequential and Functional"):
        keras_midl.convert(subclassed)
    with pytest.raises(ValueError, match="not built"):
        keras_midl.convert(keras.Sequential([keras.layers.Dense(4)]))
    only_output = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no Dense layer to convert"):
        keras_midl.convert(only_output)
    with pytest.raises(ValueError, match="`trainable`.*trainable='gate'"):
        keras_midl.convert(mlp(rng=rng), trainable="gate")
    with pytest.raises(ValueError, match="`light_path`"):
        keras_midl.convert(mlp(rng=rng), light_path="none")


def test_convert_passes_midl_arguments(rng):
    converted = keras_midl.convert(
        mlp(rng=rng),
        k_ratio=0.25,
        rank=3,
        light_path="zero",
        inference_path="gathered",
    )
    layer = converted.get_layer("hidden_0")
    assert (layer.k_ratio, layer.rank, layer.light_path) == (0.25, 3, "zero")
    assert layer.inference_path == "gathered" and layer.light_kernel is None


@pytest.mark.parametrize("trainable", ["gate_and_light", "all"])
def test_calibration_trainable(trainable, rng):
    model = mlp(rng=rng)
    converted = keras_midl.convert(model, k_ratio=0.5, trainable=trainable)
    names = sorted(v.path for v in converted.trainable_variables)
    if trainable == "all":
        assert len(names) == len(converted.weights)
        return
    assert all(
        n.split("/")[-1]
        in (
            "projection",
            "gate_kernel",
            "gate_bias",
            "light_kernel",
            "light_bias",
        )
        for n in names
    ), names
    assert len(names) == 10
    frozen = {v.path: to_numpy(v) for v in converted.non_trainable_variables}
    converted.compile(keras.optimizers.SGD(0.1), "mse")
    converted.fit(
        rng.normal(size=(32, 12)).astype("float32"),
        rng.normal(size=(32, 3)).astype("float32"),
        epochs=2,
        verbose=0,
    )
    for variable in converted.non_trainable_variables:
        np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])
    set_calibration_trainable(converted, "all")
    assert len(converted.trainable_variables) == len(converted.weights)


def test_converted_model_saves_and_loads(tmp_path, rng):
    model = nested_functional(rng)
    converted = keras_midl.convert(model, k_ratio=0.45)
    x = rng.normal(size=(16, 10)).astype("float32")
    expected = converted.predict(x, verbose=0)
    path = os.path.join(tmp_path, "converted.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-6
    )
    assert isinstance(loaded.get_layer("block").get_layer("inner_0"), MIDL)
