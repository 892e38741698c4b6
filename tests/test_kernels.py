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
