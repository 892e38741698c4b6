"""Tests for `MIDL.from_dense` and `keras_midl.convert`."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_midl
from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl.convert import set_calibration_trainable


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


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


def test_convert_a_model_with_a_masking_embedding(rng):
    """`Embedding(mask_zero=True)` adds a `not_equal` operation, without
    weights, to the functional graph (the IMDB benchmark's model)."""
    inputs = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(20, 6, mask_zero=True, name="embedding")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="output")(x))
    tokens = rng.integers(0, 20, size=(8, 7)).astype("int32")
    tokens[:, -2:] = 0  # padding
    converted = keras_midl.convert(model, k_ratio=1.0, rank=2)
    assert layer_types(converted)["hidden"] == "MIDL"
    np.testing.assert_allclose(
        converted.predict(tokens, verbose=0),
        model.predict(tokens, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


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


# --- Conv2D layers ------------------------------------------------------------


def cnn(rng, data_format="channels_last"):
    shape = (8, 8, 3) if data_format == "channels_last" else (3, 8, 8)
    model = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(8, 3, activation="relu", padding="same",
                                data_format=data_format, name="conv_0"),
            keras.layers.Conv2D(12, 3, strides=2, activation="relu",
                                data_format=data_format, name="conv_1"),
            keras.layers.GlobalAveragePooling2D(data_format=data_format),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="output"),
        ]
    )
    for variable in model.weights:
        variable.assign(
            0.3 * rng.normal(size=variable.shape).astype("float32")
        )
    return model


def test_conv2d_layers_are_converted_only_when_asked_for(rng):
    model = cnn(rng)
    types = layer_types(keras_midl.convert(model))
    assert [types[n] for n in ("conv_0", "conv_1", "hidden", "output")] == [
        "Conv2D", "Conv2D", "MIDL", "Dense"
    ]
    both = keras_midl.convert(model, layer_types=("Dense", "Conv2D"))
    types = layer_types(both)
    assert [types[n] for n in ("conv_0", "conv_1", "hidden", "output")] == [
        "MIDLConv2D", "MIDLConv2D", "MIDL", "Dense"
    ]
    convs = keras_midl.convert(model, layer_types="Conv2D")
    assert layer_types(convs)["hidden"] == "Dense"
    named = keras_midl.convert(model, layers=["conv_1", "hidden"])
    types = layer_types(named)
    assert [types[n] for n in ("conv_0", "conv_1", "hidden")] == [
        "Conv2D", "MIDLConv2D", "MIDL"
    ]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_converted_cnn_with_k_ratio_one_predicts_the_original(
    data_format, rng
):
    model = cnn(rng, data_format)
    converted = keras_midl.convert(
        model, k_ratio=1.0, layer_types=("Dense", "Conv2D")
    )
    shape = (6, 8, 8, 3) if data_format == "channels_last" else (6, 3, 8, 8)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        converted.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_converted_cnn_passes_arguments_trains_and_saves(tmp_path, rng):
    model = cnn(rng)
    converted = keras_midl.convert(
        model,
        k_ratio=0.5,
        layers=["conv_0", "conv_1"],
        rank=2,
        trainable="gate_and_light",
        inference_path="auto",
        conv_kwargs={"k_multiple": 4},
    )
    layer = converted.get_layer("conv_1")
    assert isinstance(layer, MIDLConv2D)
    assert (layer.k, layer.rank, layer.inference_path) == (8, 2, "auto")
    names = sorted(v.name for v in converted.trainable_variables)
    assert names == sorted(
        ["projection", "gate_kernel", "gate_bias", "light_conv_kernel",
         "light_kernel", "light_bias"] * 2
    )
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    converted.compile(keras.optimizers.SGD(0.01), "mse")
    converted.fit(x, rng.normal(size=(8, 3)), epochs=1, verbose=0)
    expected = converted.predict(x, verbose=0)
    path = os.path.join(tmp_path, "converted_cnn.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-6
    )


def test_convert_conv2d_errors(rng):
    model = cnn(rng)
    with pytest.raises(ValueError, match="layer_types=\\('Conv3D',\\)"):
        keras_midl.convert(model, layer_types=("Conv3D",))
    with pytest.raises(ValueError, match="is a Conv2D"):
        keras_midl.convert(model, layers=["conv_0"], layer_types="Dense")
    grouped = keras.Sequential(
        [keras.Input((6, 6, 4)),
         keras.layers.Conv2D(4, 3, groups=2, name="grouped"),
         keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="no Conv2D layer to convert"):
        keras_midl.convert(grouped, layer_types="Conv2D")
    with pytest.raises(ValueError, match="groups=2"):
        keras_midl.convert(grouped, layers=["grouped"])
