"""Every selection method gives the same mask, on every backend, with and
without the tie check first (`check_ties_first`)."""

import numpy as np
import pytest
from conftest import BACKEND
from keras import ops

from keras_midl.selection import SELECTION_METHODS
from keras_midl.selection import kth_largest
from keras_midl.selection import topk_mask

N = 33
F32 = np.finfo("float32")
# (method, check_ties_first): every way `topk_mask` can find the mask.
VARIANTS = [
    (method, check) for method in SELECTION_METHODS for check in (False, True)
]


def variant_mask(k, variant):
    """The compiled `topk_mask` of one variant, for rows of scores."""
    method, check = variant
    return compiled(
        lambda s: topk_mask(s, k, method=method, check_ties_first=check)
    )


def compiled(fn):
    """`fn` compiled as the layer is in `fit`/`predict` (eager on torch).

    JAX would otherwise compile each of the bisection's ~150 ops on its own.
    """
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


def reference_mask(scores, k):
    """NumPy reference: NaN is -inf, then stable descending order."""
    scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-scores, axis=-1, kind="stable")
    mask = np.zeros(scores.shape, "float32")
    np.put_along_axis(mask, order[..., :k], 1.0, axis=-1)
    return mask


def special_rows(rng):
    """Rows of length N that stress ties, signs, NaN, infinities, scales.

    No subnormal numbers: XLA on CPU (JAX, TensorFlow with jit_compile)
    flushes them to zero, so they tie with 0 there and nowhere else.
    """
    rows = {
        "normal": rng.normal(size=N),
        "all_equal": np.full(N, 0.5),
        "few_values": rng.integers(0, 4, size=N).astype("float64"),
        "signed_zeros": rng.choice([-0.0, 0.0], size=N),
        "zeros_and_tiny": rng.choice([-0.0, 0.0, F32.tiny, -F32.tiny], N),
        "tiny": rng.normal(size=N) * 1e-30,
        "huge": rng.normal(size=N) * 1e37,
        "extremes": rng.choice([F32.max, -F32.max, F32.tiny, -F32.tiny], N),
        "infinities": rng.choice([np.inf, -np.inf, 0.0, 1.0], size=N),
        "all_minus_inf": np.full(N, -np.inf),
        "some_nan": np.where(rng.random(N) < 0.3, np.nan, rng.normal(size=N)),
        "nan_and_inf": rng.choice([np.nan, np.inf, -np.inf, -1.0], size=N),
        "all_nan": np.full(N, np.nan),
    }
    names = list(rows)
    return names, np.stack([rows[name] for name in names]).astype("float32")


@pytest.mark.parametrize("k", [1, 16, N - 1])
def test_methods_give_the_reference_mask(k, rng):
    names, scores = special_rows(rng)
    expected = reference_mask(scores, k)
    for method in VARIANTS:
        mask = variant_mask(k, method)
        mask = ops.convert_to_numpy(mask(scores))
        for row, name in enumerate(names):
            np.testing.assert_array_equal(
                mask[row], expected[row], err_msg=f"{method}, row {name}"
            )


@pytest.mark.parametrize("k", [1, N - 1])
def test_methods_find_the_same_kth_largest_value(k, rng):
    names, scores = special_rows(rng)
    finite = [not np.isnan(row).any() for row in scores]
    scores = scores[finite]
    expected = -np.sort(-scores, axis=-1)[:, k - 1 : k]
    for method in SELECTION_METHODS:
        value = compiled(lambda s, m=method: kth_largest(s, k, method=m))
        np.testing.assert_array_equal(
            ops.convert_to_numpy(value(scores)), expected, err_msg=method
        )


def test_methods_agree_on_rank_3_scores(rng):
    scores = rng.integers(-3, 3, size=(2, 5, 64)).astype("float32")
    expected = reference_mask(scores, 20)
    for method in VARIANTS:
        mask = variant_mask(20, method)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(mask(scores)), expected, err_msg=str(method)
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_methods_agree_on_half_precision_scores(dtype, rng):
    # Rounding to 8 or 11 significant bits creates many ties.
    scores = ops.cast(rng.normal(size=(6, 64)) * 3, dtype)
    expected = reference_mask(
        ops.convert_to_numpy(ops.cast(scores, "float32")), 20
    )
    for method in VARIANTS:
        mask = variant_mask(20, method)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(mask(scores)), expected, err_msg=str(method)
        )


def test_methods_agree_on_wide_random_rows(rng):
    # The layer's regime: many rows, n in the thousands, k about n / 2.
    scores = rng.normal(size=(16, 1024)).astype("float32")
    scores[:, 0:512:2] = scores[:, 1:512:2]  # and some exact ties
    expected = reference_mask(scores, 461)
    for method in VARIANTS:
        mask = variant_mask(461, method)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(mask(scores)), expected, err_msg=str(method)
        )

