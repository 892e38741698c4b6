"""Tests of keras_midl.gating: what MIDL and MIDLConv2D share, on both."""

import keras
import numpy as np
import pytest
from backend_utils import BACKEND
from keras import ops

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl import gating
from keras_midl.gating import num_selected


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


# Each kind: a layer of 16 units (filters) and rank 8 from keyword
# arguments, its input shape, and the names of its kernels and biases.
KINDS = {
    "MIDL": (
        lambda **kwargs: MIDL(16, rank=8, **kwargs),
        (None, 16),
        ("kernel", "projection", "gate_kernel", "light_kernel"),
    ),
    "MIDLConv2D": (
        lambda **kwargs: MIDLConv2D(16, 3, rank=8, **kwargs),
        (None, 6, 6, 16),
        ("kernel", "projection", "gate_kernel", "light_conv_kernel",
         "light_kernel"),
    ),
}
BIASES = ("bias", "gate_bias", "light_bias")


def built(kind, **kwargs):
    make, input_shape, _ = KINDS[kind]
    layer = make(**kwargs)
    layer.build(input_shape)
    return layer


@pytest.mark.parametrize("kind", list(KINDS))
def test_both_layers_are_gated_layers(kind):
    assert isinstance(built(kind), gating.GatedLayer)


@pytest.mark.parametrize(
    "k_ratio, units, expected",
    [(0.45, 512, 230), (0.5, 5, 3), (0.25, 6, 2), (0.001, 10, 1), (1.0, 7, 7)],
)
def test_num_selected_rounds_half_up(k_ratio, units, expected):
    assert num_selected(k_ratio, units) == expected


def _seed_generator_initializer():
    return keras.initializers.RandomNormal(seed=keras.random.SeedGenerator(5))


INITIALIZERS = {
    "unseeded": lambda: "glorot_uniform",
    "seeded": lambda: keras.initializers.GlorotUniform(seed=5),
    "seeded_normal": lambda: keras.initializers.RandomNormal(seed=5),
    "seed_generator": _seed_generator_initializer,
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("initializer", list(INITIALIZERS))
def test_every_weight_gets_its_own_draw(kind, initializer):
    """W, V, G, U (and b, b_lite, c) are independent draws.

    Keras initializers are stateless: one instance shared by the weights
    made `G == U` exactly and the overlapping values of W, V, G and U
    perfectly correlated (issue 11, defect 1).
    """
    layer = built(
        kind,
        kernel_initializer=INITIALIZERS[initializer](),
        bias_initializer=keras.initializers.RandomNormal(seed=9),
    )
    assert not np.array_equal(
        to_numpy(layer.gate_kernel), to_numpy(layer.light_kernel)
    )
    kernels = [getattr(layer, name) for name in KINDS[kind][2]]
    draws = [to_numpy(v).reshape(-1)[:128] for v in kernels]
    bias_draws = [to_numpy(getattr(layer, name)) for name in BIASES]
    for group in (draws, bias_draws):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                correlation = np.corrcoef(group[i], group[j])[0, 1]
                # Independent: |r| ~ 1 / sqrt(128) = 0.09 (0.25 for 16).
                assert abs(correlation) < 0.8, (initializer, i, j)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("seed", [5, 2**31 - 2])
def test_seeded_initializer_is_reproducible(kind, seed):
    def weights(seed):
        layer = built(
            kind,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
            bias_initializer=keras.initializers.RandomNormal(seed=seed),
        )
        return [to_numpy(w) for w in layer.weights]

    first, again, other = weights(seed), weights(seed), weights(seed - 1)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", list(KINDS))
def test_initializer_function_is_called_as_is(kind):
    def ones(shape, dtype=None):
        return ops.ones(shape, dtype=dtype)

    layer = built(kind, kernel_initializer=ones)
    for name in KINDS[kind][2]:
        np.testing.assert_array_equal(to_numpy(getattr(layer, name)), 1.0)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rows", [None, 1, 16, 17, 256])
def test_inference_selection_method(kind, rows):
    """Exportable `top_k` on TensorFlow for traces of an unknown batch
    size and small batches, the backend's training method elsewhere; an
    explicit `selection` everywhere."""
    layer = built(kind)
    if BACKEND == "tensorflow" and (rows is None or rows <= 16):
        assert layer.inference_selection_method(rows) == "top_k"
    else:
        assert layer.inference_selection_method(rows) == layer.selection_method
    assert layer.selection_method == gating.FASTEST_SELECTION[BACKEND]
    explicit = built(kind, selection="bisection")
    assert explicit.inference_selection_method(rows) == "bisection"
    assert explicit.selection_method == "bisection"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, "half", None])
def test_k_ratio_setter_names_the_bad_value(kind, value):
    layer = built(kind, k_ratio=0.5)
    with pytest.raises(ValueError, match=f"k_ratio={value!r}"):
        layer.k_ratio = value
    assert layer.k_ratio == 0.5


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbuilt_gate_gives_a_clear_error(kind):
    layer = KINDS[kind][0]()
    with pytest.raises(ValueError, match="not built.*build"):
        layer.gate(np.ones((2, 6, 6, 16), "float32"))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "policy, expected",
    [("float32", "float32"), ("mixed_float16", "float32"),
     ("float64", "float64")],
)
def test_gate_dtype(kind, policy, expected):
    assert built(kind, dtype=policy).gate_dtype == expected


@pytest.mark.parametrize(
    "argument, value",
    [("rank", 0), ("light_path", "dense"), ("temperature", 0.0),
     ("gate_noise", -1.0), ("balance_weight", float("nan")),
     ("selection", "sort"), ("inference_path", "fast")],
)
def test_check_gate_arguments_names_the_argument(argument, value):
    arguments = {
        "k_ratio": 0.5, "rank": None, "light_path": "lowrank",
        "temperature": 1.0, "gate_noise": 0.0, "balance_weight": 0.0,
        "selection": None, "inference_path": "auto",
    }
    gating.check_gate_arguments(**arguments)
    arguments[argument] = value
    with pytest.raises(ValueError, match=f"{argument}={value!r}"):
        gating.check_gate_arguments(**arguments)
