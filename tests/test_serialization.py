import keras
import numpy as np
import pytest
from keras import ops

from keras_midl import MIDL

LAYER_KWARGS = [
    {"units": 16},
    {
        "units": 16,
        "k_ratio": 0.3,
        "rank": 3,
        "light_path": "zero",
        "temperature": 0.5,
        "gate_noise": 0.2,
        "activation": "relu",
        "use_bias": False,
        "kernel_initializer": "he_normal",
        "bias_initializer": "ones",
        "kernel_regularizer": "l2",
        "bias_regularizer": "l1",
        "activity_regularizer": "l2",
        "kernel_constraint": "max_norm",
        "bias_constraint": "non_neg",
        "selection": "bisection",
        "inference_path": "gathered",
        "seed": 3,
        "name": "gated",
    },
]


@pytest.mark.parametrize("kwargs", LAYER_KWARGS)
def test_config_round_trip(kwargs, rng):
    layer = MIDL(**kwargs)
    x = rng.normal(size=(4, 10)).astype("float32")
    expected = ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    for key in kwargs:
        assert key in config, key
    clone = MIDL.from_config(config)
    assert clone.get_config() == config
    clone.build((None, 10))
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(x)), expected)


def test_serialize_deserialize_by_registered_name():
    config = keras.saving.serialize_keras_object(MIDL(8, k_ratio=0.25))
    assert config["registered_name"] == "keras_midl>MIDL"
    layer = keras.saving.deserialize_keras_object(config)
    assert isinstance(layer, MIDL) and layer.k == 2


def sequential_model():
    return keras.Sequential(
        [
            keras.Input((10,)),
            MIDL(16, k_ratio=0.4, activation="relu", gate_noise=0.1, seed=1),
            MIDL(8, k_ratio=0.5, light_path="zero"),
            keras.layers.Dense(3),
        ]
    )


def functional_model():
    inputs = keras.Input((5, 10))
    hidden = MIDL(16, k_ratio=0.4, activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(
        keras.layers.GlobalAveragePooling1D()(hidden)
    )
    return keras.Model(inputs, outputs)


@keras.saving.register_keras_serializable(package="keras_midl_tests")
class Subclassed(keras.Model):
    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = MIDL(units, k_ratio=0.4, activation="relu")
        self.head = keras.layers.Dense(3)

    def call(self, inputs):
        return self.head(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@pytest.mark.parametrize(
    "make_model, input_shape",
    [
        (sequential_model, (6, 10)),
        (functional_model, (6, 5, 10)),
        (Subclassed, (6, 10)),
    ],
)
def test_keras_file_round_trip(make_model, input_shape, tmp_path, rng):
    model = make_model()
    x = rng.normal(size=input_shape).astype("float32")
    y = rng.integers(0, 3, size=(input_shape[0],))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    midl_layers = [
        layer for layer in restored._flatten_layers() if isinstance(layer, MIDL)
    ]
    assert midl_layers
