"""Tests for `MIDL.quantize("int8")` (Keras's post-training quantization)."""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_midl
from keras_midl import MIDL


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def midl_layer(rng, input_dim=24, units=32, **kwargs):
    kwargs.setdefault("k_ratio", 0.4)
    kwargs.setdefault("rank", 4)
    layer = MIDL(units, activation="relu", **kwargs)
    layer.build((None, input_dim))
    for variable in layer.weights:
        variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    return layer


def model_with_midl(rng, **kwargs):
    model = keras.Sequential(
        [
            keras.Input((24,)),
            MIDL(32, k_ratio=0.4, rank=4, activation="relu", **kwargs),
            keras.layers.Dense(5, name="output"),
        ]
    )
    for variable in model.weights:
        variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    return model


def test_int8_stores_the_full_path_kernel_with_per_neuron_scales(rng):
    layer = midl_layer(rng)
    kernel = to_numpy(layer.kernel)
    floats = {
        name: to_numpy(getattr(layer, name))
        for name in ("projection", "gate_kernel", "light_kernel", "bias")
    }
    layer.quantize("int8")
    assert layer.quantization_mode == "int8"
    assert layer.dtype_policy.name == "int8_from_float32"
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "int8"
    assert not layer.kernel.trainable
    scale = to_numpy(layer.kernel_scale)
    assert scale.shape == (32,)
    # One absmax scale per neuron (row of W^T): each row's largest weight
    # maps to +-127, and dequantizing is within half a step.
    np.testing.assert_array_equal(
        np.abs(to_numpy(layer.kernel)).max(axis=1), 127
    )
    dequantized = to_numpy(layer.kernel) / scale[:, None]
    step = 1.0 / scale[:, None]
    assert np.all(np.abs(dequantized - kernel) <= 0.5 * step + 1e-6)
    for name, value in floats.items():  # gate, projection, light stay float
        variable = getattr(layer, name)
        assert keras.backend.standardize_dtype(variable.dtype) == "float32"
        np.testing.assert_array_equal(to_numpy(variable), value)


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
def test_int8_outputs_close_to_float(inference_path, rng):
    layer = midl_layer(rng, inference_path=inference_path)
    x = rng.normal(size=(8, 24)).astype("float32")
    expected = to_numpy(layer(x))
    layer.quantize("int8")
    actual = to_numpy(layer(x))
    # absmax int8 on weights and inputs: about 1% of the output scale.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, atol=0.02 * scale)
    assert not np.array_equal(actual, expected)


def test_int8_gathered_path_equals_masked_path(rng):
    layer = midl_layer(rng)
    layer.quantize("int8")
    x = rng.normal(size=(6, 24)).astype("float32")
    masked = to_numpy(layer(x))
    layer.inference_path = "gathered"
    np.testing.assert_allclose(to_numpy(layer(x)), masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer(x[:1])), masked[:1], rtol=1e-5, atol=1e-5
    )


def test_int8_weight_only_config_is_saved(tmp_path, rng):
    model = model_with_midl(rng)
    x = rng.normal(size=(8, 24)).astype("float32")
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    model.quantize(config=config)
    layer = model.layers[0]
    assert layer.inputs_quantizer is None
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "weight_only.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].inputs_quantizer is None
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-6
    )


def test_weight_quantizer_over_the_wrong_axis_is_rejected(rng):
    layer = midl_layer(rng)
    config = keras.quantizers.Int8QuantizationConfig(
        weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0)
    )
    with pytest.raises(ValueError, match="one scale per neuron.*axis -1"):
        layer.quantize(config=config)


def test_model_quantize_saves_and_loads(tmp_path, rng):
    model = model_with_midl(rng)
    x = rng.normal(size=(16, 24)).astype("float32")
    model.quantize("int8")
    assert [layer.quantization_mode for layer in model.layers] == [
        "int8",
        "int8",
    ]
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "int8.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[0]
    assert layer.quantization_mode == "int8"
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "int8"
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-6
    )
    # The int8 kernel makes the file smaller than the float one.
    float_path = os.path.join(tmp_path, "float.keras")
    model_with_midl(rng).save(float_path)
    assert os.path.getsize(path) < os.path.getsize(float_path)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
def test_float_save_load_variable_order(tmp_path, use_bias, light_path, rng):
    model = model_with_midl(rng, use_bias=use_bias, light_path=light_path)
    x = rng.normal(size=(8, 24)).astype("float32")
    path = os.path.join(tmp_path, "float.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for old, new in zip(model.layers[0].weights, loaded.layers[0].weights):
        assert old.name == new.name
        np.testing.assert_array_equal(to_numpy(old), to_numpy(new))
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_converted_and_quantized_model_saves_and_loads(tmp_path, rng):
    dense = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    converted = keras_midl.convert(dense, k_ratio=0.5, rank=4)
    converted.quantize("int8")
    x = rng.normal(size=(8, 24)).astype("float32")
    expected = converted.predict(x, verbose=0)
    path = os.path.join(tmp_path, "converted_int8.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_unsupported_modes_raise(mode, rng):
    layer = midl_layer(rng)
    with pytest.raises(NotImplementedError, match=f"'int8' only.*'{mode}'"):
        layer.quantize(mode)
    assert layer.quantization_mode is None


def test_model_quantize_with_unsupported_mode_warns_and_keeps_float(rng):
    # Keras's `Model.quantize` turns a layer's NotImplementedError into a
    # warning and quantizes the layers that support the mode.
    model = model_with_midl(rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("int4")
    assert any("'int8' only" in str(w.message) for w in caught)
    assert model.layers[0].quantization_mode is None
    assert model.layers[1].quantization_mode == "int4"


def test_quantize_errors(rng):
    with pytest.raises(ValueError, match="isn't yet built"):
        MIDL(4).quantize("int8")
    layer = midl_layer(rng)
    layer.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize("int8")


def test_quantized_model_trains_the_float_parts(rng):
    model = model_with_midl(rng)
    model.quantize("int8")
    layer = model.layers[0]
    kernel = to_numpy(layer.kernel)
    gate = to_numpy(layer.gate_kernel)
    inputs = keras.Input((24,))
    stem = keras.layers.Dense(24)
    outer = keras.Model(inputs, model(stem(inputs)))
    outer.compile(keras.optimizers.SGD(0.05), "mse")
    stem_kernel = to_numpy(stem.kernel)
    outer.fit(
        rng.normal(size=(32, 24)).astype("float32"),
        rng.normal(size=(32, 5)).astype("float32"),
        epochs=1,
        verbose=0,
    )
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    assert not np.array_equal(to_numpy(layer.gate_kernel), gate)
    # The custom gradient reaches the layers before the int8 full path.
    assert not np.array_equal(to_numpy(stem.kernel), stem_kernel)
