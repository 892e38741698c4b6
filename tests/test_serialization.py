import inspect

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
        "balance_weight": 0.05,
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


# Two sets of non-default values for every argument: a `get_config` that
# writes a constant, or the default, for any argument fails on one of them.
OTHER_KWARGS = {
    "units": 7,
    "k_ratio": 0.6,
    "rank": 5,
    "light_path": "lowrank",
    "temperature": 2.5,
    "gate_noise": 0.7,
    "balance_weight": 1.5,
    "activation": "tanh",
    "use_bias": True,
    "kernel_initializer": "lecun_uniform",
    "bias_initializer": "random_normal",
    "kernel_regularizer": "l1",
    "bias_regularizer": "l2",
    "activity_regularizer": "l1",
    "kernel_constraint": "unit_norm",
    "bias_constraint": "max_norm",
    "selection": "top_k",
    "inference_path": "auto",
    "seed": 11,
    "name": "other",
}
OBJECT_ARGUMENTS = {
    "activation": keras.activations,
    "kernel_initializer": keras.initializers,
    "bias_initializer": keras.initializers,
    "kernel_regularizer": keras.regularizers,
    "bias_regularizer": keras.regularizers,
    "activity_regularizer": keras.regularizers,
    "kernel_constraint": keras.constraints,
    "bias_constraint": keras.constraints,
}


def test_every_argument_is_tested():
    arguments = set(inspect.signature(MIDL.__init__).parameters)
    arguments -= {"self", "kwargs", "quantization_config"}
    assert arguments <= set(OTHER_KWARGS) and arguments <= set(LAYER_KWARGS[1])


@pytest.mark.parametrize("kwargs", [LAYER_KWARGS[1], OTHER_KWARGS])
def test_config_holds_each_constructor_argument(kwargs):
    config = MIDL(**kwargs).get_config()
    for key, value in kwargs.items():
        if key in OBJECT_ARGUMENTS:
            module = OBJECT_ARGUMENTS[key]
            expected = module.serialize(module.get(value))
            assert config[key] == expected, key
            assert type(module.get(config[key])) is type(module.get(value))
        else:
            assert config[key] == value, key
            assert type(config[key]) is type(value), key


def test_config_holds_the_defaults():
    config = MIDL(5).get_config()
    for name, parameter in inspect.signature(MIDL.__init__).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            continue
        if name in OBJECT_ARGUMENTS:
            module = OBJECT_ARGUMENTS[name]
            expected = module.serialize(module.get(parameter.default))
            assert config[name] == expected, name
        elif name != "quantization_config":
            assert config[name] == parameter.default, name


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


def noisy_model():
    return keras.Sequential(
        [
            keras.Input((10,)),
            MIDL(
                16,
                k_ratio=0.4,
                temperature=0.3,
                gate_noise=1.5,
                seed=13,
                activation="relu",
                bias_initializer="random_normal",
            ),
            keras.layers.Dense(3),
        ]
    )


def test_reloaded_layer_trains_identically(tmp_path, rng):
    """A model reloaded from a `.keras` file trains as the original: the
    same gate noise draws (`gate_noise`, `seed`), the same gradients
    (`temperature`, ...), so the same weights after each step.

    Saved before any noisy call: the state of the noise generator is not
    part of the saved weights (as for Keras's Dropout), so a model saved
    after training draws its noise sequence from the start again.
    """
    model = noisy_model()
    path = tmp_path / "noisy.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    probe = keras.saving.load_model(path).layers[0]
    x = rng.normal(size=(32, 10)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    # The noise changes the selection: a reload that lost it would differ.
    assert not np.array_equal(
        ops.convert_to_numpy(probe(x, training=True)),
        ops.convert_to_numpy(probe(x, training=False)),
    )
    for each in (model, restored):
        each.compile(
            keras.optimizers.SGD(0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    for _ in range(2):
        losses = [each.train_on_batch(x, y) for each in (model, restored)]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    for weight, restored_weight in zip(model.weights, restored.weights):
        np.testing.assert_allclose(
            ops.convert_to_numpy(restored_weight),
            ops.convert_to_numpy(weight),
            rtol=1e-6,
            atol=1e-7,
            err_msg=weight.path,
        )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(restored.layers[0](x, training=True)),
        ops.convert_to_numpy(model.layers[0](x, training=True)),
    )
