"""keras_midl.midl_conv2d: the MIDLConv2D layer (equations against Conv2D,
the gate, the masked, gathered and auto paths, training, mixed precision,
arguments, serialization, cost and quantization)."""

import inspect
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from backend_utils import BACKEND
from backend_utils import run_layer_test
from backend_utils import variable_gradients
from keras import ops

import keras_midl
from keras_midl import MIDLConv2D
from keras_midl import midl_conv2d
from keras_midl.lowrank import default_conv_rank
from keras_midl.ops import gathered_conv as gathered_conv_module
from keras_midl.ops.selection import balance_loss

FORMATS = ["channels_last", "channels_first"]
# (strides, padding, dilation_rate)
GEOMETRIES = [
    ((1, 1), "valid", (1, 1)),
    ((1, 1), "same", (1, 1)),
    ((2, 2), "valid", (1, 1)),
    ((2, 1), "same", (1, 1)),
    ((1, 1), "valid", (2, 2)),
    ((1, 1), "same", (2, 1)),
]


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def image_shape(batch, data_format, size=6, channels=3):
    if data_format == "channels_last":
        return (batch, size, size, channels)
    return (batch, channels, size, size)


def random_layer(rng, input_shape, **kwargs):
    """A built layer with every weight drawn at random (biases included)."""
    kwargs.setdefault("filters", 8)
    kwargs.setdefault("kernel_size", (3, 3))
    layer = MIDLConv2D(**kwargs)
    layer.build(input_shape)
    for variable in layer.weights:
        value = rng.normal(size=variable.shape) * 0.5
        variable.assign(value.astype("float32"))
    return layer


# --- Keras's layer contract -------------------------------------------------


@pytest.mark.parametrize(
    "init_kwargs, input_shape, output_shape, trainable",
    [
        (
            {"filters": 8, "kernel_size": (3, 3), "k_ratio": 0.5},
            (2, 6, 6, 3),
            (2, 4, 4, 8),
            8,
        ),
        (
            {
                "filters": 8,
                "kernel_size": (3, 3),
                "k_ratio": 0.25,
                "light_path": "zero",
                "use_bias": False,
                "padding": "same",
                "strides": (2, 2),
                "data_format": "channels_first",
                "inference_path": "gathered",
            },
            (1, 3, 6, 6),
            (1, 8, 3, 3),
            4,
        ),
        (
            {
                "filters": 6,
                "kernel_size": (3, 2),
                "rank": 2,
                "dilation_rate": (2, 2),
                "activation": "relu",
                "inference_path": "auto",
                "k_multiple": 4,
            },
            (3, 7, 7, 3),
            (3, 3, 5, 6),
            8,
        ),
    ],
)
def test_run_layer_test(init_kwargs, input_shape, output_shape, trainable):
    run_layer_test(
        MIDLConv2D,
        init_kwargs,
        input_shape,
        output_shape,
        expected_num_trainable_weights=trainable,
    )


def test_weights_and_shapes():
    layer = MIDLConv2D(8, 3, rank=2)
    layer.build((None, 6, 6, 3))
    shapes = {v.name: tuple(v.shape) for v in layer.trainable_variables}
    assert shapes == {
        "kernel": (3, 3, 3, 8),
        "bias": (8,),
        "projection": (3, 2),
        "gate_kernel": (2, 8),
        "gate_bias": (8,),
        "light_conv_kernel": (3, 3, 3, 2),
        "light_kernel": (2, 8),
        "light_bias": (8,),
    }
    weights = [to_numpy(v).ravel() for v in layer.weights if v.ndim > 1]
    for i, a in enumerate(weights):  # every weight its own draw
        for b in weights[i + 1 :]:
            n = min(a.size, b.size)
            assert not np.allclose(a[:n], b[:n])


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("strides, padding, dilation_rate", GEOMETRIES)
def test_compute_output_shape_matches_conv2d(
    data_format, strides, padding, dilation_rate
):
    kwargs = dict(
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        data_format=data_format,
    )
    layer = MIDLConv2D(8, (3, 2), **kwargs)
    conv = keras.layers.Conv2D(8, (3, 2), **kwargs)
    shapes = [(None, 7, 9, 3), (2, 8, 10, 3), (None, None, 6, 3)]
    if data_format == "channels_first":
        shapes = [(s[0], s[3], s[1], s[2]) for s in shapes]
    for shape in shapes:
        assert layer.compute_output_shape(shape) == tuple(
            conv.compute_output_shape(shape)
        )


def test_output_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="zero or negative"):
        MIDLConv2D(4, 5).build((None, 3, 3, 2))


# --- The equations ------------------------------------------------------------


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("strides, padding, dilation_rate", GEOMETRIES[:5])
@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
def test_k_ratio_one_equals_conv2d(
    data_format, strides, padding, dilation_rate, inference_path, rng
):
    kwargs = dict(
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        data_format=data_format,
        activation="relu",
    )
    shape = image_shape(3, data_format)
    x = rng.normal(size=shape).astype("float32")
    conv = keras.layers.Conv2D(8, (3, 3), bias_initializer="normal", **kwargs)
    expected = to_numpy(conv(x))
    layer = MIDLConv2D(
        8, (3, 3), k_ratio=1.0, inference_path=inference_path, **kwargs
    )
    layer.build(shape)
    layer.kernel.assign(conv.kernel)
    layer.bias.assign(conv.bias)
    for training in (False, True):
        actual = to_numpy(layer(x, training=training))
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def reference(layer, x):
    """The DESIGN equations from `ops.conv` and NumPy: `(logits, mask,
    full, light)` in channels_last."""
    channels_first = layer.data_format == "channels_first"
    if channels_first:
        x = np.transpose(x, (0, 2, 3, 1))

    def conv(kernel):
        return to_numpy(
            ops.conv(
                x,
                to_numpy(kernel),
                strides=layer.strides,
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
            )
        ).astype("float64")

    w = lambda v: to_numpy(v).astype("float64")  # noqa: E731
    pooled = x.astype("float64").mean(axis=(1, 2))
    logits = pooled @ w(layer.projection) @ w(layer.gate_kernel)
    logits = logits + w(layer.gate_bias)
    order = np.argsort(-logits, axis=-1, kind="stable")
    mask = np.zeros_like(logits)
    np.put_along_axis(mask, order[:, : layer.k], 1.0, axis=-1)
    full = conv(layer.kernel) + w(layer.bias)
    light = conv(layer.light_conv_kernel) @ w(layer.light_kernel)
    light = light + w(layer.light_bias)
    return logits, mask, full, light


@pytest.mark.parametrize("data_format", FORMATS)
def test_forward_matches_the_equations(data_format, rng):
    shape = image_shape(5, data_format)
    layer = random_layer(
        rng, shape, k_ratio=0.375, rank=2, data_format=data_format,
        padding="same",
    )
    x = rng.normal(size=shape).astype("float32")
    logits, mask, full, light = reference(layer, x)
    expected = np.where(mask[:, None, None, :] > 0, full, light)
    actual = to_numpy(layer(x))
    if data_format == "channels_first":
        actual = np.transpose(actual, (0, 2, 3, 1))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    gate = layer.gate(x)
    np.testing.assert_allclose(
        to_numpy(gate["logits"]), logits, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(to_numpy(gate["mask"]), mask)
    np.testing.assert_allclose(
        to_numpy(gate["probabilities"]), 1 / (1 + np.exp(-logits)), rtol=1e-5
    )


@pytest.mark.parametrize(
    "k_ratio, k_multiple, expected_k",
    [(0.5, None, 6), (0.3, None, 4), (0.01, None, 1), (1.0, None, 12),
     (0.3, 8, 8), (0.5, 4, 8), (0.9, 8, 12), (0.01, 3, 3)],
)
def test_gate_selects_exactly_k_per_example(k_ratio, k_multiple, expected_k,
                                            rng):
    layer = MIDLConv2D(12, 3, k_ratio=k_ratio, k_multiple=k_multiple)
    x = rng.normal(size=(7, 6, 6, 3)).astype("float32")
    layer(x)
    assert layer.k == expected_k
    for training in (False, True):
        mask = to_numpy(layer.gate(x, training=training)["mask"])
        assert mask.shape == (7, 12)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask.sum(axis=-1), expected_k)


def test_k_ratio_can_be_set_and_k_is_read_only():
    layer = MIDLConv2D(10, 3, k_ratio=0.5)
    layer.k_ratio = 0.2
    assert layer.k == 2 and layer.get_config()["k_ratio"] == 0.2
    with pytest.raises(ValueError, match="k_ratio=1.5"):
        layer.k_ratio = 1.5
    with pytest.raises(AttributeError, match="read-only"):
        layer.k = 3


def test_zero_light_path_outputs_activation_of_zero(rng):
    layer = MIDLConv2D(
        8, 3, k_ratio=0.25, light_path="zero", activation="sigmoid",
        bias_initializer="ones",
    )
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    y = to_numpy(layer(x))
    mask = to_numpy(layer.gate(x)["mask"])
    unselected = np.broadcast_to(mask[:, None, None, :] == 0, y.shape)
    np.testing.assert_array_equal(y[unselected], 0.5)
    assert np.all(y[~unselected] != 0.5)


def test_default_rank():
    layer = MIDLConv2D(64, 3)
    layer.build((None, 8, 8, 32))
    assert layer.effective_rank == default_conv_rank((3, 3), 32, 64) == 5
    assert tuple(layer.projection.shape) == (32, 5)
    assert tuple(layer.light_conv_kernel.shape) == (3, 3, 32, 5)


@pytest.mark.parametrize(
    "kernel_size, channels, filters",
    [((3, 3), 64, 128), ((1, 1), 16, 16), ((5, 5), 3, 8), ((3, 3), 512, 512)],
)
def test_default_conv_rank_is_the_largest_within_the_budget(
    kernel_size, channels, filters
):
    rank = default_conv_rank(kernel_size, channels, filters)
    patch = np.prod(kernel_size) * channels
    assert 1 <= rank <= 32
    if 1 < rank < 32:
        assert rank * (patch + filters) <= 0.1 * patch * filters
        assert (rank + 1) * (patch + filters) > 0.1 * patch * filters


# --- Inference paths ---------------------------------------------------------


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("strides, padding, dilation_rate", GEOMETRIES)
@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gathered_equals_masked(
    data_format, strides, padding, dilation_rate, light_path, batch, rng
):
    shape = image_shape(batch, data_format, size=7)
    layer = random_layer(
        rng,
        shape,
        k_ratio=0.375,
        data_format=data_format,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        light_path=light_path,
        activation="relu",
    )
    x = rng.normal(size=shape).astype("float32")
    masked = to_numpy(layer(x))
    layer.inference_path = "gathered"
    assert layer.uses_gathered_path(ops.convert_to_tensor(x))
    np.testing.assert_allclose(to_numpy(layer(x)), masked, atol=1e-5)


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts the calls of the gathered path."""
    calls = []
    original = midl_conv2d.gathered_conv

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(midl_conv2d, "gathered_conv", spy)
    return calls


MAX_ROWS = 4


@pytest.fixture
def auto_rule(monkeypatch):
    """`auto` gathers up to `MAX_ROWS` examples of any layer here."""
    monkeypatch.setitem(
        gathered_conv_module.GATHERED_CONV_AUTO_RULES,
        BACKEND,
        gathered_conv_module.ConvAutoRule(max_rows=MAX_ROWS, min_filters=1),
    )


def test_auto_gathers_small_static_batches_only(
    auto_rule, gathered_calls, rng
):
    layer = MIDLConv2D(8, 3, k_ratio=0.5, inference_path="auto")
    for batch in (1, MAX_ROWS, MAX_ROWS + 1, 32):
        layer(rng.normal(size=(batch, 6, 6, 3)).astype("float32"))
    assert gathered_calls == [1, MAX_ROWS]
    # Unknown batch size (a symbolic call): masked.
    del gathered_calls[:]
    model = keras.Sequential([keras.Input((6, 6, 3)), layer])
    assert gathered_calls == []
    # Training always masked.
    layer(np.ones((1, 6, 6, 3), "float32"), training=True)
    assert gathered_calls == []
    # Keras's `predict` traces the layer with the batch's static size.
    model.predict(np.ones((1, 6, 6, 3), "float32"), verbose=0)
    assert gathered_calls and set(gathered_calls) == {1}


def test_masked_never_gathers(gathered_calls, rng):
    layer = MIDLConv2D(8, 3, k_ratio=0.5)
    layer(rng.normal(size=(1, 6, 6, 3)).astype("float32"))
    assert gathered_calls == []


def test_auto_and_gathered_predict_match_masked(auto_rule, rng):
    x = rng.normal(size=(5, 6, 6, 3)).astype("float32")
    outputs = {}
    for path in ("masked", "auto", "gathered"):
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((6, 6, 3)),
                MIDLConv2D(8, 3, k_ratio=0.5, inference_path=path,
                           activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
            ]
        )
        outputs[path] = [
            model.predict(x, batch_size=batch, verbose=0) for batch in (1, 5)
        ]
    for path in ("auto", "gathered"):
        for actual, expected in zip(outputs[path], outputs["masked"]):
            np.testing.assert_allclose(actual, expected, atol=1e-5)


# --- Training ----------------------------------------------------------------


@pytest.mark.parametrize("data_format", FORMATS)
def test_gradients_reach_every_weight(data_format, rng):
    shape = image_shape(6, data_format)
    layer = random_layer(rng, shape, k_ratio=0.5, data_format=data_format,
                         balance_weight=0.0)
    x = rng.normal(size=shape).astype("float32")
    upstream = rng.normal(size=layer.compute_output_shape(shape))

    def loss():
        y = layer(x, training=True)
        return ops.sum(y * ops.convert_to_tensor(upstream.astype("float32")))

    grads = variable_gradients(layer, loss)
    assert len(grads) == 8
    for name, grad in grads.items():
        assert np.all(np.isfinite(grad)), name
        assert np.any(grad != 0), name


def test_gate_bias_gradient_is_the_straight_through_one(rng):
    """dL/dc = sum over pixels of upstream * (full - light) * a (1 - a) / T."""
    temperature = 2.0
    shape = (4, 6, 6, 3)
    layer = random_layer(rng, shape, k_ratio=0.5, temperature=temperature,
                         balance_weight=0.0)
    x = rng.normal(size=shape).astype("float32")
    upstream = rng.normal(size=(4, 4, 4, 8)).astype("float32")
    grads = variable_gradients(
        layer,
        lambda: ops.sum(
            layer(x, training=True) * ops.convert_to_tensor(upstream)
        ),
    )
    logits, _, full, light = reference(layer, x)
    a = 1 / (1 + np.exp(-logits / temperature))
    d_gate = (upstream * (full - light)).sum(axis=(1, 2))
    expected = (d_gate * a * (1 - a) / temperature).sum(axis=0)
    np.testing.assert_allclose(
        grads["gate_bias"], expected, rtol=1e-3, atol=1e-4
    )


def test_balance_loss_only_in_training_and_when_weighted(rng):
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    layer = MIDLConv2D(8, 3, k_ratio=0.25, balance_weight=0.3)
    layer(x)
    assert layer.losses == []
    layer(x, training=True)
    (loss,) = layer.losses
    gate = layer.gate(x)
    expected = balance_loss(gate["mask"], gate["probabilities"], 2, 0.3)
    np.testing.assert_allclose(to_numpy(loss), to_numpy(expected), rtol=1e-6)
    assert float(to_numpy(loss)) > 0
    unweighted = MIDLConv2D(8, 3, balance_weight=0.0)
    unweighted(x, training=True)
    assert unweighted.losses == []


def test_one_fit_step_updates_every_weight(rng):
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 3, size=(16,))
    layer = MIDLConv2D(8, 3, k_ratio=0.5, activation="relu",
                       bias_initializer="random_normal")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            layer,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    before = {v.name: to_numpy(v).copy() for v in layer.trainable_variables}
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for v in layer.trainable_variables:
        assert not np.allclose(to_numpy(v), before[v.name]), v.name


def test_gate_noise_is_seeded_and_training_only(rng):
    x = rng.normal(size=(32, 6, 6, 3)).astype("float32")

    def masks(seed):
        keras.utils.set_random_seed(1)
        layer = MIDLConv2D(8, 3, gate_noise=5.0, seed=seed)
        layer.build(x.shape)
        return (
            to_numpy(layer.gate(x, training=True)["mask"]),
            to_numpy(layer.gate(x)["mask"]),
            to_numpy(layer.gate(x)["mask"]),
        )

    noisy, clean, clean_again = masks(3)
    np.testing.assert_array_equal(clean, clean_again)
    assert not np.array_equal(noisy, clean)
    np.testing.assert_array_equal(masks(3)[0], noisy)


MIXED_POLICY = "mixed_bfloat16" if BACKEND == "jax" else "mixed_float16"


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
def test_mixed_precision(inference_path, rng):
    keras.config.set_dtype_policy(MIXED_POLICY)
    compute_dtype = MIXED_POLICY.split("_")[1]
    layer = MIDLConv2D(8, 3, k_ratio=0.5, inference_path=inference_path,
                       padding="same")
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == compute_dtype
    for v in layer.weights:
        assert v.dtype == "float32", v.name
    gate = layer.gate(x)
    assert keras.backend.standardize_dtype(gate["logits"].dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(gate["mask"]).sum(-1), layer.k)
    assert np.all(np.isfinite(to_numpy(ops.cast(y, "float32"))))


def test_mixed_precision_training_step(rng):
    keras.config.set_dtype_policy(MIXED_POLICY)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            MIDLConv2D(8, 3, k_ratio=0.5, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, dtype="float32"),
        ]
    )
    model.compile("adam", "mse")
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict(x[:1], verbose=0).shape == (1, 3)


# --- Arguments and config ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"filters": 0}, "filters=0"),
        ({"filters": 2.5}, "filters=2.5"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"kernel_size": (3,)}, r"kernel_size=\(3,\)"),
        ({"kernel_size": "3"}, "kernel_size='3'"),
        ({"strides": (1, 0)}, r"strides=\(1, 0\)"),
        ({"dilation_rate": -1}, "dilation_rate=-1"),
        ({"strides": 2, "dilation_rate": 2}, "`strides` and `dilation_rate`"),
        ({"padding": "causal"}, "padding='causal'"),
        ({"padding": 1}, "padding=1"),
        ({"data_format": "nhwc"}, "data_format='nhwc'"),
        ({"k_ratio": 0.0}, "k_ratio=0.0"),
        ({"k_ratio": 1.5}, "k_ratio=1.5"),
        ({"rank": 0}, "rank=0"),
        ({"light_path": "dense"}, "light_path='dense'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"gate_noise": -1.0}, "gate_noise=-1.0"),
        ({"balance_weight": float("nan")}, "balance_weight=nan"),
        ({"selection": "sort"}, "selection='sort'"),
        ({"inference_path": "native"}, "inference_path='native'"),
        ({"k_multiple": 0}, "k_multiple=0"),
    ],
)
def test_invalid_arguments_raise(kwargs, fragment):
    kwargs = {"filters": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        MIDLConv2D(**kwargs)


def test_padding_and_data_format_are_case_insensitive():
    layer = MIDLConv2D(4, 3, padding="SAME", data_format="Channels_First")
    assert layer.padding == "same"
    assert layer.data_format == "channels_first"
    assert MIDLConv2D(4, 3).data_format == keras.config.image_data_format()


@pytest.mark.parametrize(
    "shape, fragment",
    [((None, 6, 3), "4D inputs"), ((None, 6, 6, None), "channel axis")],
)
def test_bad_input_shapes_are_rejected(shape, fragment):
    with pytest.raises(ValueError, match=fragment):
        MIDLConv2D(4, 3).build(shape)


OTHER_KWARGS = {
    "filters": 6,
    "kernel_size": (3, 2),
    "k_ratio": 0.25,
    "rank": 3,
    "light_path": "zero",
    "temperature": 0.5,
    "gate_noise": 0.1,
    "balance_weight": 0.0,
    "strides": (2, 1),
    "padding": "same",
    "data_format": "channels_first",
    "dilation_rate": (1, 1),
    "activation": "relu",
    "use_bias": False,
    "kernel_initializer": "he_normal",
    "bias_initializer": "ones",
    "kernel_regularizer": "l2",
    "bias_regularizer": "l1",
    "activity_regularizer": "l1",
    "kernel_constraint": "unit_norm",
    "bias_constraint": "max_norm",
    "selection": "top_k",
    "inference_path": "auto",
    "k_multiple": 2,
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


def test_config_holds_every_constructor_argument():
    arguments = set(inspect.signature(MIDLConv2D.__init__).parameters)
    assert arguments - {"self", "kwargs"} <= set(OTHER_KWARGS)
    config = MIDLConv2D(**OTHER_KWARGS).get_config()
    for key, value in OTHER_KWARGS.items():
        if key in OBJECT_ARGUMENTS:
            module = OBJECT_ARGUMENTS[key]
            assert config[key] == module.serialize(module.get(value)), key
        else:
            assert config[key] == value, key
    clone = MIDLConv2D.from_config(config)
    assert clone.get_config() == config


def test_config_normalizes_like_conv2d():
    config = MIDLConv2D(4, 3, strides=2, dilation_rate=[1, 1]).get_config()
    conv = keras.layers.Conv2D(4, 3, strides=2).get_config()
    for key in ("kernel_size", "strides", "dilation_rate", "data_format"):
        assert tuple(config[key]) == tuple(conv[key]) or (
            config[key] == conv[key]
        ), key


def test_serialize_deserialize_by_registered_name():
    config = keras.saving.serialize_keras_object(MIDLConv2D(8, 3, k_ratio=0.25))
    assert config["registered_name"] == "keras_midl>MIDLConv2D"
    layer = keras.saving.deserialize_keras_object(config)
    assert isinstance(layer, MIDLConv2D) and layer.k == 2


def test_unbuilt_layer_gives_a_clear_error():
    layer = MIDLConv2D(4, 3)
    with pytest.raises(ValueError, match="not built"):
        layer.gate(np.ones((1, 5, 5, 2)))
    with pytest.raises(ValueError, match="not built"):
        layer.inference_multiply_adds()


# --- Cost and quantization ---------------------------------------------------


@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_inference_multiply_adds(light_path, data_format):
    layer = MIDLConv2D(16, 3, k_ratio=0.5, rank=2, strides=2,
                       light_path=light_path, data_format=data_format)
    shape = image_shape(None, data_format, size=9, channels=4)  # Ho = Wo = 4
    gate = 4 * 2 + 2 * 16
    light = 16 * (36 * 2 + 2 * 16) if light_path == "lowrank" else 0
    full = 16 * 36 * 8
    assert layer.inference_multiply_adds(shape) == gate + light + full
    layer.build(shape)
    assert layer.inference_multiply_adds() == gate + light + full


def test_quantize_raises_a_clear_error():
    layer = MIDLConv2D(4, 3)
    layer.build((None, 6, 6, 3))
    with pytest.raises(NotImplementedError, match="MIDLConv2D.*int8"):
        layer.quantize("int8")


def test_model_quantize_skips_the_layer_with_a_warning(rng):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            MIDLConv2D(8, 3, k_ratio=0.5, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("int8")
    messages = [str(w.message) for w in caught]
    assert any("MIDLConv2D" in m and "int8" in m for m in messages), messages
    assert model.layers[0].quantization_mode is None
    assert model.layers[-1].quantization_mode == "int8"
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=0.1, atol=0.1
    )


def test_exported_from_the_package():
    assert "MIDLConv2D" in keras_midl.__all__
    assert keras_midl.MIDLConv2D is MIDLConv2D


@pytest.mark.parametrize("inference_path", ["masked", "gathered", "auto"])
def test_eager_calls_run_one_compiled_function_per_setting(
    inference_path, rng
):
    """On TensorFlow and JAX an eager inference call runs as one compiled
    function, cached on the layer (op by op, JAX compiled the selection's
    loop again at every call); the outputs are those of the paths."""
    layer = MIDLConv2D(8, 3, k_ratio=0.5, inference_path=inference_path)
    x = rng.normal(size=(1, 6, 6, 3)).astype("float32")
    layer.build(x.shape)
    first = ops.convert_to_numpy(layer(x))
    second = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(first, second)
    reference = (
        layer._activate(layer.gathered_outputs(x))
        if layer.uses_gathered_path(x)
        else layer.masked_outputs(x, training=False)
    )
    np.testing.assert_allclose(
        first, ops.convert_to_numpy(reference), rtol=1e-5, atol=1e-5
    )
    assert len(layer.compiled_calls) == 1
    layer.k_ratio = 0.25  # a new trace: `k` is one of its constants
    layer(x)
    assert len(layer.compiled_calls) == 2
    compiled = [f for f in layer.compiled_calls.values() if f is not None]
    assert bool(compiled) == (BACKEND in ("tensorflow", "jax"))


_PREDICT_ON_ANOTHER_BACKEND = """
import sys

import keras
import numpy as np

import keras_midl  # noqa: F401  (registers the layers)

assert keras.backend.backend() == sys.argv[1]
model = keras.saving.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3]), verbose=0))
"""


@pytest.mark.parametrize(
    "other", [b for b in ("tensorflow", "jax", "torch") if b != BACKEND]
)
def test_a_saved_model_predicts_the_same_on_another_backend(
    other, tmp_path, rng
):
    """`.keras` files are backend-neutral: saved here, loaded and run in a
    process of another backend."""
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        MIDLConv2D(8, 3, k_ratio=0.5, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
    ])
    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "model.keras")
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _PREDICT_ON_ANOTHER_BACKEND,
            other,
            str(tmp_path / "model.keras"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        env={**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), atol=1e-5
    )
