"""Property-based tests of MIDL's invariants, with hypothesis.

Random input ranks (2-4), sizes, `k_ratio`, `rank`, `light_path`, dtype
policies and input scales. Example counts are small and the search is
derandomized, so the file runs in seconds and the same on every CI run.
"""

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_midl import MIDL

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Tolerances relative to the largest output magnitude, per compute dtype.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}

# JAX runs eager ops one by one, compiling each for every new shape: it
# gets fewer examples, drawn from fewer sizes, to stay within seconds.
MAX_EXAMPLES = 4 if keras.backend.backend() == "jax" else 12
FAST = settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None
)


@st.composite
def layer_cases(draw, policies=POLICIES):
    leading = draw(st.lists(st.sampled_from((1, 3)), min_size=1, max_size=3))
    input_dim = draw(st.sampled_from((1, 6, 10)))
    return {
        "input_shape": (*leading, input_dim),
        "units": draw(st.sampled_from((1, 7, 12))),
        "k_ratio": draw(st.floats(0.01, 1.0)),
        "rank": draw(st.sampled_from((None, 1, 3))),
        "light_path": draw(st.sampled_from(("lowrank", "zero"))),
        "activation": draw(st.sampled_from((None, "relu", "tanh"))),
        "policy": draw(st.sampled_from(policies)),
        "scale": draw(st.sampled_from((1e-3, 1.0, 50.0))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(case, **overrides):
    keras.config.set_dtype_policy(case["policy"])
    try:
        layer = MIDL(
            case["units"],
            k_ratio=case["k_ratio"],
            rank=case["rank"],
            light_path=case["light_path"],
            activation=case["activation"],
            bias_initializer="random_normal",
            **overrides,
        )
        layer.build(case["input_shape"])
    finally:
        keras.config.set_dtype_policy("float32")
    inputs = np.random.default_rng(case["seed"]).normal(
        size=case["input_shape"]
    )
    return layer, (case["scale"] * inputs).astype("float32")


def _numpy(tensor):
    return keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32"))


def _assert_close(actual, expected, compute_dtype):
    bound = RELATIVE_TOLERANCE[compute_dtype] * max(
        1.0, float(np.max(np.abs(expected)))
    )
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


@FAST
@given(layer_cases())
def test_exactly_k_selected_and_finite_outputs(case):
    layer, x = _build(case)
    mask = _numpy(layer.gate(x)["mask"])
    assert mask.shape == (*case["input_shape"][:-1], case["units"])
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(axis=-1), layer.k)
    units = case["units"]
    assert layer.k == min(units, max(1, int(case["k_ratio"] * units + 0.5)))
    outputs = _numpy(layer(x))
    assert outputs.shape == mask.shape
    assert np.all(np.isfinite(outputs))


@FAST
@given(layer_cases())
def test_masked_and_gathered_paths_agree(case):
    layer, x = _build(case, inference_path="masked")
    masked = _numpy(layer(x, training=False))
    layer.inference_path = "gathered"
    gathered = _numpy(layer(x, training=False))
    _assert_close(gathered, masked, layer.compute_dtype)


@FAST
@given(layer_cases(policies=("float32",)))
def test_full_k_ratio_equals_dense(case):
    case = {**case, "k_ratio": 1.0}
    layer, x = _build(case)
    dense = keras.layers.Dense(case["units"], activation=case["activation"])
    dense.build(case["input_shape"])
    dense.set_weights([_numpy(layer.kernel).T, _numpy(layer.bias)])
    _assert_close(_numpy(layer(x)), _numpy(dense(x)), "float32")


@FAST
@given(layer_cases())
def test_config_round_trip_preserves_behaviour(case):
    layer, x = _build(case, gate_noise=0.1, seed=5)
    config = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(config)
    if not restored.built:
        restored.build(case["input_shape"])
    restored.set_weights(layer.get_weights())
    assert restored.get_config() == layer.get_config()
    assert restored.compute_dtype == layer.compute_dtype
    np.testing.assert_array_equal(
        _numpy(restored.gate(x)["mask"]), _numpy(layer.gate(x)["mask"])
    )
    np.testing.assert_array_equal(_numpy(restored(x)), _numpy(layer(x)))


@FAST
@given(layer_cases())
def test_gate_mask_is_the_mask_call_uses(case):
    """`gate(x)["mask"]` is the selection `call` makes, under every policy:
    with `W = 0, b = 1, U = 0, b_lite = 0` and no activation, the output is
    that selection."""
    case = {**case, "light_path": "lowrank", "activation": None}
    layer, x = _build(case)
    units = case["units"]
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    layer.bias.assign(np.ones(units, "float32"))
    layer.light_kernel.assign(np.zeros(layer.light_kernel.shape, "float32"))
    layer.light_bias.assign(np.zeros(units, "float32"))
    np.testing.assert_array_equal(
        _numpy(layer(x)), _numpy(layer.gate(x)["mask"])
    )
