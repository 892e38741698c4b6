"""`keras_midl.ops.dispatch`: every inference path of a layer computes what
the masked path computes, `inference_path="auto"` follows its rules, and
the native kernel runs where the rule of the module docstring says: in
eager calls, never inside a trace.

On torch a gathered call the native kernel cannot take (integer inputs)
is compiled by `torch.compile`: each distinct layer shape costs one
compilation, so the cases share a few shapes.
"""

import keras
import numpy as np
import pytest
from backend_utils import BACKEND
from backend_utils import value_and_gradients
from inference_utils import CONFIGS
from inference_utils import INPUT_DIM
from inference_utils import UNITS
from inference_utils import as_numpy
from inference_utils import make_pair
from keras import ops

from keras_midl import backend as backends
from keras_midl import config
from keras_midl import native
from keras_midl.midl import MIDL
from keras_midl.ops import dispatch
from keras_midl.ops.gathered import gathered_outputs
from keras_midl.ops.selection import SELECTION_METHODS
from keras_midl.ops.selection import topk_mask

SHAPES = [(1, INPUT_DIM), (6, INPUT_DIM), (2, 3, INPUT_DIM), (1, 1, INPUT_DIM)]


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts the gathered path's calls: the native kernel, or the
    gathered forward of a trace (counted once per trace)."""
    calls = []
    module = backends.current()
    for owner, name in ((dispatch, "_gathered"), (module, "native_forward")):
        original = getattr(owner, name)

        def spy(*args, original=original, name=name, **kwargs):
            outputs = original(*args, **kwargs)
            if outputs is not None:
                calls.append(name)
            return outputs

        monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture
def switch(monkeypatch):
    """Restores `keras_midl.config`'s switch after the test."""
    monkeypatch.setattr(config, "_enabled", config._enabled)
    return config


# --- Every path equals the masked path -------------------------------------


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_gathered_equals_masked(config_name, input_shape, rng):
    masked, gathered = make_pair(input_shape, **CONFIGS[config_name])
    if config_name == "k_one":
        assert gathered.k == 1
    if config_name == "k_all":
        assert gathered.k == UNITS
    x = rng.normal(size=input_shape).astype("float32")
    expected = as_numpy(masked(x, training=False))
    outputs = as_numpy(gathered(x, training=False))
    assert outputs.shape == input_shape[:-1] + (UNITS,)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        as_numpy(gathered.masked_outputs(x, training=False)),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )


def test_gate_noise_never_reaches_inference(rng):
    masked, gathered = make_pair((6, INPUT_DIM), **CONFIGS["k_half_noise"])
    plain, _ = make_pair((6, INPUT_DIM), k_ratio=0.5)
    plain.set_weights(masked.get_weights())
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)),
        as_numpy(plain(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    # In training the noise changes the selection of some rows.
    noisy = as_numpy(gathered(x, training=True))
    assert not np.allclose(noisy, as_numpy(plain(x, training=True)))


@pytest.mark.parametrize("path", ["gathered", "auto"])
def test_empty_batch(path):
    layer = MIDL(UNITS, inference_path=path, **CONFIGS["k_half"])
    outputs = layer(np.zeros((0, INPUT_DIM), "float32"), training=False)
    assert tuple(outputs.shape) == (0, UNITS)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_gathered_accepts_integer_and_bool_inputs(dtype, rng):
    """Issue 11, defect 4: torch's gathered path rejected these."""
    masked, gathered = make_pair((5, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.integers(0, 3, size=(5, INPUT_DIM)).astype(dtype)
    expected = as_numpy(masked(x.astype("float32"), training=False))
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)), expected, rtol=1e-5, atol=1e-5
    )


def test_gathered_handles_extreme_and_tied_gate_logits(rng):
    masked, gathered = make_pair((6, INPUT_DIM), **CONFIGS["k_half"])
    # A zero gate makes every logit equal to its bias: all ties.
    for layer in (masked, gathered):
        layer.gate_kernel.assign(np.zeros((layer.effective_rank, UNITS)))
        layer.gate_bias.assign(np.zeros((UNITS,)))
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32") * 1e3
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-3,
    )


@pytest.mark.parametrize("input_shape", [(1, INPUT_DIM), (2, 3, INPUT_DIM)])
def test_gathered_equals_masked_in_compiled_predict(input_shape, rng):
    masked, gathered = make_pair(input_shape, **CONFIGS["k_half"])
    x = rng.normal(size=input_shape).astype("float32")
    expected = as_numpy(masked(x, training=False))
    model = keras.Sequential([keras.Input(input_shape[1:]), gathered])
    # XLA on TensorFlow and JAX.
    model.compile(jit_compile=BACKEND in ("tensorflow", "jax"))
    outputs = model.predict(x, batch_size=input_shape[0], verbose=0)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_gathered_keeps_the_compute_dtype(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    masked, gathered = make_pair((6, INPUT_DIM), k_ratio=0.5)
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    outputs = gathered(x, training=False)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    expected = as_numpy(ops.cast(masked(x, training=False), "float32"))
    outputs = as_numpy(ops.cast(outputs, "float32"))
    np.testing.assert_allclose(outputs, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("no_grad", [False, True])
def test_gathered_reads_the_weights_of_a_stateless_call(no_grad, rng):
    """`stateless_call` with other weights: every path computes with those
    (the native kernel and the compiled eager call read the variables'
    values in the stateless scope)."""
    if no_grad and BACKEND != "torch":
        pytest.skip("torch's no_grad")
    masked, gathered = make_pair((2, INPUT_DIM), k_ratio=0.5)
    x = ops.convert_to_tensor(rng.normal(size=(2, INPUT_DIM)), "float32")
    gathered(x, training=False)  # compiles the eager call with old weights
    new_weights = [
        rng.normal(size=w.shape).astype("float32")
        for w in masked.get_weights()
    ]
    masked.set_weights(new_weights)
    expected = as_numpy(masked(x, training=False))
    trainable = [
        ops.convert_to_tensor(new_weights[i])
        for i, v in enumerate(gathered.weights)
        if v.trainable
    ]
    non_trainable = [
        ops.convert_to_tensor(new_weights[i])
        for i, v in enumerate(gathered.weights)
        if not v.trainable
    ]
    assert len(trainable) + len(non_trainable) == len(new_weights)

    def call():
        return gathered.stateless_call(
            trainable, non_trainable, x, training=False
        )[0]

    if no_grad:
        import torch

        with torch.no_grad():
            outputs = call()
    else:
        outputs = call()
    np.testing.assert_allclose(
        as_numpy(outputs), expected, rtol=1e-5, atol=1e-5
    )


# --- Compiled eager calls ---------------------------------------------------


def _numpy_masked(layer, x):
    weights = dispatch.layer_weights(layer)
    code = x @ as_numpy(weights["projection"])
    logits = code @ as_numpy(weights["gate_kernel"]) + as_numpy(
        weights["gate_bias"]
    )
    mask = as_numpy(topk_mask(logits, layer.k))
    full = x @ as_numpy(weights["kernel"]).T + as_numpy(weights["bias"])
    light = code @ as_numpy(weights["light_kernel"]) + as_numpy(
        weights["light_bias"]
    )
    return mask * full + (1 - mask) * light


def test_eager_calls_compile_the_inference(rng):
    """`layer(x)` runs the layer's inference as one compiled function on
    TensorFlow and JAX (op by op, the gate costs 10-50x Dense), cached on
    the layer; torch runs eagerly."""
    layer = MIDL(UNITS, k_ratio=0.5, selection="bisection")
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    outputs = as_numpy(layer(x, training=False))
    layer(x, training=False)
    compiled = [f for f in layer.compiled_calls.values() if f is not None]
    assert len(compiled) == (BACKEND in ("tensorflow", "jax"))
    np.testing.assert_allclose(
        outputs, _numpy_masked(layer, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("path", ["auto", "masked"])
def test_a_new_k_ratio_is_used_by_the_next_eager_call(path, rng):
    """Regression: the compiled eager call kept the `k` of its trace, so
    `layer.k_ratio = 1.0` after a call changed nothing (TF and JAX)."""
    layer = MIDL(48, k_ratio=0.25, inference_path=path)
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    layer(x)
    layer.k_ratio = 1.0
    assert layer.k == 48
    outputs = as_numpy(layer(x))
    full = x @ as_numpy(layer.kernel).T + as_numpy(layer.bias)
    np.testing.assert_allclose(
        as_numpy(layer.masked_outputs(x)), full, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(outputs, full, rtol=1e-5, atol=1e-5)


def test_a_new_activation_is_used_by_the_next_eager_call(rng):
    """Regression: the compiled eager call kept the activation of its
    trace (TF and JAX)."""
    layer = MIDL(48, k_ratio=0.25)
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    assert (as_numpy(layer(x)) < 0).any()
    layer.activation = keras.activations.relu
    outputs = as_numpy(layer(x))
    assert (outputs >= 0).all()
    np.testing.assert_allclose(
        outputs, as_numpy(layer.masked_outputs(x)), rtol=1e-5, atol=1e-5
    )


def test_quantize_after_a_call_is_used_by_the_next_eager_call(rng):
    """Regression: an eager call after `quantize("int8")` must compute with
    the int8 kernel, as the masked path of the quantized layer does."""
    layer = MIDL(48, k_ratio=0.25)
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    before = as_numpy(layer(x))
    layer.quantize("int8")
    outputs = as_numpy(layer(x))
    expected = as_numpy(layer.masked_outputs(x))
    assert not np.allclose(before, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_compiled_calls_are_keyed_on_what_the_trace_depends_on(rng):
    if BACKEND == "torch":
        pytest.skip("torch compiles no eager call")
    layer = MIDL(UNITS, k_ratio=0.5, inference_path="auto")
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    layer(x)
    layer(x[:1])
    assert len(layer.compiled_calls) == 1
    layer.k_ratio = 0.25
    layer(x)
    layer.inference_path = "masked"
    layer(x)
    assert len(layer.compiled_calls) == 3
    layer.quantize("int8")
    assert not layer.compiled_calls


# --- The "auto" rules -------------------------------------------------------


def test_auto_rule_values_measured():
    """The tables as measured (benchmarks/latency.py)."""
    rules = dispatch.NATIVE_AUTO_RULES
    assert set(rules) == {"tensorflow", "jax", "torch"}
    assert rules["torch"] == dispatch.AutoRule(8, 1024**2, 0.75)
    assert rules["tensorflow"] == dispatch.AutoRule(8, 4096**2, 0.75)
    assert rules["jax"] == dispatch.AutoRule(2, 4096**2, 0.45)
    # torch has no traced rule (under `torch.compile` the torch-ops path
    # runs).
    traced = dispatch.TRACED_AUTO_RULES
    assert set(traced) == {"tensorflow", "jax"}
    assert traced["tensorflow"] == dispatch.AutoRule(1, 4096**2, 0.25)
    assert traced["jax"] == dispatch.AutoRule(2, 2048**2, 0.25)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch", "numpy"])
def test_auto_rule_follows_its_table(backend, traced):
    rules = dispatch.TRACED_AUTO_RULES if traced else dispatch.NATIVE_AUTO_RULES
    rule = rules.get(backend)
    for rows in (None, 0, 1, 2, 3, 4, 8, 16, 256):
        for d in (512, 1024, 2048, 4096, 8192):
            for k_ratio in (0.1, 0.25, 0.45, 0.75, 1.0):
                expected = (
                    rule is not None
                    and rows is not None
                    and 1 <= rows <= rule.max_rows
                    and d * d >= rule.min_weights
                    and k_ratio <= rule.max_k_ratio
                )
                got = dispatch.use_gathered_path(
                    rows, d, d, k_ratio, backend=backend, traced=traced
                )
                assert got == expected, (rows, d, k_ratio)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_auto_is_masked_at_batch_16_and_above(backend, traced):
    """Measured: at 16 rows or more the masked path is faster everywhere."""
    for rows in (16, 32, 256, 4096):
        for d in (1024, 4096, 16384):
            assert not dispatch.use_gathered_path(
                rows, d, d, 0.25, backend=backend, traced=traced
            )


def test_auto_rule_defaults_to_the_current_backend():
    assert dispatch.use_gathered_path(1, 8192, 8192, 0.25) == (
        BACKEND in dispatch.NATIVE_AUTO_RULES
    )


def test_auto_in_a_trace_without_a_rule_runs_masked(
    gathered_calls, monkeypatch, rng
):
    for backend in list(dispatch.TRACED_AUTO_RULES):
        monkeypatch.delitem(dispatch.TRACED_AUTO_RULES, backend)
    masked, layer = make_pair((1, INPUT_DIM), k_ratio=0.25)
    layer.inference_path = "auto"
    model = keras.Sequential([keras.Input((INPUT_DIM,)), layer])
    x = rng.normal(size=(1, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not gathered_calls


@pytest.mark.parametrize(
    "input_shape, rows",
    [
        ((1, 16), 1),
        ((9, 16), 9),
        ((2, 4, 16), 8),
        ((0, 16), 0),
        ((None, 16), None),
        ((1, None, 16), None),
    ],
)
def test_static_rows(input_shape, rows):
    assert dispatch.static_rows(keras.KerasTensor(input_shape)) == rows


def test_auto_asks_its_rule_the_rows_of_an_eager_call(
    native_calls, monkeypatch
):
    seen = []

    def rule(rows, input_dim, units, k_ratio, backend=None, traced=False):
        seen.append((rows, input_dim, units, k_ratio, traced))
        return False

    monkeypatch.setattr(dispatch, "use_gathered_path", rule)
    layer = MIDL(UNITS, k_ratio=0.3, inference_path="auto")
    layer(np.zeros((2, 4, INPUT_DIM), "float32"))
    assert seen == [(8, INPUT_DIM, UNITS, 0.3, False)]
    assert not native_calls


def _rules_say(gathers, monkeypatch):
    """Both rules of "auto" (eager with the native kernel, and traced) say
    `gathers` for this test's layers."""
    monkeypatch.setattr(
        dispatch, "use_gathered_path", lambda *a, **k: gathers
    )
    for backend in dispatch.TRACED_AUTO_RULES:
        monkeypatch.setitem(
            dispatch.TRACED_AUTO_RULES,
            backend,
            dispatch.AutoRule(8, 1 if gathers else 10**12, 1.0),
        )


@pytest.mark.parametrize("gathers", [True, False])
def test_auto_runs_the_path_its_rule_picks(
    gathers, gathered_calls, monkeypatch, rng
):
    if gathers and BACKEND == "torch" and not native.available():
        pytest.skip("torch's auto gathers with the native kernel only")
    _rules_say(gathers, monkeypatch)
    masked, layer = make_pair((1, INPUT_DIM), k_ratio=0.25)
    layer.inference_path = "auto"
    x = rng.normal(size=(1, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert bool(gathered_calls) == gathers


@pytest.mark.parametrize("path", ["masked", "gathered", "auto"])
def test_training_always_uses_the_masked_path(
    path, gathered_calls, monkeypatch, rng
):
    _rules_say(True, monkeypatch)
    masked, other = make_pair((6, INPUT_DIM), **CONFIGS["k_half_noise"])
    other.inference_path = path
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    np.testing.assert_array_equal(
        as_numpy(other(x, training=True)), as_numpy(masked(x, training=True))
    )
    assert not gathered_calls


def test_masked_path_never_gathers(gathered_calls, monkeypatch):
    _rules_say(True, monkeypatch)
    layer = MIDL(UNITS, inference_path="masked", selection="top_k")
    layer(np.zeros((1, 16), "float32"), training=False)
    keras.Sequential([keras.Input((16,)), layer]).predict(
        np.zeros((1, 16), "float32"), verbose=0
    )
    assert not gathered_calls


# --- Where the native kernel runs ------------------------------------------


def test_native_applies_to_float32_layers_with_native_kernels_on(switch):
    layer = MIDL(UNITS)
    layer.build((None, INPUT_DIM))
    assert dispatch.native_applies(layer) == native.available()
    switch.disable_native_kernels()
    assert not dispatch.native_applies(layer)
    switch.enable_native_kernels()
    assert dispatch.native_applies(layer) == native.available()
    mixed = MIDL(UNITS, dtype="mixed_bfloat16")
    mixed.build((None, INPUT_DIM))
    assert not dispatch.native_applies(mixed)


@pytest.mark.parametrize(
    "activation_quantizer, quantizes",
    [
        ("default", True),
        (None, False),
        (keras.quantizers.AbsMaxQuantizer(value_range=(-100, 100)), None),
    ],
)
def test_native_applies_to_int8_layers_whose_inputs_it_can_quantize(
    activation_quantizer, quantizes
):
    layer = MIDL(UNITS)
    layer.build((None, INPUT_DIM))
    layer.quantize("int8", config=keras.quantizers.Int8QuantizationConfig(
        activation_quantizer=activation_quantizer))
    assert dispatch.native_quantizes_inputs(layer) is quantizes
    assert dispatch.native_applies(layer) == (
        quantizes is not None and native.available()
    )


@pytest.mark.parametrize("activation_quantizer", ["default", None])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_int8_eager_calls_run_the_native_kernel_as_the_keras_ops_path(
    activation_quantizer, rows, native_calls, rng
):
    """An int8 layer's eager call (torch: under `no_grad`) runs the native
    int8 kernel and computes what its masked `keras.ops` int8 path does:
    inputs quantized per row as Keras does, exact integer sums."""
    masked, gathered = make_pair((rows, INPUT_DIM), k_ratio=0.25,
                                 activation="relu")
    config = keras.quantizers.Int8QuantizationConfig(
        activation_quantizer=activation_quantizer)
    masked.quantize("int8", config=config)
    gathered.quantize("int8", config=config)
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    del native_calls[:]
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            outputs = as_numpy(gathered(x, training=False))
    else:
        outputs = as_numpy(gathered(x, training=False))
    assert "sparse_forward_pointers" in native_calls
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_int8_torch_calls_recording_gradients_take_the_keras_ops_path(
    native_calls, rng
):
    if BACKEND != "torch":
        pytest.skip("torch records gradients in eager calls")
    masked, gathered = make_pair((2, INPUT_DIM), k_ratio=0.25)
    masked.quantize("int8")
    gathered.quantize("int8")
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    del native_calls[:]
    outputs = as_numpy(gathered(x, training=False))
    assert native_calls == []
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_native_kernel_reads_the_weights_assigned_after_a_call(
    int8, native_calls, rng
):
    """Nothing read from the variables outlives a call: after
    `set_weights`, the native kernel computes with the new weights (on
    TensorFlow it reads each variable's handle, `_current_value`)."""
    masked, gathered = make_pair((1, INPUT_DIM), k_ratio=0.25)
    _, source = make_pair((1, INPUT_DIM), k_ratio=0.25)
    for layer in (masked, gathered, source):
        layer.inference_path = "gathered"
        if int8:
            layer.quantize("int8")
    x = rng.normal(size=(1, INPUT_DIM)).astype("float32")

    def call(layer):
        if BACKEND == "torch":
            import torch

            with torch.no_grad():
                return as_numpy(layer(x, training=False))
        return as_numpy(layer(x, training=False))

    before = call(gathered)
    gathered.set_weights(source.get_weights())
    del native_calls[:]
    after = call(gathered)
    assert "sparse_forward_pointers" in native_calls
    assert not np.allclose(before, after, rtol=0, atol=1e-4)
    masked.set_weights(source.get_weights())
    expected = as_numpy(masked.masked_outputs(x, training=False))
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)


def test_native_forward_equals_the_reference(native_calls, rng):
    """Each backend's `native_forward` (torch: with gradients recorded)
    computes the `keras.ops` gathered path, empty batches included."""
    layer = MIDL(UNITS, k_ratio=0.25, bias_initializer="random_normal")
    layer.build((None, INPUT_DIM))
    weights = dispatch.layer_weights(layer)
    module = backends.current()
    for shape in ((1, INPUT_DIM), (2, 3, INPUT_DIM), (0, INPUT_DIM)):
        x = ops.convert_to_tensor(rng.normal(size=shape).astype("float32"))
        outputs = module.native_forward(x, weights, layer.k)
        assert tuple(outputs.shape) == shape[:-1] + (UNITS,)
        np.testing.assert_allclose(
            as_numpy(outputs),
            as_numpy(gathered_outputs(x, weights, layer.k)),
            rtol=1e-5,
            atol=1e-5,
        )
    assert native_calls


@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("config_name", ["k_half", "k_half_noise", "k_one"])
def test_native_kernel_runs_in_eager_calls(
    config_name, no_grad, native_calls, rng
):
    """Eager calls run the native kernel on every backend. On torch under
    `no_grad` the whole forward is one C call (`sparse_forward`),
    otherwise the gate runs in torch and the selection and dot products
    in C (`select_gather`)."""
    if no_grad and BACKEND != "torch":
        pytest.skip("torch's no_grad")
    masked, gathered = make_pair((3, INPUT_DIM), **CONFIGS[config_name])
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    if no_grad:
        import torch

        with torch.no_grad():
            outputs = as_numpy(gathered(x, training=False))
    else:
        outputs = as_numpy(gathered(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert native_calls
    if BACKEND == "torch":
        entry = "sparse_forward_pointers" if no_grad else "select_gather"
        assert entry in "".join(native_calls)


def test_native_kernels_off_run_keras_ops(switch, native_calls, rng):
    masked, gathered = make_pair((3, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    switch.disable_native_kernels()
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)), expected, rtol=1e-5, atol=1e-5
    )
    assert not native_calls
    switch.enable_native_kernels()  # at run time, for the next call
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)), expected, rtol=1e-5, atol=1e-5
    )
    assert native_calls


@pytest.mark.parametrize("how", ["predict", "predict_on_batch"])
def test_keras_predict_runs_keras_ops_and_equals_masked(
    how, native_calls, rng
):
    """Keras's `predict` and `predict_on_batch` trace on TensorFlow and JAX:
    the layer runs `keras.ops` there, never the native kernel; on torch
    they run eagerly, with the native kernel."""
    masked, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    model = keras.Sequential([keras.Input((INPUT_DIM,)), gathered])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    if how == "predict":
        outputs = model.predict(x, verbose=0)
    else:
        outputs = model.predict_on_batch(x)
    np.testing.assert_allclose(
        as_numpy(outputs),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert bool(native_calls) == (BACKEND == "torch")


def test_run_eagerly_predict_runs_the_native_kernel(native_calls, rng):
    masked, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    model = keras.Sequential([keras.Input((INPUT_DIM,)), gathered])
    model.compile(run_eagerly=True)
    x = rng.normal(size=(5, INPUT_DIM)).astype("float32")
    outputs = model.predict(x, batch_size=2, verbose=0)
    np.testing.assert_allclose(
        outputs, as_numpy(masked(x, training=False)), rtol=1e-5, atol=1e-5
    )
    assert native_calls


def test_traced_fit_never_runs_the_native_kernel(native_calls, rng):
    _, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    model = keras.Sequential([keras.Input((INPUT_DIM,)), gathered])
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    model.fit(x, np.zeros((4, UNITS), "float32"), verbose=0)
    assert not native_calls


# --- The training selection -------------------------------------------------


def _scores(rng):
    scores = rng.normal(size=(12, 40)).astype("float32")
    scores[0] = 0.5  # all tied
    scores[1, ::3] = np.nan
    scores[2, :20] = np.inf
    scores[3, 10:30] = scores[3, 10]  # ties at the threshold
    return scores


def _in_graph(fn):
    """`fn` as `fit` runs it: a `tf.function` without XLA on TensorFlow."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("k", [1, 17, 39])
def test_training_mask_is_topk_mask(method, k, rng):
    scores = _scores(rng)
    expected = as_numpy(topk_mask(scores, k, method=method))
    for run in (
        dispatch.training_topk_mask,
        _in_graph(dispatch.training_topk_mask),
    ):
        mask = as_numpy(run(scores, k, method))
        np.testing.assert_array_equal(mask, expected)


def test_training_mask_with_native_kernels_off(switch, rng):
    switch.disable_native_kernels()
    scores = _scores(rng)
    mask = dispatch.training_topk_mask(scores, 9, "bisection")
    np.testing.assert_array_equal(
        as_numpy(mask), as_numpy(topk_mask(scores, 9, method="bisection"))
    )


@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40), (3, 4, 40)])
def test_training_mask_of_any_rank_and_empty_batches(shape, rng):
    """Ranks and batch sizes in any order (a relaxed signature once lost
    the rank after seeing two)."""
    for rows in (shape, (5, 40), shape):
        scores = rng.normal(size=rows).astype("float32")
        mask = dispatch.training_topk_mask(scores, 7, "bisection")
        np.testing.assert_array_equal(
            as_numpy(mask),
            as_numpy(topk_mask(scores, 7, method="bisection")),
        )


def test_training_mask_has_no_gradient(rng):
    scores = _scores(rng)[4:]
    upstream = rng.normal(size=scores.shape).astype("float32")

    def loss(s):
        mask = dispatch.training_topk_mask(s, 9, "top_k")
        return ops.sum(mask * upstream) + 0.0 * ops.sum(s)

    _, (grad,) = value_and_gradients(loss, scores)
    np.testing.assert_array_equal(np.nan_to_num(grad), 0.0)


@pytest.mark.parametrize("rows, native_expected", [(1, True), (8, True),
                                                   (65, False)])
def test_auto_runs_the_native_int8_kernel_up_to_a_batch_block(
    rows, native_expected, native_calls, rng
):
    """For an int8 layer `auto` takes the native kernel in eager calls up
    to `NATIVE_INT8_MAX_ROWS` rows, whatever the layer's size (the float
    rule would run this small layer masked); on JAX for one row only,
    where its compiled masked call (XLA's int8 dot) is faster."""
    if BACKEND == "jax" and rows > 1:
        native_expected = False
    layer = MIDL(UNITS, k_ratio=0.25, inference_path="auto")
    layer.build((None, INPUT_DIM))
    assert not dispatch.use_gathered_path(rows, INPUT_DIM, UNITS, 0.25)
    layer.quantize("int8")
    assert dispatch.native_auto_gathers(layer, rows) == native_expected
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    del native_calls[:]
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            layer(x, training=False)
    else:
        layer(x, training=False)
    assert bool(native_calls) == native_expected
