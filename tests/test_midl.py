"""keras_midl.midl: the MIDL layer (equations, arguments, gate, training,
mixed precision, Keras's layer contract), its int8 quantization and its
serialization."""

import inspect
import os
import warnings

import keras
import numpy as np
import pytest
from backend_utils import BACKEND
from backend_utils import value_and_gradients
from backend_utils import variable_gradients
from keras import ops
from keras.src import testing as keras_testing

import keras_midl
from keras_midl import MIDL
from keras_midl import backend as backends
from keras_midl import native
from keras_midl.lowrank import default_rank
from keras_midl.ops import dispatch


def to_numpy(x):
    return ops.convert_to_numpy(x)


def built_layer(input_dim=12, **kwargs):
    kwargs.setdefault("units", 20)
    layer = MIDL(**kwargs)
    layer.build((None, input_dim))
    return layer


@pytest.mark.parametrize(
    "input_shape", [(1, 12), (5, 12), (3, 4, 12), (2, 3, 4, 12)]
)
def test_output_shape(input_shape, rng):
    layer = MIDL(20, k_ratio=0.3)
    x = rng.normal(size=input_shape).astype("float32")
    y = layer(x)
    assert tuple(y.shape) == input_shape[:-1] + (20,)
    assert layer.compute_output_shape(input_shape) == input_shape[:-1] + (20,)


@pytest.mark.parametrize(
    "input_shape, k_ratio, expected_k",
    [
        ((6, 12), 0.3, 6),
        ((2, 5, 12), 0.45, 9),
        ((1, 12), 0.5, 10),
        ((4, 12), 0.01, 1),
        ((4, 12), 1.0, 20),
    ],
)
def test_gate_selects_exactly_k_per_row(input_shape, k_ratio, expected_k, rng):
    layer = MIDL(20, k_ratio=k_ratio)
    x = rng.normal(size=input_shape).astype("float32")
    layer(x)
    assert layer.k == expected_k
    mask = to_numpy(layer.gate(x)["mask"])
    assert mask.shape == input_shape[:-1] + (20,)
    np.testing.assert_array_equal(mask.sum(axis=-1), expected_k)
    assert set(np.unique(mask)) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "input_dim, units, expected",
    [
        (784, 512, 22),
        (128, 64, 3),
        (64, 3000, 3),
        (2, 100, 1),
        (4096, 4096, 32),
    ],
)
def test_default_rank(input_dim, units, expected):
    rank = default_rank(input_dim, units)
    assert rank == expected
    if 1 < rank < 32:  # the largest rank within 10% of the Dense cost
        assert rank * (input_dim + 2 * units) <= 0.1 * input_dim * units
        assert (rank + 1) * (input_dim + 2 * units) > 0.1 * input_dim * units
    layer = built_layer(input_dim=input_dim, units=units)
    assert tuple(layer.projection.shape) == (input_dim, expected)


def test_weights_and_shapes():
    layer = built_layer(input_dim=12, units=20, rank=3)
    shapes = {v.name: tuple(v.shape) for v in layer.trainable_variables}
    assert shapes == {
        "kernel": (20, 12),
        "bias": (20,),
        "projection": (12, 3),
        "gate_kernel": (3, 20),
        "gate_bias": (20,),
        "light_kernel": (3, 20),
        "light_bias": (20,),
    }
    zero = built_layer(light_path="zero", use_bias=False, rank=3)
    names = sorted(v.name for v in zero.trainable_variables)
    assert names == ["gate_bias", "gate_kernel", "kernel", "projection"]


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_k_ratio_one_equals_dense(activation, rng):
    x = rng.normal(size=(8, 12)).astype("float32")
    dense = keras.layers.Dense(20, activation=activation)
    expected = to_numpy(dense(x))
    layer = MIDL(20, k_ratio=1.0, activation=activation)
    layer.build((None, 12))
    layer.kernel.assign(ops.transpose(dense.kernel))
    layer.bias.assign(dense.bias)
    for training in (False, True):
        actual = to_numpy(layer(x, training=training))
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def hand_forward(layer, x):
    """NumPy forward pass of the DESIGN equations, before the activation."""
    w = lambda v: to_numpy(v).astype("float64")  # noqa: E731
    z = x @ w(layer.projection)
    s = z @ w(layer.gate_kernel) + w(layer.gate_bias)
    lite = z @ w(layer.light_kernel) + w(layer.light_bias)
    full = x @ w(layer.kernel).T + w(layer.bias)
    order = np.argsort(-s, axis=-1, kind="stable")
    mask = np.zeros_like(s)
    np.put_along_axis(mask, order[..., : layer.k], 1.0, axis=-1)
    return s, mask, lite, full


def test_forward_matches_the_equations(rng):
    layer = built_layer(input_dim=12, units=20, k_ratio=0.35, rank=4)
    for v in layer.trainable_variables:  # nonzero biases too
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
    x = rng.normal(size=(7, 12)).astype("float32")
    _, mask, lite, full = hand_forward(layer, x.astype("float64"))
    expected = mask * full + (1 - mask) * lite
    np.testing.assert_allclose(
        to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("temperature", [0.3, 0.8, 3.0])
def test_straight_through_gradient_of_gate_bias(temperature, rng):
    """dL/dc equals the sigmoid's gradient times (h_full - h_lite)."""
    layer = built_layer(input_dim=12, units=20, rank=4, temperature=temperature)
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
    x = rng.normal(size=(6, 12)).astype("float32")
    upstream = rng.normal(size=(6, 20)).astype("float32")

    def loss():
        y = layer(x, training=True)
        return ops.sum(y * ops.convert_to_tensor(upstream))

    grads = variable_gradients(layer, loss)
    s, _, lite, full = hand_forward(layer, x.astype("float64"))
    sigmoid = 1 / (1 + np.exp(-s / temperature))
    d_gate = upstream * (full - lite)
    expected = np.sum(d_gate * sigmoid * (1 - sigmoid) / temperature, axis=0)
    np.testing.assert_allclose(
        grads["gate_bias"], expected, rtol=1e-4, atol=1e-5
    )


def test_one_step_updates_every_weight(rng):
    x = rng.normal(size=(32, 12)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    layer = MIDL(16, k_ratio=0.5, rank=3, activation="tanh")
    model = keras.Sequential([keras.Input((12,)), layer, keras.layers.Dense(4)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {v.name: to_numpy(v).copy() for v in layer.trainable_variables}
    assert len(before) == 7
    model.train_on_batch(x, y)
    for v in layer.trainable_variables:
        assert not np.allclose(to_numpy(v), before[v.name]), v.name


def test_zero_light_path_outputs_activation_of_zero(rng):
    layer = MIDL(20, k_ratio=0.25, light_path="zero", activation="sigmoid")
    x = rng.normal(size=(9, 12)).astype("float32")
    y = to_numpy(layer(x))
    mask = to_numpy(layer.gate(x)["mask"])
    np.testing.assert_array_equal(y[mask == 0], 0.5)
    assert np.all(y[mask == 1] != 0.5)


def test_gate_noise_is_seeded_and_training_only(rng):
    x = rng.normal(size=(64, 12)).astype("float32")

    def make(seed):
        layer = MIDL(20, k_ratio=0.3, gate_noise=5.0, seed=seed)
        layer.build((None, 12))
        return layer

    first, second, other_seed = make(7), make(7), make(8)
    quiet = MIDL(20, k_ratio=0.3)
    quiet.build((None, 12))
    for layer in (second, other_seed, quiet):
        layer.set_weights(first.get_weights())

    out_first = to_numpy(first(x, training=True))
    out_second = to_numpy(second(x, training=True))
    np.testing.assert_array_equal(out_first, out_second)
    assert not np.allclose(out_first, to_numpy(other_seed(x, training=True)))

    reference = to_numpy(quiet(x, training=False))
    assert not np.allclose(out_first, reference)
    for training in (False, None):
        np.testing.assert_array_equal(
            to_numpy(first(x, training=training)), reference
        )


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"units": 0}, "units=0"),
        ({"units": -3}, "units=-3"),
        ({"units": 2.5}, "units=2.5"),
        ({"units": 8, "k_ratio": 0.0}, "k_ratio=0.0"),
        ({"units": 8, "k_ratio": 1.5}, "k_ratio=1.5"),
        ({"units": 8, "k_ratio": -0.2}, "k_ratio=-0.2"),
        ({"units": 8, "k_ratio": float("nan")}, "k_ratio=nan"),
        ({"units": 8, "k_ratio": "half"}, "k_ratio='half'"),
        ({"units": 8, "rank": 0}, "rank=0"),
        ({"units": 8, "rank": 1.5}, "rank=1.5"),
        ({"units": 8, "light_path": "dense"}, "light_path='dense'"),
        ({"units": 8, "temperature": 0}, "temperature=0"),
        ({"units": 8, "temperature": -1.0}, "temperature=-1.0"),
        ({"units": 8, "gate_noise": -0.1}, "gate_noise=-0.1"),
        ({"units": 8, "temperature": float("inf")}, "temperature=inf"),
        ({"units": 8, "temperature": float("-inf")}, "temperature=-inf"),
        ({"units": 8, "temperature": float("nan")}, "temperature=nan"),
        ({"units": 8, "gate_noise": float("inf")}, "gate_noise=inf"),
        ({"units": 8, "gate_noise": float("nan")}, "gate_noise=nan"),
        ({"units": 8, "balance_weight": -0.1}, "balance_weight=-0.1"),
        ({"units": 8, "balance_weight": float("inf")}, "balance_weight=inf"),
        ({"units": 8, "balance_weight": float("nan")}, "balance_weight=nan"),
        ({"units": 8, "balance_weight": "0.1"}, "balance_weight='0.1'"),
        ({"units": 8, "selection": "sort"}, "selection='sort'"),
        ({"units": 8, "inference_path": "fast"}, "inference_path='fast'"),
    ],
)
def test_invalid_arguments_raise(kwargs, fragment):
    argument = fragment.split("=")[0]
    with pytest.raises(ValueError, match=f"`{argument}`.*{fragment}"):
        MIDL(**kwargs)


def test_input_of_rank_one_is_rejected():
    layer = MIDL(8)
    with pytest.raises(ValueError, match=r"rank >= 2.*input_shape=\(12,\)"):
        layer.build((12,))


def test_undefined_last_axis_is_rejected():
    layer = MIDL(8)
    with pytest.raises(ValueError, match=r"input_dim.*input_shape=\(4, None\)"):
        layer.build((4, None))


def test_wrong_input_dim_after_build_is_rejected(rng):
    layer = MIDL(8)
    layer(rng.normal(size=(2, 12)).astype("float32"))
    with pytest.raises(ValueError, match="12"):
        layer(rng.normal(size=(2, 5)).astype("float32"))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_rows_stay_local(bad_value, rng):
    layer = MIDL(20, k_ratio=0.3, activation="relu")
    x = rng.normal(size=(4, 12)).astype("float32")
    clean = to_numpy(layer(x))
    x_bad = x.copy()
    x_bad[1, 3] = bad_value
    out = to_numpy(layer(x_bad))
    mask = to_numpy(layer.gate(x_bad)["mask"])
    np.testing.assert_array_equal(mask.sum(axis=-1), layer.k)
    assert not np.all(np.isfinite(out[1]))
    rows = [0, 2, 3]
    np.testing.assert_array_equal(out[rows], clean[rows])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, rng):
    keras.config.set_dtype_policy(policy)
    compute_dtype = policy.split("_")[1]
    layer = MIDL(20, k_ratio=0.3)
    x = rng.normal(size=(5, 12)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == compute_dtype
    for v in layer.weights:
        assert v.dtype == "float32", v.name
    gate = layer.gate(x)
    assert keras.backend.standardize_dtype(gate["logits"].dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(gate["mask"]).sum(-1), layer.k)
    assert np.all(np.isfinite(to_numpy(ops.cast(y, "float32"))))


def test_mixed_precision_training_step(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = keras.Sequential(
        [
            keras.Input((12,)),
            MIDL(16, k_ratio=0.5, activation="relu"),
            keras.layers.Dense(3, dtype="float32"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    x = rng.normal(size=(32, 12)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("shape", [(8, 24), (256, 24), (2, 128, 24)])
def test_matmul_transposed_is_x_times_kernel_transposed(shape, rng):
    """The full path's `inputs @ kernel^T` in the backend's form, for
    small and large row counts and inputs of rank 3, eagerly and traced
    (`keras_midl.backend.tensorflow.matmul_transposed` changes form in
    graphs with many rows)."""
    from keras_midl import backend

    inputs = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(10, shape[-1])).astype("float32")
    want = inputs @ kernel.T
    eager = backend.current().matmul_transposed(
        ops.array(inputs), ops.array(kernel)
    )
    np.testing.assert_allclose(ops.convert_to_numpy(eager), want, rtol=1e-4,
                               atol=1e-4)
    if BACKEND != "tensorflow":
        return
    import tensorflow as tf

    traced = tf.function(backend.current().matmul_transposed)
    np.testing.assert_allclose(
        traced(tf.constant(inputs), tf.constant(kernel)).numpy(), want,
        rtol=1e-4, atol=1e-4,
    )


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="XLA is TensorFlow's and JAX's; torch.compile costs 15-45 s.",
)
def test_fit_with_jit_compile(rng):
    x = rng.normal(size=(64, 12)).astype("float32")
    # Learnable labels: with random ones, 12 Adam steps need not lower the
    # loss.
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((12,)),
            MIDL(16, k_ratio=0.4, gate_noise=0.1, seed=1, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    eager = to_numpy(model.layers[0](x))
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        to_numpy(model.layers[1](eager)),
        rtol=1e-4,
        atol=1e-5,
    )


XOR_OF_SIGNS = "xor_of_signs"


@pytest.mark.parametrize(
    "task, k_ratio",
    [
        # Selection at work: a quarter of the neurons on the full path.
        ("sum_of_two", 0.25),
        # The full path at work: y = [x0 * x1 > 0] needs two directions,
        # and any function of one projection of x (what a rank-1 light
        # path computes) gets about 75% of it right. With k_ratio 1 every
        # neuron is on the full path, so this case fails (about 0.77) if
        # the two paths are swapped.
        (XOR_OF_SIGNS, 1.0),
    ],
)
def test_learns_a_simple_task(task, k_ratio, rng):
    x = rng.normal(size=(512, 10)).astype("float32")
    if task == XOR_OF_SIGNS:
        y = (x[:, 0] * x[:, 1] > 0).astype("int32")
    else:
        y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((10,)),
            MIDL(16, k_ratio=k_ratio, rank=1, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.02),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    assert model.evaluate(x, y, verbose=0)[1] > 0.9


# --- Regression tests of issue 11 ---------------------------------------


def test_light_path_survives_relu_at_initialization(rng):
    """Defect 1's consequence: with `G == U` the gate sent to the light
    path the neurons whose light output was lowest, so few of those outputs
    survived a ReLU (about 9% at 784 -> 512, k_ratio 0.45). With
    independent draws about half do."""
    layer = MIDL(128, k_ratio=0.45, activation="relu")
    layer.build((None, 64))
    x = rng.normal(size=(256, 64)).astype("float32")
    mask = to_numpy(layer.gate(x)["mask"])
    code = x @ to_numpy(layer.projection)
    light = code @ to_numpy(layer.light_kernel) + to_numpy(layer.light_bias)
    surviving = np.mean(light[mask == 0] > 0)
    assert 0.35 < surviving < 0.65, surviving


def test_one_sgd_step_trains_the_light_path():
    """The audit's symptom of defect 1 on a 10 -> 16 ReLU layer (rank 1,
    the default there): one SGD step left the light path unchanged on
    TensorFlow. (Whether the old code shows it depends on the draw;
    `test_light_path_survives_relu_at_initialization` is the robust check.)
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    layer = MIDL(16, activation="relu")
    model = keras.Sequential([keras.Input((10,)), layer, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    assert layer.effective_rank == 1
    before = [to_numpy(layer.light_kernel), to_numpy(layer.light_bias)]
    model.train_on_batch(x, y)
    after = [to_numpy(layer.light_kernel), to_numpy(layer.light_bias)]
    for name, old, new in zip(("light_kernel", "light_bias"), before, after):
        assert not np.allclose(old, new), name


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
@pytest.mark.parametrize(
    "inference_path",
    ["masked", "gathered"],
)
def test_float64_layer(inference_path, rng):
    """A float64 layer works as Dense(dtype="float64") does (defect 2).

    (JAX without `jax_enable_x64` computes float64 layers in float32, for
    Dense as well: the test compares to Dense's dtype.)
    """
    x = rng.normal(size=(5, 6))
    dense_dtype = keras.layers.Dense(4, dtype="float64")(x).dtype
    layer = MIDL(
        4,
        k_ratio=0.5,
        dtype="float64",
        inference_path=inference_path,
        gate_noise=0.1,
        seed=2,
        bias_initializer="random_normal",
    )
    y = layer(x)
    assert y.dtype == dense_dtype
    assert keras.backend.standardize_dtype(
        layer.gate(x)["mask"].dtype
    ) == keras.backend.standardize_dtype(dense_dtype)
    _, mask, lite, full = hand_forward(layer, x)
    np.testing.assert_allclose(
        to_numpy(y), mask * full + (1 - mask) * lite, rtol=1e-5, atol=1e-6
    )
    assert layer(x, training=True).dtype == dense_dtype
    inputs = keras.Input((6,), dtype="float64")
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [to_numpy(v).copy() for v in layer.trainable_variables]
    loss = model.train_on_batch(x, np.ones((5, 4)))
    assert np.isfinite(loss)
    for old, v in zip(before, layer.trainable_variables):
        assert not np.allclose(old, to_numpy(v)), v.name


@pytest.mark.parametrize("selection", ["top_k", "bisection"])
@pytest.mark.parametrize("inference_path", ["masked", "gathered", "auto"])
@pytest.mark.parametrize("input_shape", [(0, 6), (2, 0, 6)])
def test_empty_batch(selection, inference_path, input_shape):
    """An empty batch gives an empty output, as Dense (defect 3)."""
    layer = MIDL(
        4,
        selection=selection,
        inference_path=inference_path,
        gate_noise=0.5,
        seed=1,
    )
    x = np.ones(input_shape, "float32")
    for training in (False, True):
        y = layer(x, training=training)
        assert tuple(y.shape) == (*input_shape[:-1], 4)
    assert tuple(layer.gate(x)["mask"].shape) == (*input_shape[:-1], 4)


def test_k_ratio_can_be_set_and_k_follows(rng):
    layer = MIDL(20, k_ratio=0.5)
    x = rng.normal(size=(6, 12)).astype("float32")
    layer(x)
    assert layer.k == 10
    layer.k_ratio = 0.25
    assert layer.k_ratio == 0.25 and layer.k == 5
    assert layer.get_config()["k_ratio"] == 0.25
    np.testing.assert_array_equal(to_numpy(layer.gate(x)["mask"]).sum(-1), 5)
    assert (
        layer.inference_multiply_adds()
        == built_layer(k_ratio=0.25).inference_multiply_adds()
    )
    with pytest.raises(ValueError, match="`k_ratio`.*k_ratio=1.5"):
        layer.k_ratio = 1.5
    assert layer.k_ratio == 0.25
    with pytest.raises(AttributeError, match="k_ratio"):
        layer.k = 3
    assert layer.k == 5


@pytest.mark.parametrize(
    "method",
    [
        lambda layer: layer.gate(np.ones((2, 6), "float32")),
        lambda layer: layer.inference_multiply_adds(),
    ],
    ids=["gate", "inference_multiply_adds"],
)
def test_unbuilt_layer_gives_a_clear_error(method):
    layer = MIDL(4)
    with pytest.raises(ValueError, match="not built.*build"):
        method(layer)
    assert layer.inference_multiply_adds(input_dim=6) == 6 + 4 + 4 + 2 * 6


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_gate_outputs_match_the_equations(temperature, rng):
    layer = built_layer(
        input_dim=12, units=20, k_ratio=0.35, rank=4, temperature=temperature
    )
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    x = rng.normal(size=(7, 12)).astype("float32")
    s, mask, _, _ = hand_forward(layer, x.astype("float64"))
    gate = {key: to_numpy(value) for key, value in layer.gate(x).items()}
    np.testing.assert_allclose(gate["logits"], s, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gate["mask"], mask)
    np.testing.assert_allclose(
        gate["probabilities"],
        1 / (1 + np.exp(-gate["logits"].astype("float64") / temperature)),
        rtol=1e-5,
        atol=1e-7,
    )


def test_temperature_changes_gradients_not_outputs(rng):
    x = rng.normal(size=(6, 12)).astype("float32")
    outputs, gradients = [], []
    for temperature in (0.5, 2.0):
        layer = built_layer(temperature=temperature, rank=4)
        for v in layer.trainable_variables:
            v.assign(np.random.default_rng(1).normal(size=v.shape) * 0.5)
        outputs.append(to_numpy(layer(x, training=True)))
        grads = variable_gradients(
            layer, lambda layer=layer: ops.sum(layer(x, training=True))
        )
        gradients.append(grads["gate_bias"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.allclose(gradients[0], gradients[1])


POLICIES = ["float32", "mixed_float16", "mixed_bfloat16"]


def mask_revealing_layer(policy, inference_path="masked", **kwargs):
    """A layer whose output is its mask: `W = 0, b = 1, U = 0, b_lite = 0`,
    no activation, so each output is 1 on the full path and 0 on the light
    path (exact in every dtype)."""
    keras.config.set_dtype_policy(policy)
    layer = MIDL(24, inference_path=inference_path, **kwargs)
    layer.build((None, 10))
    keras.config.set_dtype_policy("float32")
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    layer.bias.assign(np.ones(24, "float32"))
    layer.light_kernel.assign(np.zeros(layer.light_kernel.shape, "float32"))
    layer.light_bias.assign(np.zeros(24, "float32"))
    return layer


@pytest.mark.parametrize(
    "policy, inference_path",
    [
        ("float32", "masked"),
        ("mixed_float16", "masked"),
        ("mixed_bfloat16", "masked"),
        ("float32", "gathered"),
        ("mixed_float16", "gathered"),
        ("mixed_bfloat16", "gathered"),
    ],
)
def test_gate_mask_is_the_mask_call_uses(policy, inference_path, rng):
    """`gate(x)["mask"]` is the selection `call` makes, under every policy.

    They were two computations, and under mixed_bfloat16 they disagreed on
    about 3% of rows, so `gate_statistics` could report a selection the
    layer never made.
    """
    layer = mask_revealing_layer(
        policy,
        inference_path,
        k_ratio=0.4,
        rank=6,
        bias_initializer="random_normal",
    )
    x = rng.normal(size=(256, 10)).astype("float32")
    used = to_numpy(ops.cast(layer(x), "float32"))
    reported = to_numpy(layer.gate(x)["mask"])
    assert set(np.unique(used)) == {0.0, 1.0}
    np.testing.assert_array_equal(used, reported)


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_gate_runs_in_float32_inside_call(policy, inference_path):
    """Under mixed policies the gate logits are float32 in `call`.

    The gate kernel's entries differ by 2^-14, below the resolution of
    float16 (2^-10 at 1) and bfloat16 (2^-7): in float32 the largest
    entries win; rounded to 16 bits they all tie, and ties go to the
    lowest indices.
    """
    layer = mask_revealing_layer(policy, inference_path, k_ratio=0.25, rank=1)
    layer.projection.assign(np.eye(10, 1, dtype="float32"))
    steps = 1.0 + np.arange(24, dtype="float32") * 2.0**-14
    layer.gate_kernel.assign(steps[None, :])
    layer.gate_bias.assign(np.zeros(24, "float32"))
    x = np.zeros((2, 10), "float32")
    x[:, 0] = [1.0, -1.0]  # code z = +-1, exact in every dtype
    expected = np.zeros((2, 24), "float32")
    expected[0, -6:] = 1  # z = 1: the largest entries of G
    expected[1, :6] = 1  # z = -1: the smallest
    used = to_numpy(ops.cast(layer(x), "float32"))
    np.testing.assert_array_equal(used, expected)
    gate = layer.gate(x)
    assert keras.backend.standardize_dtype(gate["logits"].dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(gate["mask"]), expected)


def _balance_setup(rng, temperature=1.0, balance_weight=0.3):
    layer = built_layer(
        input_dim=12,
        units=10,
        rank=3,
        k_ratio=0.3,
        temperature=temperature,
        balance_weight=balance_weight,
    )
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
    # Neuron 0 is never selected, neuron 1 always.
    bias = to_numpy(layer.gate_bias).copy()
    bias[0], bias[1] = -50.0, 50.0
    layer.gate_bias.assign(bias)
    return layer, rng.normal(size=(16, 12)).astype("float32")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_balance_loss_value_and_gradient(temperature, rng):
    """`w * var_j(f_j) / (k/n)^2`, straight-through gradient."""
    layer, x = _balance_setup(rng, temperature)
    layer(x, training=True)
    (loss,) = layer.losses
    logits = to_numpy(layer.gate(x)["logits"]).astype("float64")
    mask = to_numpy(layer.gate(x)["mask"])
    assert mask[:, 0].sum() == 0 and mask[:, 1].all()
    share = layer.k / layer.units
    frequencies = mask.mean(axis=0)
    expected = 0.3 * np.mean((frequencies - share) ** 2) / share**2
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-5)

    def gradient_of_the_logits(gate):
        # The loss of the frequencies that the training mix returns, the
        # native one where it runs: its gradient reaches the logits
        # through the mix's backward pass.
        full = ops.ones(gate["mask"].shape)

        def balance_loss(logits):
            _, frequencies = dispatch.straight_through_mix(
                gate["mask"],
                logits,
                full,
                ops.zeros(gate["mask"].shape),
                temperature,
                return_frequencies=True,
            )
            return layer._balance_loss(frequencies)

        value, (grad,) = value_and_gradients(
            balance_loss, to_numpy(gate["logits"])
        )
        return value, grad

    value, grad = gradient_of_the_logits(layer.gate(x))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    sigmoid = 1 / (1 + np.exp(-logits / temperature))
    slope = sigmoid * (1 - sigmoid) / temperature
    d_frequency = 0.3 * 2 * (frequencies - share) / (layer.units * share**2)
    np.testing.assert_allclose(
        grad, d_frequency * slope / len(x), rtol=1e-4, atol=1e-9
    )
    # Descent raises the logits of the neurons selected less often than
    # k/n, and lowers the others'.
    layer.gate_bias.assign(np.zeros(10, "float32"))
    gate = layer.gate(x)
    _, grad = gradient_of_the_logits(gate)
    frequencies = to_numpy(gate["mask"]).mean(axis=0)
    np.testing.assert_array_equal(
        np.sign(grad.sum(axis=0)),
        np.sign(frequencies - share),
        err_msg=str(frequencies),
    )


def test_balance_loss_only_in_training_and_when_weighted(rng):
    layer, x = _balance_setup(rng)
    layer(x)
    assert not layer.losses
    unweighted, _ = _balance_setup(rng, balance_weight=0.0)
    unweighted(x, training=True)
    assert not unweighted.losses
    layer(x, training=True)
    assert len(layer.losses) == 1


def test_balance_loss_enters_the_training_loss(rng):
    x = rng.normal(size=(32, 12)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    losses = []
    for weight in (0.0, 5.0):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((12,)),
            MIDL(16, k_ratio=0.25, balance_weight=weight),
            keras.layers.Dense(4),
        ])
        model.compile(keras.optimizers.SGD(0.0), "mse")
        losses.append(model.evaluate(x, y, verbose=0))
        losses.append(model.train_on_batch(x, y))
    # Evaluation adds no balance loss; a training step with weight 5 does.
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[3] > losses[1] + 1e-3


def test_gates_train_when_a_subclassed_model_passes_no_training(rng):
    """The gate gets its straight-through gradient whatever `training` is:
    a subclassed model whose `call` takes no `training` calls its layers
    with `training=None` in `fit`."""

    class NoTrainingArgument(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = MIDL(16, k_ratio=0.4, activation="relu")
            self.head = keras.layers.Dense(3)

        def call(self, inputs):
            return self.head(self.hidden(inputs))

    model = NoTrainingArgument()
    x = rng.normal(size=(32, 10)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model(x)
    gate_kernel = to_numpy(model.hidden.gate_kernel).copy()
    model.fit(x, y, epochs=2, verbose=0)
    assert not np.allclose(to_numpy(model.hidden.gate_kernel), gate_kernel)


class KerasLayerContract(keras_testing.TestCase):
    """Keras's own `run_layer_test` on MIDL: serialization, symbolic and
    eager calls, a training step, mixed precision. (`keras.src.testing`
    is Keras's test harness, imported by tests only.)"""


@pytest.mark.parametrize(
    "init_kwargs, input_shape, output_shape, trainable",
    [
        ({"units": 6, "k_ratio": 0.5}, (2, 5), (2, 6), 7),
        ({"units": 6, "k_ratio": 0.5, "light_path": "zero",
          "use_bias": False}, (2, 3, 5), (2, 3, 6), 4),
        ({"units": 4, "k_ratio": 1.0, "activation": "relu",
          "inference_path": "gathered"}, (3, 5), (3, 4), 7),
    ],
)
def test_keras_run_layer_test(init_kwargs, input_shape, output_shape,
                              trainable):
    case = KerasLayerContract()
    case.run_layer_test(
        MIDL,
        init_kwargs=init_kwargs,
        input_shape=input_shape,
        expected_output_shape=output_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=0,
        expected_num_seed_generators=0,
        supports_masking=True,
    )


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("after_dense", [False, True])
def test_gate_reports_the_mask_that_predict_uses(policy, after_dense, rng):
    """Under a mixed policy `gate(x)` (eager) and the compiled `predict`
    select the same neurons for every row, also when the inputs come from
    a 16-bit layer before it (the audit saw about 1 row in 256 differ on
    JAX under mixed_bfloat16; not reproduced here)."""
    keras.config.set_dtype_policy(policy)
    layer = MIDL(64, k_ratio=0.5, light_path="zero", use_bias=False)
    before = [keras.layers.Dense(48, activation="relu")] if after_dense else []
    model = keras.Sequential([keras.Input((48,)), *before, layer])
    x = rng.normal(size=(512, 48)).astype("float32")
    outputs = keras.ops.convert_to_numpy(
        keras.ops.cast(model.predict(x, verbose=0), "float32")
    )
    hidden = before[0](x) if after_dense else x
    mask = keras.ops.convert_to_numpy(layer.gate(hidden)["mask"]) > 0.5
    # With no light path and no bias the unselected neurons output 0.
    assert not np.any(outputs[~mask])
    assert (mask.sum(axis=1) == 32).all()


# --- int8 quantization (Keras's post-training quantization) -------------




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


# --- Serialization: get_config, .keras files -------------------------------

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
    # LoRA refuses a `kernel_constraint` (as Dense's does): its own set.
    {
        "units": 16,
        "k_ratio": 0.4,
        "rank": 2,
        "lora_rank": 3,
        "lora_alpha": 4.5,
        "name": "adapted",
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
    "lora_rank": 4,
    "lora_alpha": 8,
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
    assert arguments <= set(OTHER_KWARGS)
    assert arguments <= set(LAYER_KWARGS[1]) | set(LAYER_KWARGS[2])


@pytest.mark.parametrize("kwargs", [*LAYER_KWARGS[1:], OTHER_KWARGS])
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


# --- LoRA (`enable_lora`, as Dense's) ---------------------------------------
#
# Every test's name holds "lora": `pytest -k lora` runs this section.


def lora_layer(rng, input_dim=6, units=10, lora_alpha=6, **kwargs):
    """A built MIDL layer, random weights, LoRA of rank 3 with random
    (nonzero) factors."""
    kwargs.setdefault("k_ratio", 0.5)
    kwargs.setdefault("rank", 2)
    layer = MIDL(units, **kwargs)
    layer.build((None, input_dim))
    for variable in layer.weights:
        variable.assign(0.3 * rng.normal(size=variable.shape))
    layer.enable_lora(3, lora_alpha=lora_alpha)
    for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
        variable.assign(0.3 * rng.normal(size=variable.shape))
    return layer


def lora_kernel(layer):
    """NumPy `W^T + lora_alpha / lora_rank * (A B)^T` of a float layer."""
    a = to_numpy(layer.lora_kernel_a).astype("float64")
    b = to_numpy(layer.lora_kernel_b).astype("float64")
    kernel = to_numpy(layer.kernel).astype("float64")
    return kernel + layer.lora_alpha / layer.lora_rank * (a @ b).T


def lora_reference(layer, x):
    """NumPy masked forward (no activation) with the LoRA kernel."""
    x = x.astype("float64")
    _, mask, lite, _ = hand_forward(layer, x)
    full = x @ lora_kernel(layer).T + to_numpy(layer.bias)
    return mask * full + (1 - mask) * lite


def dense_and_midl_with_lora(rng, input_dim, units, quantize=None, **kwargs):
    """A Dense layer and a `k_ratio=1` MIDL layer with the same kernel,
    bias and LoRA factors (`quantize`: int8 before or after
    `enable_lora`)."""
    dense = keras.layers.Dense(
        units, activation="tanh", bias_initializer="random_normal"
    )
    dense.build((None, input_dim))
    layer = MIDL(units, k_ratio=1.0, rank=2, activation="tanh", **kwargs)
    layer.build((None, input_dim))
    # Copies in NumPy: on JAX a shared buffer would be donated by the
    # first `predict` of either layer.
    layer.kernel.assign(to_numpy(dense.kernel).T)
    layer.bias.assign(to_numpy(dense.bias))
    for each in (dense, layer):
        if quantize == "before_lora":
            each.quantize("int8")
        each.enable_lora(3, lora_alpha=6)
        if quantize == "after_lora":
            each.quantize("int8")
    for name in ("lora_kernel_a", "lora_kernel_b"):
        value = 0.5 * rng.normal(size=getattr(dense, name).shape)
        getattr(dense, name).assign(value)
        getattr(layer, name).assign(value)
    return dense, layer


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
@pytest.mark.parametrize("input_dim, units", [(6, 10), (8, 8)])
def test_lora_with_k_ratio_one_equals_dense_with_lora(
    input_dim, units, inference_path, rng
):
    """The outputs and the gradients of the LoRA weights and the bias are
    Dense's. A square kernel (8, 8) catches an update added without the
    transpose to the `(units, input_dim)` kernel."""
    dense, layer = dense_and_midl_with_lora(
        rng, input_dim, units, inference_path=inference_path
    )
    x = rng.normal(size=(5, input_dim)).astype("float32")
    expected = to_numpy(dense(x))
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(layer(x, training=training)),
            expected,
            rtol=1e-5,
            atol=1e-5,
        )
    model = keras.Sequential([keras.Input((input_dim,)), layer])
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
    )
    upstream = ops.convert_to_tensor(
        rng.normal(size=(5, units)).astype("float32")
    )
    grads = variable_gradients(
        layer, lambda: ops.sum(layer(x, training=True) * upstream)
    )
    dense_grads = variable_gradients(
        dense, lambda: ops.sum(dense(x, training=True) * upstream)
    )
    assert "kernel" not in grads and "kernel" not in dense_grads
    for name in ("lora_kernel_a", "lora_kernel_b", "bias"):
        np.testing.assert_allclose(
            grads[name], dense_grads[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("inference_path", ["masked", "gathered", "auto"])
@pytest.mark.parametrize("input_shape", [(1, 6), (5, 6), (2, 3, 6)])
def test_lora_update_reaches_every_path(inference_path, input_shape, rng):
    """Eager calls, training calls and the traced `predict` all compute
    with `W + s A B` (the gathered path for the selected neurons)."""
    layer = lora_layer(rng, inference_path=inference_path)
    x = rng.normal(size=input_shape).astype("float32")
    rows = x.reshape(-1, 6)
    expected = lora_reference(layer, rows).reshape(*input_shape[:-1], 10)
    _, mask, lite, full = hand_forward(layer, rows.astype("float64"))
    without = (mask * full + (1 - mask) * lite).reshape(expected.shape)
    assert not np.allclose(expected, without, atol=1e-3)
    model = keras.Sequential([keras.Input(input_shape[1:]), layer])
    outputs = {
        "eager": to_numpy(layer(x)),
        "training": to_numpy(layer(x, training=True)),
        "predict": model.predict(x, verbose=0),
    }
    for how, actual in outputs.items():
        np.testing.assert_allclose(
            actual, expected, rtol=1e-4, atol=1e-5, err_msg=how
        )


def test_lora_layer_never_runs_the_native_kernel(monkeypatch, rng):
    """The native kernel reads `W` alone: with LoRA the eager gathered
    call runs `keras.ops` (or its compiled call) instead."""
    if not native.available():
        pytest.skip("the native kernel could not be built here")
    module = backends.current()
    native_forward = module.native_forward
    native_calls = []

    def spy(*args, **kwargs):
        native_calls.append(args)
        return native_forward(*args, **kwargs)

    monkeypatch.setattr(module, "native_forward", spy)
    layer = MIDL(10, k_ratio=0.5, rank=2, inference_path="gathered")
    x = rng.normal(size=(2, 6)).astype("float32")
    layer(x)
    assert native_calls and dispatch.native_applies(layer)
    native_calls.clear()
    layer.enable_lora(3)
    layer.lora_kernel_b.assign(rng.normal(size=(3, 10)))
    assert not dispatch.native_applies(layer)
    np.testing.assert_allclose(
        to_numpy(layer(x)), lora_reference(layer, x), rtol=1e-4, atol=1e-5
    )
    assert not native_calls


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
def test_enable_lora_after_a_call_is_used_by_the_next_eager_call(
    inference_path, rng
):
    """Regression guard of the compiled eager calls (TF and JAX): one
    traced before `enable_lora`, or with another `lora_alpha` (a constant
    of the trace), must not be reused."""
    layer = MIDL(10, k_ratio=0.5, rank=2, inference_path=inference_path)
    x = rng.normal(size=(3, 6)).astype("float32")
    before = to_numpy(layer(x))
    layer.enable_lora(3)
    layer.lora_kernel_b.assign(rng.normal(size=(3, 10)))
    outputs = to_numpy(layer(x))
    assert not np.allclose(outputs, before, atol=1e-3)
    np.testing.assert_allclose(
        outputs, lora_reference(layer, x), rtol=1e-4, atol=1e-5
    )
    layer.lora_alpha = 12
    np.testing.assert_allclose(
        to_numpy(layer(x)), lora_reference(layer, x), rtol=1e-4, atol=1e-5
    )
    if BACKEND in ("tensorflow", "jax"):
        assert len(layer.compiled_calls) == 2


@pytest.mark.parametrize("rank", [0, -2, 2.0, True, None, "2"])
def test_enable_lora_rejects_a_bad_rank(rank):
    layer = built_layer()
    with pytest.raises(ValueError, match=f"`rank`.*rank={rank!r}"):
        layer.enable_lora(rank)
    assert not layer.lora_enabled
    assert not any("lora" in w.name for w in layer.weights)


@pytest.mark.parametrize("lora_rank", [0, 1.5, "3"])
def test_lora_rank_argument_is_validated(lora_rank):
    with pytest.raises(ValueError, match=f"`lora_rank`.*={lora_rank!r}"):
        MIDL(4, lora_rank=lora_rank)


@pytest.mark.parametrize("lora_alpha", ["2", float("nan"), True])
def test_lora_alpha_is_validated(lora_alpha):
    with pytest.raises(ValueError, match="`lora_alpha`"):
        MIDL(4, lora_rank=2, lora_alpha=lora_alpha)
    with pytest.raises(ValueError, match="`lora_alpha`"):
        built_layer().enable_lora(2, lora_alpha=lora_alpha)


def test_enable_lora_errors_as_dense():
    with pytest.raises(ValueError, match="isn't yet built"):
        MIDL(4).enable_lora(2)
    layer = built_layer()
    layer.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        layer.enable_lora(2)
    constrained = built_layer(kernel_constraint="max_norm")
    with pytest.raises(ValueError, match="incompatible with kernel const"):
        constrained.enable_lora(2)
    assert not constrained.lora_enabled


def test_lora_fit_trains_the_lora_weights_not_the_kernel(rng):
    layer = MIDL(10, k_ratio=0.5, rank=2)
    model = keras.Sequential([keras.Input((6,)), layer, keras.layers.Dense(3)])
    layer.enable_lora(3)
    assert [w.name for w in layer.non_trainable_weights] == ["kernel"]
    assert sorted(w.name for w in layer.trainable_weights) == [
        "bias",
        "gate_bias",
        "gate_kernel",
        "light_bias",
        "light_kernel",
        "lora_kernel_a",
        "lora_kernel_b",
        "projection",
    ]
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {w.name: to_numpy(w).copy() for w in layer.weights}
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    for _ in range(2):  # `A` has no gradient while `B` is zero
        model.train_on_batch(x, y)
    for w in layer.weights:
        changed = not np.array_equal(to_numpy(w), before[w.name])
        assert changed == (w.name != "kernel"), w.name


@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
@pytest.mark.parametrize("order", ["before_lora", "after_lora"])
def test_lora_and_int8_equal_dense_with_lora_and_int8(
    order, inference_path, rng
):
    """`quantize("int8")` before or after `enable_lora`: the kernel is int8
    and the update is added in float, as in Dense."""
    dense, layer = dense_and_midl_with_lora(
        rng, 6, 10, quantize=order, inference_path=inference_path
    )
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "int8"
    assert not layer.kernel.trainable
    for name in ("lora_kernel_a", "lora_kernel_b"):
        variable = getattr(layer, name)
        assert variable.trainable
        assert keras.backend.standardize_dtype(variable.dtype) == "float32"
    x = rng.normal(size=(5, 6)).astype("float32")
    expected = to_numpy(dense(x))
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(layer(x, training=training)),
            expected,
            rtol=1e-5,
            atol=1e-5,
        )
    # The update is there: without it the outputs differ.
    layer.lora_kernel_b.assign(ops.zeros((3, 10)))
    assert not np.allclose(to_numpy(layer(x)), expected, atol=1e-3)


def test_int8_lora_trains_the_lora_weights_only_in_the_full_path(rng):
    model = model_with_midl(rng)
    model.quantize("int8")
    layer = model.layers[0]
    layer.enable_lora(2)
    kernel = to_numpy(layer.kernel)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.train_on_batch(
        rng.normal(size=(16, 24)).astype("float32"),
        rng.normal(size=(16, 5)).astype("float32"),
    )
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    assert np.any(to_numpy(layer.lora_kernel_b) != 0)


def lora_model(rng, quantize=None):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            MIDL(10, k_ratio=0.5, rank=2, bias_initializer="random_normal"),
            keras.layers.Dense(3),
        ]
    )
    layer = model.layers[0]
    if quantize == "before_lora":
        model.quantize("int8")
    layer.enable_lora(3, lora_alpha=6)
    if quantize == "after_lora":
        model.quantize("int8")
    return model, layer


@pytest.mark.parametrize("quantize", [None, "before_lora", "after_lora"])
def test_lora_model_saves_the_merged_kernel_and_loads(quantize, tmp_path, rng):
    """As Dense: the update is merged into the saved kernel (an int8
    kernel dequantized, merged, quantized again), the LoRA weights are
    not saved; the loaded layer has LoRA with a zero update."""
    model, layer = lora_model(rng, quantize)
    for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
        variable.assign(0.3 * rng.normal(size=variable.shape))
    if quantize is None:
        merged = lora_kernel(layer)
    else:
        scale = to_numpy(layer.kernel_scale).astype("float64")[:, None]
        a = to_numpy(layer.lora_kernel_a).astype("float64")
        b = to_numpy(layer.lora_kernel_b).astype("float64")
        merged = to_numpy(layer.kernel) / scale + 2.0 * (a @ b).T
    x = rng.normal(size=(8, 6)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    new = loaded.layers[0]
    assert new.lora_enabled and (new.lora_rank, new.lora_alpha) == (3, 6)
    assert new.quantization_mode == (None if quantize is None else "int8")
    np.testing.assert_array_equal(to_numpy(new.lora_kernel_b), 0)
    actual = loaded.predict(x, verbose=0)
    if quantize is None:
        np.testing.assert_allclose(to_numpy(new.kernel), merged, atol=1e-6)
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        # Quantized again: within half a step of the merged kernel, each
        # neuron's largest weight at +-127.
        values = to_numpy(new.kernel)
        np.testing.assert_array_equal(np.abs(values).max(axis=1), 127)
        scale = to_numpy(new.kernel_scale)[:, None]
        assert np.all(np.abs(values / scale - merged) <= 0.5 / scale + 1e-6)
        np.testing.assert_allclose(
            actual, expected, atol=0.03 * np.abs(expected).max()
        )


@pytest.mark.parametrize("quantize", [None, "before_lora", "after_lora"])
def test_lora_model_with_a_zero_update_reloads_identically(
    quantize, tmp_path, rng
):
    model, layer = lora_model(rng, quantize)
    x = rng.normal(size=(8, 6)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("quantize", [None, "before_lora", "after_lora"])
def test_lora_layer_saves_and_loads_as_dense_does(quantize, tmp_path, rng):
    """A `k_ratio=1` layer and a Dense layer with the same weights and
    LoRA, saved and loaded, still give the same outputs."""
    dense, layer = dense_and_midl_with_lora(rng, 6, 10, quantize=quantize)
    x = rng.normal(size=(5, 6)).astype("float32")
    loaded = []
    for each in (dense, layer):
        model = keras.Sequential([keras.Input((6,)), each])
        path = os.path.join(tmp_path, f"{each.name}.keras")
        model.save(path)
        loaded.append(keras.saving.load_model(path).layers[0])
    assert loaded[1].lora_enabled
    np.testing.assert_allclose(
        to_numpy(loaded[1](x)), to_numpy(loaded[0](x)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("quantize", [None, "before_lora"])
def test_lora_weights_load_into_a_model_without_lora(quantize, tmp_path, rng):
    """The saved kernel holds the update: a model without LoRA loading
    the weights computes the same (natively again where it may)."""
    model, layer = lora_model(rng, quantize)
    layer.lora_kernel_b.assign(0.3 * rng.normal(size=(3, 10)))
    x = rng.normal(size=(8, 6)).astype("float32")
    path = os.path.join(tmp_path, "tuned.weights.h5")
    model.save_weights(path)
    plain = keras.Sequential(
        [
            keras.Input((6,)),
            MIDL(10, k_ratio=0.5, rank=2),
            keras.layers.Dense(3),
        ]
    )
    if quantize:
        plain.quantize("int8")
    plain.load_weights(path)
    assert not plain.layers[0].lora_enabled
    expected = model.predict(x, verbose=0)
    atol = 1e-6 if quantize is None else 0.03 * np.abs(expected).max()
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, atol=atol)
    if quantize is None:
        np.testing.assert_allclose(
            to_numpy(plain.layers[0].kernel), lora_kernel(layer), atol=1e-6
        )


def test_loaded_lora_layer_can_train_again(tmp_path, rng):
    """Unlike Dense's (both LoRA weights zeroed, so both gradients stay
    zero), a loaded layer's `lora_kernel_a` keeps its draw and
    `lora_kernel_b` trains."""
    model, layer = lora_model(rng)
    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    new = loaded.layers[0]
    assert np.any(to_numpy(new.lora_kernel_a) != 0)
    loaded.compile(keras.optimizers.SGD(0.1), "mse")
    loaded.train_on_batch(
        rng.normal(size=(16, 6)).astype("float32"),
        rng.normal(size=(16, 3)).astype("float32"),
    )
    assert np.any(to_numpy(new.lora_kernel_b) != 0)


def test_lora_rank_argument_enables_lora_at_build(rng):
    layer = MIDL(10, rank=2, lora_rank=3, lora_alpha=4.5)
    assert not layer.lora_enabled
    layer.build((None, 6))
    assert layer.lora_enabled and not layer.kernel.trainable
    # `Dense`'s build drops `lora_alpha` (resets it to the rank); not here.
    assert (layer.lora_rank, layer.lora_alpha, layer.lora_scale) == (
        3,
        4.5,
        1.5,
    )
    assert tuple(layer.lora_kernel_a.shape) == (6, 3)
    assert tuple(layer.lora_kernel_b.shape) == (3, 10)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (3, 4.5)
    clone = MIDL.from_config(config)
    clone.build((None, 6))
    assert clone.lora_enabled and clone.get_config() == config


@pytest.mark.parametrize("lora_alpha, expected", [(None, 4), (2.0, 2.0)])
def test_enable_lora_records_rank_and_alpha_in_the_config(
    lora_alpha, expected
):
    layer = built_layer()
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (None, None)
    layer.enable_lora(4, lora_alpha=lora_alpha)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (4, expected)
    assert layer.lora_scale == expected / 4


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
@pytest.mark.parametrize(
    "policy, lora_dtype",
    [("mixed_bfloat16", "float32"), ("float64", "float64")],
)
@pytest.mark.parametrize("inference_path", ["masked", "gathered"])
def test_lora_weights_dtype_and_outputs_under_a_policy(
    policy, lora_dtype, inference_path, rng
):
    layer = MIDL(10, k_ratio=0.5, rank=2, dtype=policy)
    layer.inference_path = inference_path
    layer.build((None, 6))
    layer.enable_lora(3)
    layer.lora_kernel_b.assign(rng.normal(size=(3, 10)))
    for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
        assert keras.backend.standardize_dtype(variable.dtype) == lora_dtype
    # Exact in bfloat16: the gate sees the inputs the reference sees.
    x = np.round(4 * rng.normal(size=(4, 6))).astype("float32") / 4
    outputs = layer(x)
    # (JAX without `jax_enable_x64` computes float64 layers in float32, as
    # it does Dense's.)
    dense_dtype = keras.layers.Dense(4, dtype=policy)(x).dtype
    assert outputs.dtype == dense_dtype
    rtol, atol = (1e-5, 1e-6) if policy == "float64" else (0.02, 0.1)
    np.testing.assert_allclose(
        to_numpy(ops.cast(outputs, "float32")),
        lora_reference(layer, x),
        rtol=rtol,
        atol=atol,
    )
