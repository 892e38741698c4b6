"""The sparse inference paths (keras_midl/fast_inference.py) compute what
the masked path computes, and `inference_path="auto"` follows its rule.

On torch the gathered path is compiled by `torch.compile`: each distinct
layer shape costs one compilation (tens of seconds here), so the cases
share a few shapes.
"""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_midl import fast_inference
from keras_midl.midl import MIDL
from keras_midl.selection import topk_mask as keras_midl_topk_mask

INPUT_DIM, UNITS = 16, 24


def make_pair(input_shape, units=UNITS, **kwargs):
    """A masked and a gathered MIDL layer with the same (random) weights."""
    kwargs.setdefault("bias_initializer", "random_normal")
    kwargs.setdefault("selection", "top_k")
    masked = MIDL(units, inference_path="masked", **kwargs)
    gathered = MIDL(units, inference_path="gathered", **kwargs)
    masked.build(input_shape)
    gathered.build(input_shape)
    gathered.set_weights(masked.get_weights())
    return masked, gathered


def as_numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


# Three layer configurations (three torch compilations each for one row
# and for several rows), each on 2-D and 3-D inputs, one and more rows.
CONFIGS = {
    "k_half": {"k_ratio": 0.5},
    "k_half_noise": {"k_ratio": 0.5, "gate_noise": 0.7, "seed": 3},
    "k_one": {"k_ratio": 0.01, "light_path": "zero", "use_bias": False},
    "k_all": {"k_ratio": 1.0, "activation": "relu"},
}
SHAPES = [(1, INPUT_DIM), (6, INPUT_DIM), (2, 3, INPUT_DIM), (1, 1, INPUT_DIM)]


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gathered_equals_masked(config, input_shape, rng):
    kwargs = CONFIGS[config]
    masked, gathered = make_pair(input_shape, **kwargs)
    if config == "k_one":
        assert gathered.k == 1
    if config == "k_all":
        assert gathered.k == UNITS
    x = rng.normal(size=input_shape).astype("float32")
    expected = as_numpy(masked(x, training=False))
    outputs = as_numpy(gathered(x, training=False))
    assert outputs.shape == input_shape[:-1] + (UNITS,)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
@pytest.mark.parametrize("selection", ["top_k", "bisection"])
def test_reference_equals_masked(chunk, selection, rng):
    """The keras.ops reference, whole or chunked, on every backend."""
    masked = MIDL(UNITS, k_ratio=0.45, bias_initializer="random_normal")
    x = rng.normal(size=(2, 3, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    outputs = fast_inference.sparse_outputs(
        x,
        fast_inference.layer_weights(masked),
        masked.k,
        selection=selection,
        chunk=chunk,
    )
    np.testing.assert_allclose(as_numpy(outputs), expected, atol=1e-5)


def test_gathered_full_path_dequantizes(rng):
    """An int8 kernel with per-neuron scales (Keras's convention: float =
    int / scale) and per-row input scales gives the float dot products."""
    kernel = rng.integers(-127, 128, size=(UNITS, INPUT_DIM)).astype("int8")
    scale = rng.uniform(0.5, 2.0, size=(UNITS,)).astype("float32")
    rows = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    rows_scale = rng.uniform(0.5, 2.0, size=(3, 1)).astype("float32")
    selected = np.stack([rng.permutation(UNITS)[:7] for _ in range(3)])
    for chunk in (None, 3):
        values = fast_inference.gathered_full_path(
            rows,
            kernel,
            selected.astype("int32"),
            chunk=chunk,
            kernel_scale=scale,
            rows_scale=rows_scale,
        )
        dense = (rows @ kernel.T.astype("float32")) / scale / rows_scale
        expected = np.take_along_axis(dense, selected, axis=1)
        np.testing.assert_allclose(as_numpy(values), expected, rtol=1e-5)


def test_selected_indices_without_top_k(rng):
    mask = np.zeros((4, 30), "float32")
    for row in mask:
        row[rng.permutation(30)[:9]] = 1.0
    indices = as_numpy(fast_inference.selected_indices(mask, 9))
    expected = np.stack([np.flatnonzero(row) for row in mask])
    np.testing.assert_array_equal(indices, expected)


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
    # XLA on TensorFlow and JAX; on torch the layer compiles itself.
    model.compile(jit_compile=BACKEND in ("tensorflow", "jax"))
    outputs = model.predict(x, batch_size=input_shape[0], verbose=0)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_gathered_keeps_the_compute_dtype(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    masked, gathered = make_pair((6, INPUT_DIM), k_ratio=0.5)
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    outputs = gathered(x, training=False)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    expected = as_numpy(keras.ops.cast(masked(x, training=False), "float32"))
    outputs = as_numpy(keras.ops.cast(outputs, "float32"))
    np.testing.assert_allclose(outputs, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("no_grad", [False, True])
def test_gathered_reads_the_weights_of_a_stateless_call(no_grad, rng):
    """`stateless_call` with other weights: the gathered path computes with
    those (on torch the layer reads its variables' tensors directly only
    outside such a scope)."""
    if no_grad and BACKEND != "torch":
        pytest.skip("torch's no_grad")
    masked, gathered = make_pair((2, INPUT_DIM), k_ratio=0.5)
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    new_weights = [
        rng.normal(size=w.shape).astype("float32")
        for w in masked.get_weights()
    ]
    masked.set_weights(new_weights)
    expected = as_numpy(masked(x, training=False))
    trainable = [
        keras.ops.convert_to_tensor(new_weights[i])
        for i, v in enumerate(gathered.weights)
        if v.trainable
    ]
    non_trainable = [
        keras.ops.convert_to_tensor(new_weights[i])
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


def test_eager_calls_compile_the_inference(rng):
    """`model(x)` outside `predict` runs the layer as one compiled function
    on TensorFlow and JAX (op by op, the gate costs 10-50x Dense)."""
    layer = MIDL(UNITS, k_ratio=0.5, selection="bisection")
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    outputs = as_numpy(layer(x, training=False))
    compiled = layer in fast_inference._eager_cache
    assert compiled == (BACKEND in ("tensorflow", "jax"))
    # The same values as the ops run inline (inside a trace or graph).
    weights = fast_inference.layer_weights(layer)
    code = x @ as_numpy(weights["projection"])
    logits = code @ as_numpy(weights["gate_kernel"]) + as_numpy(
        weights["gate_bias"]
    )
    mask = as_numpy(keras_midl_topk_mask(logits, layer.k))
    full = x @ as_numpy(weights["kernel"]).T + as_numpy(weights["bias"])
    light = code @ as_numpy(weights["light_kernel"]) + as_numpy(
        weights["light_bias"]
    )
    expected = mask * full + (1 - mask) * light
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


# --- The "auto" rule -------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(fast_inference.AUTO_RULES))
@pytest.mark.parametrize("native_ready", [True, False])
def test_auto_rule_follows_its_table(backend, native_ready, monkeypatch):
    monkeypatch.setattr(
        fast_inference,
        "native_path_available",
        lambda backend=None, native_scope=None: native_ready,
    )
    rule = fast_inference.AUTO_RULES[backend]
    for rows in (None, 0, 1, 2, 3, 4, 8, 16, 256):
        for d in (512, 1024, 2048, 4096, 8192):
            for k_ratio in (0.1, 0.25, 0.45, 0.75, 1.0):
                expected = (
                    native_ready
                    and rows is not None
                    and 1 <= rows <= rule.max_rows
                    and d * d >= rule.min_weights
                    and k_ratio <= rule.max_k_ratio
                )
                got = fast_inference.use_gathered_path(
                    rows, d, d, k_ratio, backend=backend
                )
                assert got == expected, (rows, d, k_ratio)


def test_native_path_availability(monkeypatch):
    """torch: wherever the kernel builds; TensorFlow and JAX: only inside
    keras_midl's own functions (or Keras's `predict`, tested below)."""
    available = fast_inference.native.library() is not None
    assert fast_inference.native_path_available("torch") == available
    for backend in ("tensorflow", "jax"):
        assert not fast_inference.native_path_available(
            backend, native_scope=False
        )
        assert not fast_inference.native_path_available(backend)
    with fast_inference.native_allowed():
        assert fast_inference.native_path_available("tensorflow") == available
        if BACKEND == "jax":
            assert fast_inference.native_path_available("jax") == (
                fast_inference.native.jax_ffi_available()
            )
    monkeypatch.setenv(fast_inference.COMPILE_ENV, "0")
    assert not fast_inference.native_path_available("torch")


def test_native_path_needs_a_cpu_backend(monkeypatch):
    """JAX's custom call is registered for the CPU only, and TensorFlow's
    `tf.numpy_function` would copy GPU weights to the host at every call:
    with a GPU backend neither runs the native kernel."""
    if BACKEND == "jax":
        import jax

        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        monkeypatch.setattr(
            tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"]
        )
    else:
        pytest.skip("torch checks each tensor's device")
    assert not fast_inference.native_path_available(native_scope=True)


@pytest.mark.parametrize("backend", sorted(fast_inference.AUTO_RULES))
def test_auto_is_masked_at_batch_16_and_above(backend, monkeypatch):
    """Measured: at 16 rows or more the masked path is faster everywhere."""
    monkeypatch.setattr(
        fast_inference, "native_path_available", lambda *a, **k: True
    )
    for rows in (16, 32, 256, 4096):
        for d in (1024, 4096, 16384):
            assert not fast_inference.use_gathered_path(
                rows, d, d, 0.25, backend=backend
            )


def test_auto_rule_values_measured():
    """The table as measured (benchmarks/results/latency.md)."""
    rules = fast_inference.AUTO_RULES
    assert set(rules) == {"tensorflow", "jax", "torch"}
    assert rules["torch"] == fast_inference.AutoRule(8, 1024**2, 0.75)
    assert rules["tensorflow"] == fast_inference.AutoRule(8, 1024**2, 0.75)
    assert rules["jax"] == fast_inference.AutoRule(2, 1024**2, 0.45)


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
def test_auto_counts_static_rows(input_shape, rows, monkeypatch):
    seen = []

    def rule(rows, input_dim, units, k_ratio, backend=None):
        seen.append((rows, input_dim, units, k_ratio))
        return True

    monkeypatch.setattr(fast_inference, "use_gathered_path", rule)
    layer = MIDL(UNITS, k_ratio=0.3, inference_path="auto")
    layer.build(input_shape)
    assert layer._use_gathered_path(keras.KerasTensor(input_shape))
    assert seen == [(rows, 16, UNITS, 0.3)]


@pytest.mark.parametrize("gathers", [True, False])
def test_auto_runs_the_path_its_rule_picks(
    gathers, gathered_calls, monkeypatch
):
    monkeypatch.setattr(
        fast_inference, "use_gathered_path", lambda *a, **k: gathers
    )
    layer = MIDL(UNITS, inference_path="auto", selection="top_k")
    layer(np.zeros((1, 16), "float32"), training=False)
    assert bool(gathered_calls) == gathers


@pytest.mark.parametrize("path", ["masked", "gathered", "auto"])
def test_training_always_uses_the_masked_path(path, gathered_calls, rng):
    masked, other = make_pair((6, INPUT_DIM), **CONFIGS["k_half_noise"])
    other.inference_path = path
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    np.testing.assert_array_equal(
        as_numpy(other(x, training=True)), as_numpy(masked(x, training=True))
    )
    assert not gathered_calls


def test_masked_path_never_gathers(gathered_calls):
    layer = MIDL(UNITS, inference_path="masked", selection="top_k")
    layer(np.zeros((1, 16), "float32"), training=False)
    assert not gathered_calls


# --- torch.compile: fallback and opt-out -----------------------------------


@pytest.fixture
def fresh_torch_state(monkeypatch):
    """torch with the native kernel off (as where it cannot be built), so
    that the `torch.compile` path runs."""
    if BACKEND != "torch":
        pytest.skip("the compiled path exists on torch only")
    monkeypatch.setattr(fast_inference, "_torch_cache", {})
    monkeypatch.setattr(fast_inference, "_failed", set())
    monkeypatch.setattr(fast_inference, "_warned", set())
    monkeypatch.setattr(fast_inference.native, "_state", {"library": None})
    monkeypatch.delenv(fast_inference.COMPILE_ENV, raising=False)


def test_compile_failure_falls_back_with_one_warning(
    fresh_torch_state, monkeypatch, rng
):
    attempts = []

    def failing_compile(function):
        def compiled(*args):
            attempts.append(1)
            raise RuntimeError("simulated: no C++ compiler")

        return compiled

    monkeypatch.setattr(fast_inference, "_compile", failing_compile)
    masked, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    with pytest.warns(RuntimeWarning, match="simulated: no C"):
        outputs = as_numpy(gathered(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        outputs = as_numpy(gathered(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert len(attempts) == 1  # not retried
    # Without the native kernel "auto" never picks the gathered path.
    assert not fast_inference.use_gathered_path(1, 8192, 8192, 0.25)


def test_compile_opt_out(fresh_torch_state, monkeypatch, rng):
    def no_compile(function):
        raise AssertionError("compiled despite the opt-out")

    monkeypatch.setattr(fast_inference, "_compile", no_compile)
    monkeypatch.setenv(fast_inference.COMPILE_ENV, "0")
    masked, gathered = make_pair((1, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(1, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not fast_inference.use_gathered_path(1, 8192, 8192, 0.25)


def test_compiled_path_is_used_on_torch(fresh_torch_state, monkeypatch, rng):
    compiled = []
    original = fast_inference._compile

    def spy(function):
        compiled.append(function.__name__)
        return original(function)

    monkeypatch.setattr(fast_inference, "_compile", spy)
    masked, gathered = make_pair((1, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(1, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(gathered(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert len(compiled) == 1 and compiled[0].startswith("midl_sparse_")


# --- Export ----------------------------------------------------------------

_SERVE = """
import sys
import numpy as np
import tensorflow as tf

served = tf.saved_model.load(sys.argv[1])
np.save(sys.argv[3], served.serve(np.load(sys.argv[2])).numpy())
"""


@pytest.mark.parametrize("path", ["gathered", "auto"])
def test_savedmodel_export_of_the_gathered_path(path, tmp_path, rng):
    """With `selection="bisection"` the gathered path has no `top_k` (its
    indices come from a cumulative sum), so JAX exports it too."""
    if BACKEND not in ("tensorflow", "jax"):
        pytest.skip("Keras exports SavedModels from TensorFlow and JAX only")
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((5, 12)),
            MIDL(
                16,
                k_ratio=0.4,
                rank=4,
                selection="bisection",
                inference_path=path,
                activation="relu",
            ),
            MIDL(
                8,
                k_ratio=0.4,
                rank=4,
                selection="bisection",
                inference_path="gathered",
                light_path="zero",
            ),
        ]
    )
    x = rng.normal(size=(3, 5, 12)).astype("float32")
    expected = model.predict(x, verbose=0)
    export_path = str(tmp_path / "saved_model")
    model.export(export_path, format="tf_saved_model", verbose=False)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVE,
            export_path,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5
    )


# --- The native kernel (torch; TensorFlow and JAX where nothing exports) --


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the native kernel's calls (skips where it is not built)."""
    if not fast_inference.native_path_available(BACKEND, native_scope=True):
        pytest.skip("the native kernel could not be built here")
    calls = []
    # Traced once per shape, inside the compiled call.
    for name in ("_jax_native_outputs", "_tf_native_outputs"):
        original = getattr(fast_inference, name)

        def spy_trace(*args, original=original, name=name):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(fast_inference, name, spy_trace)
    for name in (
        "select_gather_pointers",
        "select_gather",
        "sparse_forward_pointers",
        "sparse_forward",
    ):
        original = getattr(fast_inference.native, name)

        def spy(*args, original=original, name=name):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(fast_inference.native, name, spy)
    return calls


@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("config", ["k_half", "k_half_noise", "k_one"])
def test_native_kernel_runs_and_equals_masked(
    config, no_grad, native_calls, rng
):
    """torch, and TensorFlow and JAX called eagerly, run the native kernel.
    On torch under `no_grad` the whole forward is one C call
    (`sparse_forward`), otherwise the gate runs in torch and the selection
    and dot products in C (`select_gather`)."""
    if no_grad and BACKEND != "torch":
        pytest.skip("torch's no_grad")
    masked, gathered = make_pair((3, INPUT_DIM), **CONFIGS[config])
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


@pytest.mark.parametrize("how", ["predict", "predict_on_batch"])
def test_keras_predict_runs_the_native_kernel(how, native_calls, rng):
    """`predict` compiles a trace it never exports: the native kernel runs
    there on every backend."""
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
    assert native_calls


def test_traces_that_could_be_exported_run_keras_ops(native_calls, rng):
    """A caller's own `tf.function` or `jax.jit`, and TensorFlow's `predict`
    under XLA (`jit_compile=True`), could not carry the native call: they
    get the `keras.ops` path."""
    if BACKEND == "torch":
        pytest.skip("torch runs the kernel in every eager call")
    masked, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        traced = tf.function(lambda x: gathered(x, training=False))
        model = keras.Sequential([keras.Input((INPUT_DIM,)), gathered])
        model.compile(jit_compile=True)
        np.testing.assert_allclose(
            model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
        )
    else:
        import jax

        trainable = [v.value for v in gathered.trainable_variables]
        non_trainable = [v.value for v in gathered.non_trainable_variables]

        def stateless(x):
            return gathered.stateless_call(
                trainable, non_trainable, x, training=False
            )[0]

        traced = jax.jit(stateless)
    np.testing.assert_allclose(
        as_numpy(traced(x)), expected, rtol=1e-5, atol=1e-5
    )
    assert not native_calls


def test_native_gradient_equals_the_reference(native_calls, rng):
    """On torch the kernel is an autograd function: gradients through the
    gathered path (inputs, kernel, bias) equal the `keras.ops` path's."""
    if BACKEND != "torch":
        pytest.skip("the native kernel is differentiable on torch only")
    import torch

    _, gathered = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    weights = fast_inference.layer_weights(gathered)
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    seed = torch.tensor(rng.normal(size=(2, UNITS)).astype("float32"))
    gradients = []
    for run in (fast_inference._torch_native, None):
        inputs = torch.tensor(x, requires_grad=True)
        for name in ("kernel", "bias"):
            weights[name].grad = None
        if run is None:
            outputs = fast_inference.sparse_outputs(inputs, weights, gathered.k)
        else:
            outputs = run(inputs, weights, gathered.k)
        (outputs * seed).sum().backward()
        gradients.append(
            [
                inputs.grad.numpy(),
                weights["kernel"].grad.numpy().copy(),
                weights["bias"].grad.numpy().copy(),
            ]
        )
    assert native_calls
    for native_gradient, reference in zip(*gradients):
        np.testing.assert_allclose(
            native_gradient, reference, rtol=1e-5, atol=1e-5
        )
