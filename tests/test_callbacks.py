"""Tests of keras_midl.callbacks."""

import keras
import numpy as np
import pytest

import keras_midl
from keras_midl.callbacks import KRatioWarmup


def model_and_data(k_ratio=0.25, units=16):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8,)),
        keras_midl.MIDL(units, k_ratio=k_ratio, activation="relu",
                        name="midl_a"),
        keras_midl.MIDL(units, k_ratio=0.5, activation="relu",
                        name="midl_b"),
        keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return model, x, y


def light_kernel(model):
    return keras.ops.convert_to_numpy(model.layers[0].light_kernel).copy()


@pytest.mark.parametrize("epochs,start", [(3, 1.0), (2, 0.75), (1, 0.5)])
def test_k_ratio_falls_linearly_to_each_layers_own(epochs, start):
    model, x, y = model_and_data()
    warmup = KRatioWarmup(epochs=epochs, start=start)
    model.fit(x, y, epochs=epochs + 2, callbacks=[warmup], verbose=0)
    for epoch, values in enumerate(warmup.history):
        remaining = max(0.0, 1 - epoch / epochs)
        for value, target in zip(values, (0.25, 0.5)):
            assert value == pytest.approx(
                target + (max(start, target) - target) * remaining
            )
    assert warmup.history[0] == [start, max(start, 0.5)]
    assert warmup.history[-1] == [0.25, 0.5]
    assert [layer.k_ratio for layer in model.layers[:2]] == [0.25, 0.5]


def test_the_traced_train_step_uses_the_new_k_ratio():
    # At k_ratio 1 every neuron takes the full path, so the light path gets
    # no gradient and plain SGD leaves it unchanged. A train step still
    # traced at k_ratio 0.25 would change it.
    model, x, y = model_and_data()
    model.fit(x, y, epochs=1, verbose=0)  # traced at k_ratio 0.25
    before = light_kernel(model)
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(before, light_kernel(model))
    before = light_kernel(model)
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[KRatioWarmup(epochs=1, start=1.0)])
    np.testing.assert_array_equal(before, light_kernel(model))
    # After training: back at 0.25, and predict uses it.
    assert model.layers[0].k_ratio == 0.25
    stats = keras_midl.gate_statistics(model, x)
    assert stats["midl_a"].mask.sum(axis=-1).tolist() == [4] * len(x)


def test_training_stopped_early_ends_at_the_targets():
    model, x, y = model_and_data()

    class StopAtOnce(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    warmup = KRatioWarmup(epochs=5)
    model.fit(x, y, epochs=5, callbacks=[warmup, StopAtOnce()], verbose=0)
    assert warmup.history == [[1.0, 1.0]]
    assert [layer.k_ratio for layer in model.layers[:2]] == [0.25, 0.5]


def test_a_model_without_midl_layers_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no MIDL layer"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 2)), epochs=1, verbose=0,
                  callbacks=[KRatioWarmup(epochs=1)])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"epochs": 0}, "epochs=0"), ({"epochs": 1.5}, "epochs=1.5"),
     ({"epochs": 2, "start": 0}, "start=0"),
     ({"epochs": 2, "start": 1.5}, "start=1.5")],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KRatioWarmup(**kwargs)


def test_midl_conv2d_layers_warm_up_too():
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras_midl.MIDLConv2D(8, 3, k_ratio=0.25, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras_midl.MIDL(8, k_ratio=0.5),
        keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
    warmup = KRatioWarmup(epochs=1)
    model.fit(x, np.zeros(8, "int32"), epochs=2, callbacks=[warmup],
              verbose=0)
    assert warmup.history == [[1.0, 1.0], [0.25, 0.5]]
    assert model.layers[0].k_ratio == 0.25
