"""keras_midl.native.kernels: the same selection as `topk_mask` and the same
values as NumPy, in C and in the NumPy fallback, and clear errors.
Backend-independent (NumPy in and out; `topk_mask` runs on the current
backend)."""

import keras
import numpy as np
import pytest

from keras_midl import config
from keras_midl import native
from keras_midl.native import build
from keras_midl.ops import topk_mask


def random_case(rng, units, dim, count, k, logits_kind):
    logits = rng.normal(size=(count, units)).astype("float32")
    if logits_kind == "ties":
        logits = np.round(logits).astype("float32")
    elif logits_kind == "nan_and_subnormal":
        logits[:, 0] = np.nan
        logits[:, -1] = 1e-40
        logits[:, units // 2] = -0.0
    kernel = rng.normal(size=(units, dim)).astype("float32")
    rows = rng.normal(size=(count, dim)).astype("float32")
    light = rng.normal(size=(count, units)).astype("float32")
    bias = rng.normal(size=units).astype("float32")
    return logits, kernel, rows, light, bias


def expected(logits, kernel, rows, k, light, bias):
    mask = keras.ops.convert_to_numpy(topk_mask(logits, k)) > 0.5
    full = rows.astype("float64") @ kernel.T.astype("float64")
    if bias is not None:
        full = full + bias
    return np.where(mask, full, light), mask


# dim not a multiple of the 8-wide blocks, k not of the 8-row groups;
# 70 rows: two blocks of the batched gather (64 rows, then 6).
@pytest.mark.parametrize(
    "units, dim, count, k",
    [
        (7, 5, 1, 3),
        (64, 37, 3, 9),
        (40, 64, 2, 40),
        (10, 16, 2, 1),
        (50, 19, 70, 13),
    ],
)
@pytest.mark.parametrize("logits_kind", ["normal", "ties", "nan_and_subnormal"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_selects_as_topk_mask_and_computes_the_full_path(
    units, dim, count, k, logits_kind, use_bias, rng
):
    logits, kernel, rows, light, bias = random_case(
        rng, units, dim, count, k, logits_kind
    )
    bias = bias if use_bias else None
    outputs, selected = native.select_gather(
        logits, kernel, rows, k, light, bias
    )
    want, mask = expected(logits, kernel, rows, k, light, bias)
    assert selected.shape == (count, k) and selected.dtype == np.int64
    assert (np.diff(selected, axis=1) > 0).all()  # increasing
    # Exactly the neurons of the mask (k of them per row).
    assert np.take_along_axis(mask, selected, axis=1).all()
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rows_shape, k, light_shape, match",
    [
        ((2, 5), 2, (1, 6), "`rows` of shape"),
        ((1, 5), 0, (1, 6), r"`k` must be in \[1, 6\]; received k=0"),
        ((1, 5), 7, (1, 6), r"`k` must be in \[1, 6\]; received k=7"),
        ((1, 5), 2, (1, 5), "`light` must have shape"),

    ],
)
def test_bad_arguments_raise(rows_shape, k, light_shape, match):
    with pytest.raises(ValueError, match=match):
        native.select_gather(
            np.zeros((1, 6)),
            np.zeros((6, 5)),
            np.zeros(rows_shape),
            k,
            np.zeros(light_shape),
        )


@pytest.mark.parametrize("light", ["lowrank", "zero"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    "units, dim, rank, count, k", [(24, 16, 4, 3, 12), (9, 37, 5, 1, 9)]
)
def test_sparse_forward_equals_the_masked_formula(
    light, use_bias, units, dim, rank, count, k, rng
):
    """The whole forward in C: `where(topk_mask(z G + c), x W^T + b,
    z U + b_lite)`."""

    def normal(*shape):
        return rng.normal(size=shape).astype("float32")

    weights = {
        "projection": normal(dim, rank),
        "gate_kernel": normal(rank, units),
        "gate_bias": normal(units) if use_bias else None,
        "light_kernel": normal(rank, units) if light == "lowrank" else None,
        "light_bias": normal(units) if use_bias else None,
        "kernel": normal(units, dim),
        "bias": normal(units) if use_bias else None,
    }
    rows = normal(count, dim)
    code = rows.astype("float64") @ weights["projection"]
    logits = code @ weights["gate_kernel"]
    light_path = np.zeros((count, units))
    if weights["light_kernel"] is not None:
        light_path = code @ weights["light_kernel"]
    if use_bias:
        logits = logits + weights["gate_bias"]
        light_path = light_path + weights["light_bias"] * (light == "lowrank")
    want, mask = expected(
        logits.astype("float32"),
        weights["kernel"],
        rows,
        k,
        light_path,
        weights["bias"],
    )
    outputs, selected = native.sparse_forward(rows, weights, k)
    assert np.take_along_axis(mask, selected, axis=1).all()
    np.testing.assert_allclose(outputs, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("projection", (15, 4)),
        ("gate_kernel", (4, 11)),
        ("light_kernel", (3, 12)),
        ("gate_bias", (13,)),
        ("bias", (1,)),
    ],
)
def test_sparse_forward_rejects_mismatched_weights(name, shape):
    """A wrong shape raises instead of reading outside an array in C."""
    weights = {
        "projection": np.zeros((16, 4)),
        "gate_kernel": np.zeros((4, 12)),
        "light_kernel": np.zeros((4, 12)),
        "kernel": np.zeros((12, 16)),
        name: np.zeros(shape),
    }
    with pytest.raises(ValueError, match=f"`{name}` must have shape"):
        native.sparse_forward(np.zeros((1, 16)), weights, 3)


@pytest.fixture(params=["native", "numpy"])
def implementation(request, monkeypatch):
    """The C library, or the NumPy fallback (native kernels off)."""
    if request.param == "numpy":
        monkeypatch.setattr(config, "_enabled", False)
    elif not native.available():
        pytest.skip("the native library cannot be built here")
    return request.param


@pytest.mark.parametrize("missing", ["projection", "gate_kernel", "kernel"])
def test_sparse_forward_requires_the_gate_and_the_kernel(missing):
    """A missing required weight raises (the C kernel was handed NULL)."""
    weights = {
        "projection": np.zeros((16, 4)),
        "gate_kernel": np.zeros((4, 12)),
        "kernel": np.zeros((12, 16)),
        missing: None,
    }
    with pytest.raises(ValueError, match=f"missing or None: \\['{missing}'"):
        native.sparse_forward(np.zeros((1, 16)), weights, 3)


def test_pointer_entry_point_refuses_a_missing_gate_kernel():
    with pytest.raises(ValueError, match="`gate_kernel` is required"):
        native.kernels.sparse_forward_pointers(
            1, 1, 16, {"projection": 1, "kernel": 1}, 4, 12, 3, 1, 1
        )


def test_zero_rows_give_empty_outputs(implementation):
    outputs, selected = native.select_gather(
        np.zeros((0, 6)), np.zeros((6, 5)), np.zeros((0, 5)), 2,
        np.zeros((0, 6)),
    )
    assert outputs.shape == (0, 6) and selected.shape == (0, 2)
    weights = {
        "projection": np.zeros((5, 2)),
        "gate_kernel": np.zeros((2, 6)),
        "kernel": np.zeros((6, 5)),
    }
    outputs, selected = native.sparse_forward(np.zeros((0, 5)), weights, 2)
    assert outputs.shape == (0, 6) and selected.shape == (0, 2)
    assert outputs.dtype == np.float32 and selected.dtype == np.int64


def test_numpy_fallback_equals_the_library(monkeypatch, rng):
    if not native.available():
        pytest.skip("the native library cannot be built here")
    logits, kernel, rows, light, bias = random_case(rng, 40, 9, 5, 11, "ties")
    want = native.select_gather(logits, kernel, rows, 11, light, bias)
    monkeypatch.setattr(config, "_enabled", False)
    assert build.library() is None
    got = native.select_gather(logits, kernel, rows, 11, light, bias)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


# int8 kernels (`model.quantize("int8")`).


def int8_case(rng, units, dim, rank, count):
    def normal(*shape):
        return rng.normal(size=shape).astype("float32")

    kernel, kernel_scale = keras.quantizers.abs_max_quantize(
        normal(units, dim), axis=-1, to_numpy=True
    )
    weights = {
        "projection": normal(dim, rank),
        "gate_kernel": normal(rank, units),
        "gate_bias": normal(units),
        "light_kernel": normal(rank, units),
        "light_bias": normal(units),
        "kernel": keras.ops.convert_to_numpy(kernel),
        "bias": normal(units),
        "kernel_scale": keras.ops.convert_to_numpy(kernel_scale)[:, 0],
    }
    return normal(count, dim), weights


def int8_expected(rows, weights, selected, quantize_inputs):
    """Keras's int8 arithmetic at the selected neurons: inputs quantized
    by Keras's own AbsMaxQuantizer, exact integer sums, one division."""
    kernel = weights["kernel"].astype(np.int64)
    scale = weights["kernel_scale"]
    if quantize_inputs:
        quantized, rows_scale = keras.quantizers.abs_max_quantize(
            rows, axis=-1, to_numpy=True
        )
        quantized = keras.ops.convert_to_numpy(quantized).astype(np.int64)
        rows_scale = keras.ops.convert_to_numpy(rows_scale)
        full = (quantized @ kernel.T).astype(np.float32) / (scale * rows_scale)
    else:
        full = (rows.astype(np.float64) @ kernel.T) / scale
    full = full + weights["bias"]
    return np.take_along_axis(full, selected, axis=1)


# dim not a multiple of the 32-byte blocks; 70 rows: two batch blocks.
@pytest.mark.parametrize(
    "units, dim, rank, count, k",
    [(24, 16, 4, 3, 12), (9, 37, 5, 1, 9), (40, 100, 3, 70, 13),
     (64, 256, 8, 8, 29)],
)
@pytest.mark.parametrize("quantize_inputs", [True, False])
def test_int8_sparse_forward_is_kerass_int8_arithmetic(
    implementation, units, dim, rank, count, k, quantize_inputs, rng
):
    rows, weights = int8_case(rng, units, dim, rank, count)
    outputs, selected = native.sparse_forward(
        rows, weights, k, quantize_inputs=quantize_inputs
    )
    # The selection and the light path are the float kernel's.
    float_weights = dict(weights, kernel=weights["kernel"].astype("float32"),
                         kernel_scale=None)
    float_outputs, float_selected = native.sparse_forward(
        rows, float_weights, k
    )
    np.testing.assert_array_equal(selected, float_selected)
    unselected = np.ones(outputs.shape, bool)
    np.put_along_axis(unselected, selected, False, axis=1)
    np.testing.assert_array_equal(outputs[unselected],
                                  float_outputs[unselected])
    got = np.take_along_axis(outputs, selected, axis=1)
    want = int8_expected(rows, weights, selected, quantize_inputs)
    if quantize_inputs:  # exact integer sums: only the division rounds
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_sparse_forward_arrays_is_sparse_forward_without_checks(int8, rng):
    """The backends' entry point computes what `sparse_forward` does."""
    if not native.available():
        pytest.skip("the native library cannot be built here")
    rows, weights = int8_case(rng, 40, 100, 3, 5)
    if not int8:
        kernel = rng.normal(size=weights["kernel"].shape).astype("float32")
        weights = dict(weights, kernel=kernel, kernel_scale=None)
    arrays = {name: weights[name] for name in native.FORWARD_WEIGHTS}
    want = native.sparse_forward(rows, weights, 13)
    got = native.kernels.sparse_forward_arrays(rows, arrays, 13)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_int8_library_equals_the_numpy_fallback(monkeypatch, rng):
    if not native.available():
        pytest.skip("the native library cannot be built here")
    rows, weights = int8_case(rng, 33, 70, 4, 5)
    want = native.sparse_forward(rows, weights, 10)
    monkeypatch.setattr(config, "_enabled", False)
    assert build.library() is None
    got = native.sparse_forward(rows, weights, 10)
    np.testing.assert_array_equal(got[1], want[1])
    # The light path's float sums run in another order than BLAS's.
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_an_int8_kernel_needs_its_scales_and_a_float_one_none():
    rows, weights = int8_case(np.random.default_rng(0), 12, 16, 4, 1)
    with pytest.raises(ValueError, match="needs its `kernel_scale`"):
        native.sparse_forward(rows, dict(weights, kernel_scale=None), 3)
    with pytest.raises(ValueError, match="`kernel_scale` is for an int8"):
        native.sparse_forward(
            rows, dict(weights, kernel=weights["kernel"].astype("float32")), 3
        )
    with pytest.raises(ValueError, match="`kernel_scale` must have shape"):
        native.sparse_forward(
            rows, dict(weights, kernel_scale=np.ones(5, "float32")), 3
        )


# --- The training kernels: selection mask and straight-through mix ---------


def _training_library():
    if build.library() is None:
        pytest.skip("the native kernel could not be built here")


@pytest.mark.parametrize(
    "shape, k",
    [
        ((1, 7), 3),
        ((70, 64), 29),
        ((3, 4, 40), 40),
        ((5, 9), 1),
        ((0, 6), 2),
        ((6, 1024), 461),
        ((2, 4099), 4098),
    ],
)
@pytest.mark.parametrize(
    "kind",
    [
        "normal",
        "ties",
        "nan_and_subnormal",
        "infinities",
        "tied_rows",
        "low_bits",
    ],
)
def test_topk_mask_equals_topk_mask(shape, k, kind, rng):
    """The C selection marks what `topk_mask` marks, bit for bit: NaN
    lowest, subnormals and -0.0 as zero, ties to the lowest index.
    `low_bits`: scores that differ only in their last mantissa bits, so
    the radix selection runs to its last digit with many candidates."""
    _training_library()
    scores = rng.normal(size=shape).astype("float32")
    if kind == "low_bits":
        steps = rng.integers(0, 600, size=shape)
        scores = (1.0 + steps * 2.0**-23).astype("float32")
    elif kind == "ties":
        scores = np.round(scores)
    elif kind == "nan_and_subnormal" and scores.size:
        scores[..., 0] = np.nan
        scores[..., -1] = 1e-40
        scores[..., shape[-1] // 2] = -0.0
    elif kind == "infinities" and scores.size:
        scores[..., ::3] = np.inf
        scores[..., 1::4] = -np.inf
    elif kind == "tied_rows":
        scores[...] = 0.25
    mask = native.kernels.topk_mask(scores, k)
    assert mask.dtype == np.float32 and mask.shape == scores.shape
    for method in ("top_k", "bisection"):
        want = keras.ops.convert_to_numpy(topk_mask(scores, k, method=method))
        np.testing.assert_array_equal(mask, want)


# 600 rows of 500 scores: 300,000, two threads of at least 2^17 each.
THREADED_SHAPE, THREADED_K = (600, 500), 210


def _threaded_logits(rng, kind):
    logits = rng.normal(size=THREADED_SHAPE).astype("float32")
    if kind == "ties":
        logits = np.round(logits).astype("float32")
    elif kind == "tied_rows":
        logits[::7] = 0.25
    return logits


@pytest.mark.parametrize("kind", ["normal", "ties", "tied_rows"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_selection_shares_rows_among_threads(kind, threads, rng):
    """`midl_topk_mask` and `midl_select_mix` give each thread rows of
    their own (a thread for each 2^17 scores or more): the same outputs
    as `topk_mask`'s and the masked path's, bit for bit, on any count."""
    _training_library()
    logits = _threaded_logits(rng, kind)
    count, units = THREADED_SHAPE
    want = keras.ops.convert_to_numpy(topk_mask(logits, THREADED_K))
    mask = np.empty(THREADED_SHAPE, np.float32)
    ran = native.kernels.topk_mask_pointers(
        logits.ctypes.data, count, units, THREADED_K, mask.ctypes.data,
        threads=threads,
    )
    assert ran == min(threads, 2)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(
        native.kernels.topk_mask(logits, THREADED_K, threads=threads), want
    )

    full, light = (
        rng.normal(size=THREADED_SHAPE).astype("float32") for _ in range(2)
    )
    bias, light_bias = (
        rng.normal(size=units).astype("float32") for _ in range(2)
    )
    mixed = full.copy()
    ran = native.kernels.select_mix_pointers(
        logits.ctypes.data, count, units, THREADED_K, mixed.ctypes.data,
        bias.ctypes.data, light.ctypes.data, light_bias.ctypes.data,
        threads=threads,
    )
    assert ran == min(threads, 2)
    expected = np.where(want > 0, full + bias, light + light_bias)
    np.testing.assert_array_equal(
        mixed.view("uint32"), expected.view("uint32")
    )


def test_a_small_selection_runs_on_one_thread(rng):
    _training_library()
    logits = rng.normal(size=(100, 500)).astype("float32")  # 50,000
    mask = np.empty(logits.shape, np.float32)
    assert native.kernels.topk_mask_pointers(
        logits.ctypes.data, 100, 500, 9, mask.ctypes.data, threads=8
    ) == 1


@pytest.mark.parametrize("threads", [0, -1, 2.0, False])
def test_the_selection_rejects_bad_threads(threads):
    _training_library()
    with pytest.raises(ValueError, match=f"threads={threads!r}"):
        native.kernels.topk_mask(
            np.zeros((2, 4), "float32"), 2, threads=threads
        )


def test_topk_mask_rejects_a_bad_k():
    _training_library()
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 4\]"):
        native.kernels.topk_mask(np.zeros((2, 4), "float32"), 5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("with_light", [True, False])
@pytest.mark.parametrize("with_column", [True, False])
@pytest.mark.parametrize("with_biases", [True, False])
def test_mix_and_its_gradients_in_c(
    temperature, with_light, with_column, with_biases, rng
):
    """`mix` is `where(mask, full + bias, light + light_bias)`;
    `mix_backward` the gradients of `straight_through_mix` of the biased
    paths, the same float32 operations in the same order (bit for bit
    against NumPy's float32 arithmetic), the frequencies' gradient
    (`column`, one per unit) added to every row, and the biases' the sums
    of `d_full` and `d_light` over the rows."""
    _training_library()
    shape = (37, 19)  # not a multiple of the vector width
    mask = (rng.random(shape) < 0.4).astype("float32")
    logits, full, upstream = (
        rng.normal(size=shape).astype("float32") for _ in range(3)
    )
    light = rng.normal(size=shape).astype("float32") if with_light else None
    bias, light_bias = (
        rng.normal(size=shape[-1]).astype("float32") if with_biases else None
        for _ in range(2)
    )
    biased_full = full if bias is None else full + bias
    base = np.zeros(shape, "float32")
    if light is not None:
        base = light if light_bias is None else light + light_bias
    np.testing.assert_array_equal(
        native.kernels.mix(mask, full, light, bias, light_bias),
        np.where(mask > 0, biased_full, base),
    )
    scaled = logits if temperature == 1.0 else logits / np.float32(temperature)
    soft = (1 / (1 + np.exp(-scaled.astype("float64")))).astype("float32")
    column = rng.normal(size=shape[-1]).astype("float32")
    if not with_column:
        column = None
        # -0.0 survives where nothing is added.
        upstream[0, :4] = -0.0
    d_full, d_light, d_logits, d_bias, d_light_bias = (
        native.kernels.mix_backward(
            upstream, mask, soft, full, light, temperature, column=column,
            bias=bias, light_bias=light_bias,
        )
    )
    np.testing.assert_array_equal(d_full, np.where(mask > 0, upstream, 0))
    if with_light:
        np.testing.assert_array_equal(d_light, np.where(mask > 0, 0, upstream))
    else:
        assert d_light is None and d_light_bias is None
    if with_biases:
        np.testing.assert_allclose(
            d_bias, d_full.sum(0, dtype="float64"), rtol=1e-5, atol=1e-6
        )
        if with_light:
            np.testing.assert_allclose(
                d_light_bias, d_light.sum(0, dtype="float64"), rtol=1e-5,
                atol=1e-6,
            )
    else:
        assert d_bias is None and d_light_bias is None
    slope = soft * (np.float32(1) - soft) / np.float32(temperature)
    products = upstream * (biased_full - base)
    if column is not None:
        products = products + column
    np.testing.assert_array_equal(d_logits, products * slope)
    np.testing.assert_array_equal(
        np.signbit(d_logits), np.signbit(products * slope)
    )


def test_mix_refuses_a_bias_of_another_length():
    _training_library()
    full = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match="`light_bias` must have shape"):
        native.kernels.mix(full, full, full, np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="`bias` must have shape"):
        native.kernels.mix_backward(
            full, full, full, full, bias=np.zeros(5, "float32")
        )


def test_mix_gradients_of_the_biases_of_no_rows_are_zero():
    _training_library()
    empty = np.zeros((0, 3), "float32")
    *_, d_bias, d_light_bias = native.kernels.mix_backward(
        empty, empty, empty, empty, empty, bias=np.ones(3),
        light_bias=np.ones(3),
    )
    np.testing.assert_array_equal(d_bias, np.zeros(3))
    np.testing.assert_array_equal(d_light_bias, np.zeros(3))


@pytest.mark.parametrize(
    "kind", ["normal", "ties", "nan_and_subnormal", "tied_rows", "low_bits"]
)
@pytest.mark.parametrize("with_light", [True, False])
@pytest.mark.parametrize("with_biases", [True, False])
def test_select_mix_is_the_masked_paths_mix(kind, with_light, with_biases, rng):
    """`midl_select_mix` writes over `full` what the masked path computes
    from the unbiased paths: `where(topk_mask(logits), full + bias,
    light + light_bias)` (0 without `light`), bit for bit, -0.0 included
    (a missing bias adds nothing, not +0.0)."""
    _training_library()
    shape, k = (9, 70), 29  # 70: not a multiple of the vector width
    logits = rng.normal(size=shape).astype("float32")
    if kind == "ties":
        logits = np.round(logits).astype("float32")
    elif kind == "nan_and_subnormal":
        logits[:, 0] = np.nan
        logits[:, -1] = 1e-40
        logits[:, 35] = -0.0
    elif kind == "tied_rows":
        logits[...] = 0.25
    elif kind == "low_bits":
        steps = rng.integers(0, 40, size=shape)
        logits = (1.0 + steps * 2.0**-23).astype("float32")
    full, light = (rng.normal(size=shape).astype("float32") for _ in range(2))
    full[:, ::5] = -0.0
    light[:, ::3] = -0.0
    bias, light_bias = (
        rng.normal(size=shape[-1]).astype("float32") if with_biases else None
        for _ in range(2)
    )
    mask = keras.ops.convert_to_numpy(topk_mask(logits, k)) > 0
    chosen = full if bias is None else full + bias
    unchosen = np.zeros(shape, "float32")
    if with_light:
        unchosen = light if light_bias is None else light + light_bias
    want = np.where(mask, chosen, unchosen)

    outputs = full.copy()
    native.kernels.select_mix_pointers(
        logits.ctypes.data,
        shape[0],
        shape[1],
        k,
        outputs.ctypes.data,
        *(0 if a is None else a.ctypes.data
          for a in (bias, light if with_light else None, light_bias)),
    )
    np.testing.assert_array_equal(outputs.view("uint32"), want.view("uint32"))


def _forward_with_threads(rows, weights, k, threads, quantize_inputs=True):
    """`sparse_forward_pointers` on `threads` threads: the outputs, the
    selection and the threads that ran."""
    units, dim = weights["kernel"].shape
    outputs = np.empty((rows.shape[0], units), np.float32)
    selected = np.empty((rows.shape[0], k), np.int64)
    addresses = {
        name: 0 if weights.get(name) is None else weights[name].ctypes.data
        for name in native.FORWARD_WEIGHTS
    }
    ran = native.kernels.sparse_forward_pointers(
        rows.ctypes.data, rows.shape[0], dim, addresses,
        weights["projection"].shape[1], units, k, outputs.ctypes.data,
        selected.ctypes.data, quantize_inputs=quantize_inputs,
        threads=threads,
    )
    return outputs, selected, ran


# Kernels whose selected rows are 2.7-3 MiB: two threads of at least 1 MiB
# each. 1 row: the selected neurons are split; 5 and 70 rows (two batch
# blocks): the windows of the union.
@pytest.mark.parametrize("count", [1, 5, 70])
@pytest.mark.parametrize(
    "kernel_kind, quantize_inputs",
    [("float", True), ("int8", True), ("int8", False)],
)
def test_threads_give_the_same_outputs_bit_for_bit(
    count, kernel_kind, quantize_inputs, rng
):
    if not native.available():
        pytest.skip("the native library cannot be built here")
    if kernel_kind == "float":
        units, dim, k = 1024, 1030, 700  # 700 rows of 4,120 bytes
        rows, weights = int8_case(rng, units, dim, 4, count)
        kernel = rng.normal(size=(units, dim)).astype("float32")
        weights = dict(weights, kernel=kernel, kernel_scale=None)
    else:
        units, dim, k = 4096, 1030, 2800  # 2,800 rows of 1,030 bytes
        rows, weights = int8_case(rng, units, dim, 4, count)
    want = _forward_with_threads(rows, weights, k, 1, quantize_inputs)
    assert want[2] == 1
    for threads in (2, 3):
        outputs, selected, ran = _forward_with_threads(
            rows, weights, k, threads, quantize_inputs
        )
        # One row: 3 threads would read less than 1 MiB each. Several:
        # the union of their selections, more rows, takes 3.
        assert ran == (2 if count == 1 else threads)
        np.testing.assert_array_equal(selected, want[1])
        np.testing.assert_array_equal(
            outputs.view("uint32"), want[0].view("uint32")
        )


def test_select_gather_threads_give_the_same_outputs(rng):
    if not native.available():
        pytest.skip("the native library cannot be built here")
    logits, kernel, rows, light, bias = random_case(
        rng, 1024, 1030, 3, 700, "ties"
    )
    want = native.select_gather(logits, kernel, rows, 700, light, bias, 1)
    got = native.select_gather(logits, kernel, rows, 700, light, bias, 2)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view("uint32"), want[0].view("uint32"))


def test_a_small_layer_runs_on_one_thread(rng):
    """Threads are started only for 1 MiB or more of kernel rows each."""
    if not native.available():
        pytest.skip("the native library cannot be built here")
    rows, weights = int8_case(rng, 64, 32, 4, 3)
    weights = dict(weights, kernel=weights["kernel"].astype("float32"),
                   kernel_scale=None)
    assert _forward_with_threads(rows, weights, 20, 8)[2] == 1


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_bad_threads_raise(implementation, threads):
    rows, weights = int8_case(np.random.default_rng(0), 12, 16, 4, 1)
    with pytest.raises(ValueError, match="`threads` must be a positive int"):
        native.sparse_forward(rows, weights, 3, threads=threads)
    with pytest.raises(ValueError, match=f"threads={threads!r}"):
        native.select_gather(
            np.zeros((1, 6)), np.zeros((6, 5)), np.zeros((1, 5)), 2,
            np.zeros((1, 6)), threads=threads,
        )
