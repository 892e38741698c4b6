import keras
import numpy as np
import pytest
from backend_utils import variable_gradients
from conftest import BACKEND
from keras import ops

from keras_midl import MIDL
from keras_midl.midl import default_rank
from keras_midl.midl import num_selected


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
    "k_ratio, units, expected",
    [(0.45, 512, 230), (0.5, 5, 3), (0.25, 6, 2), (0.001, 10, 1), (1.0, 7, 7)],
)
def test_num_selected_rounds_half_up(k_ratio, units, expected):
    assert num_selected(k_ratio, units) == expected


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


def test_straight_through_gradient_of_gate_bias(rng):
    """dL/dc equals the sigmoid's gradient times (h_full - h_lite)."""
    temperature = 0.8
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


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="XLA is TensorFlow's and JAX's; torch.compile costs 15-45 s.",
)
def test_fit_with_jit_compile(rng):
    x = rng.normal(size=(64, 12)).astype("float32")
    y = rng.integers(0, 3, size=(64,))
    model = keras.Sequential(
        [
            keras.Input((12,)),
            MIDL(16, k_ratio=0.4, gate_noise=0.1, seed=1, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        "adam",
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


def test_learns_a_simple_task(rng):
    x = rng.normal(size=(256, 10)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((10,)),
            MIDL(32, k_ratio=0.25, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    assert model.evaluate(x, y, verbose=0)[1] > 0.9
