import keras
import numpy as np
import pytest
from keras import ops

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl import gate_statistics


def model_with_two_gates():
    return keras.Sequential(
        [
            keras.Input((10,)),
            MIDL(16, k_ratio=0.25, activation="relu", name="first"),
            keras.layers.Dense(12, activation="relu"),
            MIDL(8, k_ratio=0.5, name="second"),
            keras.layers.Dense(3),
        ]
    )


def test_model_statistics_match_each_layer_gate(rng):
    model = model_with_two_gates()
    x = rng.normal(size=(40, 10)).astype("float32")
    stats = gate_statistics(model, x)
    assert list(stats) == ["first", "second"]
    second_inputs = model.layers[1](model.layers[0](x))
    expected = {
        "first": model.layers[0].gate(x),
        "second": model.layers[2].gate(second_inputs),
    }
    for name, units, k in (("first", 16, 4), ("second", 8, 4)):
        report = stats[name]
        assert report.mask.shape == (40, units)
        np.testing.assert_array_equal(report.mask.sum(axis=-1), k)
        np.testing.assert_allclose(
            report.logits,
            ops.convert_to_numpy(expected[name]["logits"]),
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            report.selection_frequency, report.mask.mean(axis=0)
        )
        assert report.selection_frequency.sum() == pytest.approx(k)
        assert report.active_fraction == k / units


def test_dead_and_always_on_neurons():
    layer = MIDL(6, k_ratio=0.5, rank=2)
    layer.build((None, 4))
    layer.gate_kernel.assign(np.zeros((2, 6), "float32"))
    layer.gate_bias.assign(np.array([5, 4, 3, -3, -4, -5], "float32"))
    x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    report = gate_statistics(layer, x)[layer.name]
    np.testing.assert_array_equal(report.always_on_neurons, [0, 1, 2])
    np.testing.assert_array_equal(report.dead_neurons, [3, 4, 5])


def test_rank_three_inputs(rng):
    layer = MIDL(8, k_ratio=0.5)
    x = rng.normal(size=(3, 5, 6)).astype("float32")
    layer(x)
    report = gate_statistics(layer, x)[layer.name]
    assert report.mask.shape == (3, 5, 8)
    assert report.selection_frequency.shape == (8,)


def test_model_without_midl_is_rejected():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no MIDL layer"):
        gate_statistics(model, np.zeros((2, 4), "float32"))


def test_non_model_is_rejected():
    with pytest.raises(ValueError, match="model_or_layer"):
        gate_statistics("model", np.zeros((2, 4), "float32"))


def test_subclassed_model_gets_a_clear_error(rng):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = MIDL(8)
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(self.hidden(x))

        @property
        def layers(self):
            return [self.hidden, self.head]

    model = Net()
    x = rng.normal(size=(2, 4)).astype("float32")
    model(x)
    with pytest.raises(ValueError, match="Sequential or Functional"):
        gate_statistics(model, x)


def test_unbuilt_layer_gets_a_clear_error():
    with pytest.raises(ValueError, match="not built.*build"):
        gate_statistics(MIDL(8), np.zeros((2, 4), "float32"))


@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10)])
def test_empty_batch_gets_a_clear_error(shape):
    """No UnboundLocalError from `predict` and no NaN frequencies: an empty
    batch has no selection frequency, so it is rejected."""
    layer = MIDL(8)
    layer.build((None, 10))
    with pytest.raises(ValueError, match=r"empty batch.*\(0, 10\)|empty"):
        gate_statistics(layer, np.zeros(shape, "float32"))
    if len(shape) == 2:
        model = model_with_two_gates()
        with pytest.raises(ValueError, match=r"empty batch.*\(0, 10\)"):
            gate_statistics(model, np.zeros(shape, "float32"))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_statistics_report_the_selection_the_layer_made(policy, rng):
    """Under mixed precision the reported mask is the one `call` used."""
    keras.config.set_dtype_policy(policy)
    layer = MIDL(24, k_ratio=0.4, rank=6, bias_initializer="random_normal")
    layer.build((None, 10))
    keras.config.set_dtype_policy("float32")
    # Full path 1, light path 0: the output is the mask call used.
    layer.kernel.assign(np.zeros((24, 10), "float32"))
    layer.bias.assign(np.ones(24, "float32"))
    layer.light_kernel.assign(np.zeros((6, 24), "float32"))
    layer.light_bias.assign(np.zeros(24, "float32"))
    x = rng.normal(size=(256, 10)).astype("float32")
    used = ops.convert_to_numpy(ops.cast(layer(x), "float32"))
    report = gate_statistics(layer, x)[layer.name]
    np.testing.assert_array_equal(report.mask, used)
    np.testing.assert_allclose(report.selection_frequency, used.mean(axis=0))


def test_midl_conv2d_statistics(rng):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            MIDLConv2D(8, 3, k_ratio=0.25, activation="relu", name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            MIDL(16, k_ratio=0.5, name="dense"),
            keras.layers.Dense(2),
        ]
    )
    x = rng.normal(size=(12, 6, 6, 3)).astype("float32")
    stats = gate_statistics(model, x)
    assert list(stats) == ["conv", "dense"]
    conv = stats["conv"]
    assert conv.mask.shape == conv.logits.shape == (12, 8)
    np.testing.assert_array_equal(conv.mask.sum(axis=-1), 2)
    np.testing.assert_array_equal(
        conv.mask, ops.convert_to_numpy(model.layers[0].gate(x)["mask"])
    )
    assert conv.selection_frequency.shape == (8,)
    assert conv.selection_frequency.sum() == pytest.approx(2)
    assert conv.active_fraction == 0.25
    assert stats["dense"].mask.shape == (12, 16)
    layer_stats = gate_statistics(model.layers[0], x)
    np.testing.assert_array_equal(layer_stats["conv"].mask, conv.mask)
    with pytest.raises(ValueError, match="empty batch"):
        gate_statistics(model.layers[0], np.zeros((0, 6, 6, 3), "float32"))
