"""The gathered inference path computes what the masked path computes."""

import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_midl import midl as midl_module
from keras_midl.midl import GATHERED_MAX_ROWS
from keras_midl.midl import MIDL


def make_pair(input_shape, units, **kwargs):
    """A masked and a gathered MIDL layer with the same (random) weights."""
    kwargs.setdefault("bias_initializer", "random_normal")
    # Both selections give the same mask (tests/test_selection_methods.py);
    # top_k is a single op, fast in eager mode on every backend.
    kwargs.setdefault("selection", "top_k")
    masked = MIDL(units, inference_path="masked", **kwargs)
    gathered = MIDL(units, inference_path="gathered", **kwargs)
    masked.build(input_shape)
    gathered.build(input_shape)
    gathered.set_weights(masked.get_weights())
    return masked, gathered


def as_numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


# One input_dim and few row shapes: on JAX each new shape costs compilations.
CASES = [
    # input shape, units, layer keyword arguments
    ((1, 16), 24, {}),
    ((6, 16), 24, {"k_ratio": 0.25, "light_path": "zero"}),
    ((6, 16), 24, {"k_ratio": 1.0, "activation": "relu"}),
    ((6, 16), 24, {"k_ratio": 0.01, "use_bias": False}),
    ((2, 3, 16), 24, {"k_ratio": 0.9, "light_path": "zero"}),
    ((2, 3, 16), 24, {"use_bias": False, "activation": "tanh"}),
    ((1, 3, 16), 40, {"k_ratio": 0.45}),
]


@pytest.mark.parametrize("input_shape, units, kwargs", CASES)
def test_gathered_equals_masked(input_shape, units, kwargs, rng):
    masked, gathered = make_pair(input_shape, units, **kwargs)
    x = rng.normal(size=input_shape).astype("float32")
    expected = as_numpy(masked(x, training=False))
    outputs = as_numpy(gathered(x, training=False))
    assert outputs.shape == input_shape[:-1] + (units,)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_shape", [(1, 16), (2, 3, 16)])
def test_gathered_equals_masked_in_compiled_predict(input_shape, rng):
    masked, gathered = make_pair(input_shape, 24, k_ratio=0.45)
    x = rng.normal(size=input_shape).astype("float32")
    expected = as_numpy(masked(x, training=False))
    model = keras.Sequential([keras.Input(input_shape[1:]), gathered])
    # XLA on TensorFlow and JAX; torch.compile is too slow for a unit test.
    model.compile(jit_compile=BACKEND in ("tensorflow", "jax"))
    outputs = model.predict(x, batch_size=input_shape[0], verbose=0)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_gathered_handles_extreme_and_tied_gate_logits(rng):
    masked, gathered = make_pair((6, 16), 24, k_ratio=0.5)
    # A zero gate makes every logit equal to its bias: all ties.
    for layer in (masked, gathered):
        layer.gate_kernel.assign(np.zeros((layer.effective_rank, 24)))
        layer.gate_bias.assign(np.zeros((24,)))
    x = rng.normal(size=(6, 16)).astype("float32") * 1e3
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-3,
    )


def test_gathered_keeps_the_compute_dtype(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    masked, gathered = make_pair((6, 16), 24, k_ratio=0.5)
    x = rng.normal(size=(6, 16)).astype("float32")
    outputs = gathered(x, training=False)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    expected = as_numpy(keras.ops.cast(masked(x, training=False), "float32"))
    outputs = as_numpy(keras.ops.cast(outputs, "float32"))
    np.testing.assert_allclose(outputs, expected, rtol=0.05, atol=0.05)


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts the calls of the gathered path."""
    calls = []
    original = MIDL._gathered_outputs

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MIDL, "_gathered_outputs", spy)
    return calls


@pytest.mark.parametrize(
    "input_shape, gathers",
    [
        ((1, 16), True),
        ((8, 16), True),
        ((9, 16), False),
        ((2, 4, 16), True),
        ((2, 8, 16), False),
        ((0, 16), False),
        ((None, 16), False),
        ((1, None, 16), False),
    ],
)
def test_auto_rule_counts_static_rows(input_shape, gathers, monkeypatch):
    monkeypatch.setattr(midl_module, "GATHERED_MAX_ROWS", 8)
    layer = MIDL(24, inference_path="auto")
    assert layer._use_gathered_path(keras.KerasTensor(input_shape)) == gathers


def test_auto_follows_the_default_row_limit():
    layer = MIDL(24, inference_path="auto")
    for rows in (1, 2, 64):
        expected = rows <= GATHERED_MAX_ROWS
        assert layer._use_gathered_path(keras.KerasTensor((rows, 16))) == (
            expected
        )


@pytest.mark.parametrize("rows, gathers", [(1, True), (6, False)])
def test_auto_runs_the_path_its_rule_picks(
    rows, gathers, gathered_calls, monkeypatch
):
    monkeypatch.setattr(midl_module, "GATHERED_MAX_ROWS", 5)
    layer = MIDL(24, inference_path="auto", selection="top_k")
    layer(np.zeros((rows, 16), "float32"), training=False)
    assert bool(gathered_calls) == gathers


@pytest.mark.parametrize("path", ["masked", "gathered", "auto"])
def test_training_always_uses_the_masked_path(path, gathered_calls, rng):
    masked, other = make_pair((6, 16), 24)
    other.inference_path = path
    x = rng.normal(size=(6, 16)).astype("float32")
    np.testing.assert_array_equal(
        as_numpy(other(x, training=True)), as_numpy(masked(x, training=True))
    )
    assert not gathered_calls


def test_masked_path_never_gathers(gathered_calls):
    layer = MIDL(24, inference_path="masked", selection="top_k")
    layer(np.zeros((1, 16), "float32"), training=False)
    assert not gathered_calls
