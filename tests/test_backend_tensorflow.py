"""`keras_midl.backend.tensorflow`: the native kernel in eager calls only,
eager calls compiled as one `tf.function`, `"auto"` inside Keras's
`predict` once its batch size is relaxed, the training selection and
mix in C (TensorFlow ops in training graphs without XLA) or the selection
compiled with XLA, and the gathered path in a SavedModel."""

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from backend_utils import assert_transposed_product
from inference_utils import CONFIGS
from inference_utils import INPUT_DIM
from inference_utils import NATIVE_SELECTION
from inference_utils import UNITS
from inference_utils import as_numpy
from inference_utils import make_pair
from inference_utils import served_outputs
from inference_utils import spy_native_threads

from keras_midl import native
from keras_midl.midl import MIDL
from keras_midl.ops import dispatch
from keras_midl.ops import gathered
from keras_midl.ops.selection import topk_mask

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow backend only"
)


@pytest.fixture
def tf_backend():
    from keras_midl.backend import tensorflow as module

    return module


@pytest.fixture
def fresh_retracing_detector(monkeypatch):
    """TensorFlow's frequent-retracing detector with no history: it counts
    traces per Python code object across every `tf.function` of the
    process (and warns at most twice), so the tests before this one would
    decide what it reports."""
    from tensorflow.python.eager.polymorphic_function import (
        polymorphic_function,
    )

    monkeypatch.setattr(
        polymorphic_function,
        "_frequent_tracing_detector_manager",
        polymorphic_function._FrequentTracingDetectorManager(),
    )


@pytest.fixture
def tf_log():
    """The messages of TensorFlow's logger (where it reports retracing and
    AutoGraph's failures) during the test."""
    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Handler(logging.WARNING)
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_in_trace_inside_graphs_only(tf_backend):
    import tensorflow as tf

    x = tf.zeros((1, 2))
    assert not tf_backend.in_trace(x)
    seen = []
    tf.function(lambda x: seen.append(tf_backend.in_trace(x)) or x)(x)
    assert seen == [True]
    assert not tf_backend.exporting()


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize(
    "shape", [(1, 24), (2, 24), (16, 24), (128, 24), (4, 64, 24)]
)
def test_matmul_transposed_reads_the_kernel_transposed(
    tf_backend, shape, traced, rng, monkeypatch
):
    """Beyond a single row, `inputs @ kernel^T` and its gradients are
    matmuls with no `Transpose` (a `BatchMatMulV2` reading the kernel
    transposed, the kernel's gradient written in its layout), in graphs
    and eager calls; a single row transposes the activations and the
    output. The values are the product's either way."""
    import tensorflow as tf

    inputs = tf.constant(rng.normal(size=shape).astype("float32"))
    kernel = tf.Variable(rng.normal(size=(10, shape[-1])).astype("float32"))
    transposing = tf_backend.generic.transposed_activations
    transposed_calls = []
    monkeypatch.setattr(
        tf_backend.generic,
        "transposed_activations",
        lambda *args: transposed_calls.append(1) or transposing(*args),
    )

    def outputs_and_gradients(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = tf_backend.matmul_transposed(inputs, kernel)
            loss = tf.reduce_sum(outputs * outputs)
        return (outputs, *tape.gradient(loss, [inputs, kernel]))

    function = (
        tf.function(outputs_and_gradients) if traced
        else outputs_and_gradients
    )
    outputs, d_inputs, d_kernel = function(inputs)
    assert_transposed_product(
        inputs.numpy(),
        kernel.numpy(),
        *(tensor.numpy() for tensor in (outputs, d_inputs, d_kernel)),
    )
    single_row = np.prod(shape[:-1]) == 1
    assert bool(transposed_calls) == single_row
    if traced:
        graph = function.get_concrete_function(inputs).graph
        executed = {op.type for op in graph.get_operations()}
        assert ("Transpose" in executed) == single_row
        assert ("BatchMatMulV2" in executed) == (not single_row)


def test_tf_function_runs_keras_ops_and_equals_masked(native_calls, rng):
    """A caller's `tf.function`, and `predict` under XLA
    (`jit_compile=True`), run the gathered path in `keras.ops`."""
    import tensorflow as tf

    masked, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    traced = tf.function(lambda x: layer(x, training=False))
    np.testing.assert_allclose(
        as_numpy(traced(x)), expected, rtol=1e-5, atol=1e-5
    )
    model = keras.Sequential([keras.Input((INPUT_DIM,)), layer])
    model.compile(jit_compile=True)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
    )
    assert not native_calls
    # The same layer called eagerly runs the native kernel.
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)), expected, rtol=1e-5, atol=1e-5
    )
    assert native_calls


@pytest.mark.parametrize("int8", [False, True])
def test_traced_gathered_path_never_gathers_from_a_variable(int8, rng):
    """Gathering from a variable (`ResourceGather`) switches it to
    copy-on-read for good: every later read copies the whole kernel,
    the native kernel's eager reads included (10 ms instead of 2.7 ms at
    4096 x 4096 here, after one traced call). `k` above
    `gathered.CHUNK_ROWS`: the chunked formulation, whose loop body
    gathered from the variable before."""
    import tensorflow as tf

    layer = MIDL(600, k_ratio=0.5, inference_path="gathered")
    layer.build((None, INPUT_DIM))
    assert layer.k > gathered.CHUNK_ROWS
    if int8:
        layer.quantize("int8")
    x = tf.constant(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    traced = tf.function(lambda x: layer(x, training=False))
    graph = traced.get_concrete_function(x).graph
    types = set()
    for function in [graph, *graph._functions.values()]:
        graph_def = getattr(function, "definition", None)
        if graph_def is not None:
            types |= {node.op for node in graph_def.node_def}
        else:
            types |= {op.type for op in function.get_operations()}
    assert "While" in types or "StatelessWhile" in types  # chunked
    assert "ResourceGather" not in types


def test_native_forward_needs_a_cpu(tf_backend, monkeypatch):
    """`tf.numpy_function` would copy GPU weights to the host at every
    call: with a GPU visible the native kernel does not run."""
    import tensorflow as tf

    layer = MIDL(UNITS)
    layer.build((None, INPUT_DIM))
    weights = dispatch.layer_weights(layer)
    x = tf.zeros((1, INPUT_DIM))
    monkeypatch.setattr(tf_backend, "_on_cpu", [])
    monkeypatch.setattr(
        tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"]
    )
    assert tf_backend.native_forward(x, weights, layer.k) is None


def test_native_forward_is_none_for_other_dtypes(tf_backend):
    import tensorflow as tf

    layer = MIDL(UNITS, dtype="float64")
    layer.build((None, INPUT_DIM))
    weights = dispatch.layer_weights(layer)
    x = tf.zeros((1, INPUT_DIM), tf.float64)
    assert tf_backend.native_forward(x, weights, layer.k) is None


# --- Compiled eager calls ---------------------------------------------------


@pytest.mark.parametrize("path", ["masked", "gathered", "auto"])
def test_eager_calls_of_five_batch_sizes_do_not_retrace(
    path, fresh_retracing_detector, tf_log, rng
):
    """Regression: the compiled eager call was traced once per input
    shape, and TensorFlow warned of frequent retracing after five."""
    masked, layer = make_pair((1, INPUT_DIM), k_ratio=0.5)
    layer.inference_path = path
    for rows in (1, 2, 3, 5, 7, 11):
        x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
        np.testing.assert_allclose(
            as_numpy(layer(x)),
            as_numpy(masked.masked_outputs(x)),
            rtol=1e-5,
            atol=1e-5,
        )
    retracing = [m for m in tf_log if "retracing" in m]
    assert not retracing, retracing


def test_a_model_of_six_layers_called_once_does_not_warn(
    fresh_retracing_detector, tf_log, rng
):
    layers = [MIDL(INPUT_DIM, k_ratio=0.5) for _ in range(6)]
    model = keras.Sequential([keras.Input((INPUT_DIM,)), *layers])
    model(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    retracing = [m for m in tf_log if "retracing" in m]
    assert not retracing, retracing


def test_eager_call_is_one_tf_function_per_key(rng):
    import tensorflow as tf

    layer = MIDL(UNITS, k_ratio=0.5)
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    layer(x)
    (function,) = layer.compiled_calls.values()
    assert isinstance(function, tf.types.experimental.PolymorphicFunction)


# --- "auto" inside Keras's predict ------------------------------------------


@pytest.fixture
def gathered_runs(monkeypatch):
    """A `tf.Variable` counting the runs (not the traces) of the gathered
    path inside graphs: `gathered_outputs` adds an increment of it."""
    import tensorflow as tf

    counter = tf.Variable(0)
    original = gathered.gathered_outputs

    def counted(*args, **kwargs):
        outputs = original(*args, **kwargs)
        with tf.control_dependencies([counter.assign_add(1)]):
            return tf.identity(outputs)

    monkeypatch.setattr(gathered, "gathered_outputs", counted)
    return counter


def test_auto_in_predict_follows_the_rule_after_relaxation(
    gathered_runs, monkeypatch, rng
):
    """Regression: once Keras relaxes `predict`'s batch size (a second
    size), the trace cannot count its rows, and `"auto"` ran masked for
    every later batch size. Now it applies `TRACED_AUTO_RULES` per call
    (`ops.cond`): batches of 1 and 2 rows gather, 5 rows run masked."""
    monkeypatch.setitem(
        dispatch.TRACED_AUTO_RULES,
        "tensorflow",
        dispatch.AutoRule(max_rows=2, min_weights=1, max_k_ratio=1.0),
    )
    masked, layer = make_pair((1, INPUT_DIM), k_ratio=0.5)
    layer.inference_path = "auto"
    model = keras.Sequential([keras.Input((INPUT_DIM,)), layer])
    runs = []
    for rows in (1, 5, 2):  # static 1, then relaxed: 5, 2
        x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
        outputs = model.predict(x, batch_size=rows, verbose=0)
        np.testing.assert_allclose(
            outputs,
            as_numpy(masked(x, training=False)),
            rtol=1e-5,
            atol=1e-5,
        )
        runs.append(int(gathered_runs.numpy()))
    assert runs == [1, 1, 2]


# --- The first native build --------------------------------------------------

_FIRST_CALL = """
import sys
import numpy as np
import keras
from keras_midl import MIDL

model = keras.Sequential(
    [keras.Input((16,)), MIDL(24, k_ratio=0.5, inference_path="gathered")]
)
x = np.random.default_rng(0).normal(size=(2, 16)).astype("float32")
if sys.argv[1] == "predict":
    model.predict(x, verbose=0)
model(x)
model.layers[0](x)
"""


@pytest.mark.parametrize("first", ["predict", "eager"])
def test_first_native_build_is_outside_autograph(first, tmp_path):
    """Regression: the native kernel was built (a compiler subprocess, file
    checks) and loaded inside an AutoGraph-converted trace, which warned
    "AutoGraph could not transform" for each function it met. In a fresh
    process with an empty cache, neither a first `predict` nor a first
    eager call warns, and the library is built."""
    cache = tmp_path / "cache"
    env = dict(
        os.environ,
        KERAS_BACKEND="tensorflow",
        KERAS_MIDL_CACHE=str(cache),
        KERAS_MIDL_COMPILE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    result = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL, first],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "AutoGraph" not in output, output
    if native.available():  # it builds here
        assert list(cache.glob("select_gather-*.so"))


# --- The training selection (XLA) --------------------------------------------


def _scores(rng):
    scores = rng.normal(size=(12, 40)).astype("float32")
    scores[0] = 0.5  # all tied
    scores[1, ::3] = np.nan
    scores[3, 10:30] = scores[3, 10]  # ties at the threshold
    return scores


@pytest.fixture
def without_native(monkeypatch):
    """The native library not built (as where it cannot be): the training
    selection is the XLA-compiled one."""
    from keras_midl.native import build

    monkeypatch.setattr(build, "_state", {"library": None})


def test_one_xla_function_per_selection_and_signature(
    tf_backend, without_native, monkeypatch, rng
):
    monkeypatch.setattr(tf_backend, "_selections", {})
    scores = _scores(rng)
    for k in (3, 3, 5):
        dispatch.training_topk_mask(scores, k, "top_k")
    dispatch.training_topk_mask(scores[:5], 3, "top_k")
    dispatch.training_topk_mask(scores[None], 3, "top_k")
    assert sorted(key[:3] for key in tf_backend._selections) == [
        ((3, "top_k"), 2, 40),
        ((3, "top_k"), 3, 40),
        ((5, "top_k"), 2, 40),
    ]
    for function in tf_backend._selections.values():
        assert function._jit_compile


def test_xla_selection_can_be_turned_off(tf_backend, monkeypatch, rng):
    from keras_midl import config

    monkeypatch.setattr(tf_backend, "_selections", {})
    monkeypatch.setattr(config, "_enabled", False)
    scores = _scores(rng)
    mask = dispatch.training_topk_mask(scores, 9, "bisection")
    np.testing.assert_array_equal(
        as_numpy(mask), as_numpy(topk_mask(scores, 9, method="bisection"))
    )
    assert not tf_backend._selections


def test_xla_selection_in_fit(tf_backend, without_native, monkeypatch, rng):
    """`fit` (a graph without XLA) calls the XLA-compiled selection where
    the native kernel is not built."""
    monkeypatch.setattr(tf_backend, "_selections", {})
    model = keras.Sequential([keras.Input((INPUT_DIM,)), MIDL(UNITS)])
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    model.fit(x, np.zeros((4, UNITS), "float32"), verbose=0)
    assert tf_backend._selections


@pytest.mark.parametrize("rows, compiled", [(20, True), (4, False)])
def test_xla_selection_in_inference_graphs_of_many_rows(
    rows, compiled, tf_backend, monkeypatch, rng
):
    """Inside a graph (Keras's `predict`) the masked path's bisection, at
    more than 16 static rows, runs XLA-compiled; `top_k` below (what
    ONNX converters take) stays as it is. The outputs are the eager
    call's."""
    import tensorflow as tf

    monkeypatch.setattr(tf_backend, "_selections", {})
    layer = MIDL(UNITS, k_ratio=0.4, inference_path="masked")
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    eager = as_numpy(layer(x))
    graph = as_numpy(tf.function(lambda x: layer(x, training=False))(x))
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)
    assert bool(tf_backend._selections) == compiled


@pytest.mark.parametrize("rows", [0, 1, 5, 12])
def test_xla_selection_runs_in_cache_sized_blocks(
    rows, tf_backend, without_native, selection_blocks, monkeypatch, rng
):
    """The compiled selection runs in blocks of rows (`cache_sized_block`,
    here 5 rows): traced with an unknown row count, padded to whole
    blocks, with `topk_mask`'s mask."""
    monkeypatch.setattr(tf_backend, "_selections", {})
    monkeypatch.setattr(tf_backend, "cache_sized_block", lambda units: 5)
    scores = _scores(rng)[:rows]
    np.testing.assert_array_equal(
        as_numpy(dispatch.training_topk_mask(scores, 9, "bisection")),
        as_numpy(topk_mask(scores, 9)),
    )
    assert selection_blocks == [5]


def test_blocks_of_rows_of_unknown_length(rng):
    """Traced with neither the row count nor the row length known,
    `rows_per_block` selects without blocks: the same mask."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.float32)
    select = tf.function(
        lambda s: topk_mask(s, 9, rows_per_block=2), input_signature=[spec]
    )
    scores = _scores(rng)
    np.testing.assert_array_equal(
        as_numpy(select(scores)), as_numpy(topk_mask(scores, 9))
    )


# --- The training selection and mix (native) -------------------------------


@pytest.fixture
def selection_calls(monkeypatch):
    """Records the native selection's calls on NumPy arrays (eager, and
    the `tf.numpy_function` where the ops are not built); skips where the
    library is not built here."""
    from keras_midl.native import build
    from keras_midl.native import kernels

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")
    calls = []
    original = kernels.topk_mask

    def spy(scores, k, threads=None):
        calls.append(scores.shape)
        return original(scores, k, threads)

    monkeypatch.setattr(kernels, "topk_mask", spy)
    return calls


@pytest.fixture
def training_ops(tf_backend):
    """The module of the TensorFlow ops; skips where they are not built
    here (no C++ compiler)."""
    module = tf_backend._training_ops()
    if module is None:
        pytest.skip("the TensorFlow ops could not be built here")
    return module


@pytest.fixture
def op_calls(tf_backend, training_ops, monkeypatch):
    """The names of the TensorFlow ops put into graphs during the test."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(training_ops, name)

    monkeypatch.setattr(tf_backend, "_training_ops", Spy)
    return calls


def _graph_ops(function, *args):
    """The op types of `function`'s graph for `args`, its gradients'
    included."""
    graph = function.get_concrete_function(*args).graph
    return {node.op for node in graph.as_graph_def().node} | {
        node.op
        for body in graph.as_graph_def().library.function
        for node in body.node_def
    }


def test_native_selection_equals_topk_mask(
    tf_backend, selection_calls, training_ops, rng
):
    """Eager (the C kernel on the buffer) and in a training graph (the op
    `MidlTopkMask`): the mask of `topk_mask`, bit for bit, ties and NaNs
    included; a graph outside training has neither."""
    import tensorflow as tf

    scores = _scores(rng)
    want = as_numpy(topk_mask(scores, 9, method="top_k"))
    eager = dispatch.training_topk_mask(scores, 9, "bisection")
    in_training = tf.function(
        lambda s: tf_backend.native_topk_mask(s, 9, training=True)
    )
    outside = tf.function(
        lambda s: tf_backend.native_topk_mask(s, 9, training=False)
    )
    assert len(selection_calls) == 1  # eager only
    np.testing.assert_array_equal(as_numpy(eager), want)
    np.testing.assert_array_equal(as_numpy(in_training(scores)), want)
    assert "MidlTopkMask" in _graph_ops(in_training, scores)
    assert outside(scores) is None


def test_the_selection_runs_on_tensorflows_threads(
    tf_backend, training_ops, monkeypatch, rng
):
    """Eager, the C selection gets the native kernel's thread count
    (`intra_op_threads`); in a training graph the op `MidlTopkMask`
    shares its rows among the threads of TensorFlow's intra-op pool (on
    a machine of several CPUs, at 300,000 scores): the same mask either
    way."""
    import tensorflow as tf

    from keras_midl.native import kernels

    threads = spy_native_threads(monkeypatch, NATIVE_SELECTION)
    monkeypatch.setattr(kernels, "available_cpus", lambda: 4)
    monkeypatch.setattr(
        tf.config.threading, "get_intra_op_parallelism_threads", lambda: 3
    )
    scores = rng.normal(size=(600, 500)).astype("float32")
    scores[::7] = 0.25  # rows of ties
    want = as_numpy(topk_mask(scores, 210, method="top_k"))
    eager = tf_backend.native_topk_mask(tf.constant(scores), 210, True)
    assert threads == [3]
    in_training = tf.function(
        lambda s: tf_backend.native_topk_mask(s, 210, training=True)
    )
    np.testing.assert_array_equal(as_numpy(eager), want)
    np.testing.assert_array_equal(as_numpy(in_training(scores)), want)


@pytest.mark.parametrize("shape", [(12, 40), (3, 4, 40), (0, 40)])
def test_selection_op_of_any_rank_and_its_errors(training_ops, shape, rng):
    scores = rng.normal(size=shape).astype("float32")
    np.testing.assert_array_equal(
        as_numpy(training_ops.midl_topk_mask(scores, k=7)),
        as_numpy(topk_mask(scores, 7)),
    )
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="k=41"):
        training_ops.midl_topk_mask(rng.normal(size=(2, 40)), k=41)


def _mixes(
    tf_backend, mask, temperature, with_light, with_biases, return_frequencies
):
    """`(native, keras_ops)`: one `tf.function` each, of the mix's value
    and its gradients (the biases' included), for a loss weighting the
    outputs and the frequencies."""
    import tensorflow as tf

    from keras_midl.ops.selection import straight_through_mix

    def keras_ops_mix(mask, logits, full, light, temperature, frequencies,
                      bias, light_bias):
        if bias is not None:
            full = full + bias
        if light is not None and light_bias is not None:
            light = light + light_bias
        return straight_through_mix(
            mask, logits, full, light, temperature, frequencies
        )

    def make(mix):
        @tf.function
        def run(logits, full, light, weights, per_unit, bias, light_bias):
            light = light if with_light else None
            biases = [None, None]
            if with_biases:  # a light bias only with a light path
                biases = [bias, light_bias if with_light else None]
            sources = [logits, full] + ([light] if with_light else [])
            sources += [b for b in biases if b is not None]
            with tf.GradientTape() as tape:
                tape.watch(sources)
                outputs = mix(
                    tf.constant(mask),
                    logits,
                    full,
                    light,
                    temperature,
                    return_frequencies,
                    *biases,
                )
                loss = 0.0
                if return_frequencies:
                    outputs, frequencies = outputs
                    loss = tf.reduce_sum(per_unit * frequencies)
                loss += tf.reduce_sum(weights * outputs)
            return [outputs, *tape.gradient(loss, sources)]

        return run

    def native(mask, logits, full, light, temperature, frequencies, bias,
               light_bias):
        outputs = tf_backend.native_mix(
            mask, logits, full, light, temperature, frequencies,
            training=True, bias=bias, light_bias=light_bias,
        )
        assert outputs is not None
        return outputs

    return make(native), make(keras_ops_mix)


@pytest.mark.parametrize("return_frequencies", [False, True])
@pytest.mark.parametrize("with_light", [True, False])
@pytest.mark.parametrize("with_biases", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(12, 40), (2, 3, 40)])
def test_mix_ops_equal_the_keras_ops_mix(
    tf_backend,
    training_ops,
    shape,
    temperature,
    with_biases,
    with_light,
    return_frequencies,
    rng,
):
    """`MidlMix` and `MidlMixGrad` in a training graph: the value and the
    gradients of `straight_through_mix` of the biased paths (the balance
    loss's column included), bit for bit at a temperature of 1; at
    another, within one rounding (TensorFlow's graph divides `soft * (1 -
    soft)` by it in its own way). The biases' gradients, sums over the
    rows in another order than TensorFlow's, to float32 rounding."""
    mask = (rng.random(shape) > 0.5).astype("float32")
    arrays = [rng.normal(size=shape).astype("float32") for _ in range(4)]
    vectors = [rng.normal(size=shape[-1]).astype("float32") for _ in range(3)]
    native, keras_ops = _mixes(
        tf_backend, mask, temperature, with_light, with_biases,
        return_frequencies,
    )
    got = native(*arrays, *vectors)
    want = keras_ops(*arrays, *vectors)
    assert "MidlMixGrad" in _graph_ops(native, *arrays, *vectors)
    biases = with_biases * (1 + with_light)
    assert len(got) == len(want) == 3 + with_light + biases
    for index, (value, expected) in enumerate(zip(got, want)):
        value, expected = as_numpy(value), as_numpy(expected)
        if index >= len(got) - biases:
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        elif temperature == 1.0:
            np.testing.assert_array_equal(value, expected)
        else:
            np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)


def test_the_mix_op_takes_the_layers_biases(tf_backend, training_ops, rng):
    """In a training graph, `MidlMix` adds the paths' biases (read from
    their variables) and `MidlMixGrad` sums their gradients: the graph
    holds no separate bias add nor sum over the rows for them."""
    import tensorflow as tf

    layer = MIDL(12, k_ratio=0.5, rank=3)
    x = rng.normal(size=(4, 5)).astype("float32")
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, [layer.bias, layer.light_bias])

    graph = step.get_concrete_function(tf.constant(x)).graph
    nodes = {node.name: node for node in graph.as_graph_def().node}
    (mix,) = [node for node in nodes.values() if node.op == "MidlMix"]
    bias_sources = [nodes[name.split(":")[0]].op for name in mix.input[3:]]
    assert bias_sources == ["ReadVariableOp", "ReadVariableOp"]
    d_bias, d_light_bias = step(tf.constant(x))
    assert d_bias.shape == d_light_bias.shape == (12,)


def test_native_mix_only_for_float32_tensors_of_one_shape_in_training(
    tf_backend, training_ops
):
    import tensorflow as tf

    full = tf.zeros((2, 3))
    seen = []

    @tf.function
    def run(mask, full, training):
        mixed = tf_backend.native_mix(
            mask, full, full, None, 1.0, training=training
        )
        seen.append(mixed)
        return full

    run(full, full, True)
    run(full[:1], full, True)  # a mask to broadcast
    run(tf.cast(full, "float16"), tf.cast(full, "float16"), True)
    run(full, full, False)  # may be exported
    assert seen[0] is not None and seen[1:] == [None, None, None]
    # Eager: not a graph of training.
    assert tf_backend.native_mix(full, full, full, None, 1.0, True) is None


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_runs_the_ops_but_not_under_xla(
    jit_compile, tf_backend, op_calls, monkeypatch, rng
):
    """`fit` without XLA (Keras's default on a CPU) runs the selection
    and the mix as the TensorFlow ops; with `jit_compile=True` XLA, which
    has no kernel for them, compiles the `keras.ops` ones."""
    monkeypatch.setattr(tf_backend, "_selections", {})
    model = keras.Sequential([keras.Input((INPUT_DIM,)), MIDL(UNITS)])
    model.compile(loss="mse", optimizer="sgd", jit_compile=jit_compile)
    x = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    history = model.fit(x, np.zeros((4, UNITS), "float32"), verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    expected = set() if jit_compile else {"midl_topk_mask", "midl_mix"}
    assert set(op_calls) >= expected and bool(op_calls) == (not jit_compile)


def test_fit_without_the_ops_runs_the_kernel_as_a_numpy_function(
    tf_backend, selection_calls, monkeypatch, rng
):
    """Where the ops could not be built (no C++ compiler), the training
    graph calls the C selection through `tf.numpy_function` and mixes in
    `keras.ops`: the same steps."""
    x = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    y = np.zeros((4, UNITS), "float32")
    weights = []
    for ops_built in (True, False):
        if not ops_built:
            monkeypatch.setattr(tf_backend, "_training_ops", lambda: None)
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((INPUT_DIM,)), MIDL(UNITS)])
        model.compile(loss="mse", optimizer="sgd")
        model.fit(x, y, epochs=2, verbose=0)
        weights.append(model.get_weights())
        assert bool(selection_calls) == (not ops_built)
    for with_ops, without in zip(*weights):
        np.testing.assert_allclose(with_ops, without, rtol=1e-6, atol=1e-7)


def test_no_native_selection_nor_mix_in_an_inference_graph(
    selection_calls, op_calls, rng
):
    """`predict` and the exports trace `training=False`: neither a Python
    call nor a custom op in their graphs."""
    model = keras.Sequential(
        [keras.Input((INPUT_DIM,)), MIDL(UNITS, inference_path="masked")]
    )
    model.predict(rng.normal(size=(4, INPUT_DIM)).astype("float32"), verbose=0)
    assert not selection_calls and not op_calls


# --- SavedModel ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["gathered", "auto"])
def test_savedmodel_export_of_the_gathered_path(path, tmp_path, rng):
    """The export traces: it records `keras.ops` (never the native call),
    which a fresh process serves with TensorFlow only."""
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
                inference_path="gathered",
                light_path="zero",
            ),
        ]
    )
    x = rng.normal(size=(3, 5, 12)).astype("float32")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        served_outputs(model, x, str(tmp_path)), expected, rtol=1e-5, atol=1e-5
    )


def test_savedmodel_export_after_an_eager_call(tmp_path, rng):
    model = keras.Sequential([keras.Input((INPUT_DIM,)), MIDL(UNITS)])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(model(x))
    np.testing.assert_allclose(
        served_outputs(model, x, str(tmp_path)), expected, rtol=1e-5, atol=1e-5
    )


# TensorFlow's configured threads, $TF_NUM_INTRAOP_THREADS, the CPUs this
# process may run on, the kernel's.
@pytest.mark.parametrize(
    "configured, environment, cpus, expected",
    [
        (0, None, 3, 3),
        (0, "1", 3, 1),
        (0, "5", 3, 3),
        (0, "many", 2, 2),
        (2, "1", 4, 2),
        (6, None, 4, 4),
    ],
)
def test_the_native_kernel_runs_on_tensorflows_threads(
    tf_backend, native_calls, monkeypatch, configured, environment, cpus,
    expected, rng,
):
    import tensorflow as tf

    from keras_midl.native import kernels

    threads = spy_native_threads(monkeypatch)
    monkeypatch.setattr(kernels, "available_cpus", lambda: cpus)
    monkeypatch.setattr(
        tf.config.threading,
        "get_intra_op_parallelism_threads",
        lambda: configured,
    )
    if environment is None:
        monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    else:
        monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", environment)
    _, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = tf.constant(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    tf_backend.native_forward(x, dispatch.layer_weights(layer), layer.k)
    assert threads == [expected]
