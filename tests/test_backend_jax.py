"""`keras_midl.backend.jax`: the native kernel in eager calls only, eager
calls compiled with `jax.jit`, `keras.ops` inside a caller's `jax.jit`,
and the gathered path in a SavedModel."""

import keras
import numpy as np
import pytest
from backend_utils import assert_transposed_product
from inference_utils import CONFIGS
from inference_utils import INPUT_DIM
from inference_utils import UNITS
from inference_utils import as_numpy
from inference_utils import make_pair
from inference_utils import served_outputs
from inference_utils import spy_native_threads

from keras_midl.midl import MIDL
from keras_midl.ops import dispatch
from keras_midl.ops import gathered

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX backend only"
)


@pytest.fixture
def jax_backend():
    from keras_midl.backend import jax as module

    return module


def _stateless(layer):
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def call(x):
        return layer.stateless_call(
            trainable, non_trainable, x, training=False
        )[0]

    return call


def test_in_trace_for_tracers_only(jax_backend):
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, 2))
    assert not jax_backend.in_trace(x)
    seen = []
    jax.jit(lambda x: seen.append(jax_backend.in_trace(x)) or x)(x)
    assert seen == [True]
    assert not jax_backend.exporting()


def test_jax_jit_runs_keras_ops_and_equals_masked(native_calls, rng):
    import jax

    masked, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    expected = as_numpy(masked(x, training=False))
    np.testing.assert_allclose(
        as_numpy(jax.jit(_stateless(layer))(x)),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    assert not native_calls
    # The same layer called eagerly runs the native kernel.
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)), expected, rtol=1e-5, atol=1e-5
    )
    assert native_calls


def test_native_forward_needs_a_cpu(jax_backend, monkeypatch):
    import jax
    import jax.numpy as jnp

    layer = MIDL(UNITS)
    layer.build((None, INPUT_DIM))
    weights = dispatch.layer_weights(layer)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.zeros((1, INPUT_DIM))
    assert jax_backend.native_forward(x, weights, layer.k) is None


def test_eager_call_is_one_jitted_function(rng):
    layer = MIDL(UNITS, k_ratio=0.5)
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    for rows in (2, 1, 2):
        layer(x[:rows])
    (function,) = layer.compiled_calls.values()
    assert hasattr(function, "lower")  # a `jax.jit` function


@pytest.mark.parametrize("rows, gathers", [(1, True), (3, False)])
def test_auto_in_a_trace_follows_the_traced_rule(
    rows, gathers, monkeypatch, rng
):
    """Inside `jax.jit` the rows are static: `TRACED_AUTO_RULES` decides
    when the trace is built."""
    monkeypatch.setitem(
        dispatch.TRACED_AUTO_RULES,
        "jax",
        dispatch.AutoRule(max_rows=2, min_weights=1, max_k_ratio=1.0),
    )
    traces = []
    original = gathered.gathered_outputs

    def spy(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gathered, "gathered_outputs", spy)
    import jax

    masked, layer = make_pair((rows, INPUT_DIM), k_ratio=0.5)
    layer.inference_path = "auto"
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    np.testing.assert_allclose(
        as_numpy(jax.jit(_stateless(layer))(x)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert bool(traces) == gathers


@pytest.mark.parametrize("path", ["gathered", "auto"])
def test_savedmodel_export_of_the_gathered_path(path, tmp_path, rng):
    """With `selection="bisection"` the gathered path has no `top_k` (its
    indices come from a cumulative sum), so JAX exports it too; eager calls
    before the export do not change what it records."""
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
    np.testing.assert_allclose(
        as_numpy(model(x)), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        served_outputs(model, x, str(tmp_path)), expected, rtol=1e-5, atol=1e-5
    )


# --- The training selection as an XLA FFI call ------------------------------


def _scores(rng):
    scores = rng.normal(size=(12, 40)).astype("float32")
    scores[0] = 0.5  # all tied
    scores[1, ::3] = np.nan
    scores[2, 5] = 1e-40  # subnormal: ranks as zero
    scores[3, 10:30] = scores[3, 10]  # ties at the threshold
    return scores


@pytest.fixture
def ffi_selection(jax_backend):
    if not jax_backend._ffi_selection_ready():
        pytest.skip("the FFI handler could not be built here")
    return jax_backend


def test_ffi_selection_equals_topk_mask(ffi_selection, rng):
    """Eager, under `jax.jit` and under `jax.vmap`: the C selection, bit
    for bit, as one FFI call in the compiled function."""
    import jax

    from keras_midl.ops.selection import topk_mask

    scores = _scores(rng)
    want = as_numpy(topk_mask(scores, 9, method="bisection"))

    def select(s):
        return dispatch.training_topk_mask(s, 9, "bisection")

    assert ffi_selection.FFI_TARGET in str(jax.make_jaxpr(select)(scores))
    np.testing.assert_array_equal(as_numpy(select(scores)), want)
    np.testing.assert_array_equal(as_numpy(jax.jit(select)(scores)), want)
    batched = jax.vmap(select)(np.stack([scores, scores[::-1]]))
    np.testing.assert_array_equal(as_numpy(batched[0]), want)
    np.testing.assert_array_equal(as_numpy(batched[1]), want[::-1])
    gradient = jax.grad(lambda s: (select(s) * s).sum())(scores)
    np.testing.assert_array_equal(as_numpy(gradient)[4:], want[4:])


def test_the_ffi_selection_runs_on_every_available_cpu(
    ffi_selection, monkeypatch, rng
):
    """The FFI call takes as many threads as XLA's CPU pool has (one per
    CPU this process may run on), which share its rows: the same mask."""
    import jax

    from keras_midl.native import kernels
    from keras_midl.ops.selection import topk_mask

    monkeypatch.setattr(kernels, "available_cpus", lambda: 3)
    scores = rng.normal(size=(600, 500)).astype("float32")
    scores[::7] = 0.25  # rows of ties

    def select(s):
        return dispatch.training_topk_mask(s, 210, "bisection")

    assert "threads = 3" in jax.jit(select).lower(scores).as_text()
    np.testing.assert_array_equal(
        as_numpy(jax.jit(select)(scores)),
        as_numpy(topk_mask(scores, 210, method="top_k")),
    )


def test_no_ffi_call_outside_training(ffi_selection, rng):
    """Inference functions stay exportable: no custom call in them."""
    import jax

    layer = MIDL(UNITS, inference_path="masked")
    x = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    layer.build(x.shape)
    jaxpr = str(jax.make_jaxpr(_stateless(layer))(x))
    assert ffi_selection.FFI_TARGET not in jaxpr


def test_fit_trains_with_the_ffi_selection(ffi_selection, monkeypatch, rng):
    calls = []
    original = ffi_selection.native_topk_mask

    def spy(scores, k, training):
        mask = original(scores, k, training)
        calls.append(mask is not None)
        return mask

    monkeypatch.setattr(ffi_selection, "native_topk_mask", spy)
    model = keras.Sequential([keras.Input((INPUT_DIM,)), MIDL(UNITS)])
    model.compile(loss="mse", optimizer="adam")
    x = rng.normal(size=(8, INPUT_DIM)).astype("float32")
    history = model.fit(x, np.zeros((8, UNITS), "float32"), verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert True in calls


def test_without_the_ffi_handler_the_bisection_selects(
    jax_backend, monkeypatch, rng
):
    from keras_midl.native import build
    from keras_midl.ops.selection import topk_mask

    monkeypatch.setattr(jax_backend, "_ffi_registered", [])
    monkeypatch.setattr(build, "_state", {"jax_ffi": None})
    scores = _scores(rng)
    assert jax_backend.native_topk_mask(scores, 9, training=True) is None
    np.testing.assert_array_equal(
        as_numpy(dispatch.training_topk_mask(scores, 9, "bisection")),
        as_numpy(topk_mask(scores, 9)),
    )


def test_compiled_selection_runs_in_cache_sized_blocks(
    jax_backend, selection_blocks, monkeypatch, rng
):
    """Under `jax.jit`, the masked path's bisection runs in blocks of rows
    (`cache_sized_block`, here 5 rows, the last one padded), with
    `topk_mask`'s mask."""
    import jax

    from keras_midl.ops.selection import topk_mask

    monkeypatch.setattr(jax_backend, "cache_sized_block", lambda units: 5)
    scores = _scores(rng)
    select = jax.jit(
        lambda s: dispatch.inference_topk_mask(s, 9, "bisection", True)
    )
    np.testing.assert_array_equal(
        as_numpy(select(scores)), as_numpy(topk_mask(scores, 9))
    )
    assert selection_blocks == [5]


def test_the_int8_full_path_is_an_integer_dot(rng):
    """XLA sums the int8 products in int32 (as Keras's int8 Dense), not
    in float32 after casting the whole kernel (10x slower at 8 x 4096 @
    4096 here); the values are the float32 path's."""
    import jax

    layer = MIDL(UNITS, k_ratio=0.5, inference_path="masked")
    x = rng.normal(size=(8, INPUT_DIM)).astype("float32")
    layer.build(x.shape)
    layer.quantize("int8")
    jaxpr = str(jax.make_jaxpr(_stateless(layer))(x))
    assert "preferred_element_type=int32" in jaxpr
    outputs = as_numpy(_stateless(layer)(x))
    kernel = as_numpy(layer.kernel).astype("float32")
    quantized, scale = layer.inputs_quantizer(x, axis=-1)
    full = (as_numpy(quantized).astype("float32") @ kernel.T) / (
        as_numpy(layer.kernel_scale) * as_numpy(scale)
    ) + as_numpy(layer.bias)
    mask = as_numpy(layer.gate(x)["mask"]) > 0
    np.testing.assert_allclose(
        outputs[mask], full[mask], rtol=1e-5, atol=1e-5
    )


def test_one_int8_row_is_computed_as_two(rng):
    """XLA's int8 matrix-vector product is ~20x slower than its two-row
    product: a single row gets a zero row added, with the same values."""
    import jax

    layer = MIDL(UNITS, k_ratio=0.5, inference_path="masked")
    x = rng.normal(size=(3, INPUT_DIM)).astype("float32")
    layer.build(x.shape)
    layer.quantize("int8")
    jaxpr = str(jax.make_jaxpr(_stateless(layer))(x[:1]))
    assert "concatenate" in jaxpr and "preferred_element_type=int32" in jaxpr
    np.testing.assert_allclose(
        as_numpy(_stateless(layer)(x[:1])),
        as_numpy(_stateless(layer)(x))[:1],
        rtol=1e-6,
        atol=1e-6,
    )


def test_the_native_kernel_runs_on_every_available_cpu(
    jax_backend, native_calls, monkeypatch, rng
):
    """XLA's CPU thread pool has a thread per CPU this process may run
    on, and so does the kernel in eager calls."""
    from keras_midl.native import kernels

    threads = spy_native_threads(monkeypatch)
    monkeypatch.setattr(kernels, "available_cpus", lambda: 5)
    _, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    jax_backend.native_forward(x, dispatch.layer_weights(layer), layer.k)
    assert threads == [5]


@pytest.mark.parametrize(
    "shape", [(1, 24), (16, 24), (127, 24), (128, 24), (4, 8, 24)]
)
def test_matmul_transposed_keeps_its_transposes_below_128_rows(
    jax_backend, shape, rng
):
    """Below `MATERIALIZED_TRANSPOSE_ROWS` rows, on a CPU, the compiled
    `inputs @ kernel^T` keeps its transposes out of the dot (optimization
    barriers); from that count XLA folds them. Values and gradients are
    the product's either way."""
    import jax

    inputs = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(10, shape[-1])).astype("float32")

    def loss(inputs, kernel):
        outputs = jax_backend.matmul_transposed(inputs, kernel)
        return (outputs * outputs).sum(), outputs

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, outputs), (d_inputs, d_kernel) = compiled(inputs, kernel)
    assert_transposed_product(
        inputs, kernel, *map(np.asarray, (outputs, d_inputs, d_kernel))
    )
    program = jax.jit(loss).lower(inputs, kernel).as_text()
    few = np.prod(shape[:-1]) < jax_backend.MATERIALIZED_TRANSPOSE_ROWS
    on_cpu = jax.default_backend() == "cpu"
    assert ("optimization_barrier" in program) == (few and on_cpu)
