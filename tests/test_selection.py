"""`keras_midl.ops.selection`: the top-k mask, every selection method
(`top_k`, `bisection`, with and without `check_ties_first`) giving the
same mask on every backend, and the straight-through estimators."""

import numpy as np
import pytest
from backend_utils import BACKEND
from backend_utils import value_and_gradients
from keras import ops

from keras_midl.ops import dispatch
from keras_midl.ops.selection import CACHE_BLOCK_SCORES
from keras_midl.ops.selection import SELECTION_METHODS
from keras_midl.ops.selection import balance_loss
from keras_midl.ops.selection import cache_sized_block
from keras_midl.ops.selection import frequency_balance_loss
from keras_midl.ops.selection import kth_largest
from keras_midl.ops.selection import selection_frequencies
from keras_midl.ops.selection import straight_through
from keras_midl.ops.selection import straight_through_mix
from keras_midl.ops.selection import topk_mask

METHODS = ["top_k", "bisection"]
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


# --- Every method, the reference mask --------------------------------------


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


# --- In blocks of rows -----------------------------------------------------


@pytest.mark.parametrize("rows_per_block", [1, 4, 5, 13, 64])
def test_blocks_give_the_reference_mask(rows_per_block, rng):
    """13 special rows in blocks that divide them or not (the last block
    padded), or one block larger than the batch; compiled as the
    backends compile the selection."""
    names, scores = special_rows(rng)
    expected = reference_mask(scores, 16)
    for method, check in VARIANTS:
        mask = compiled(
            lambda s, m=method, c=check: topk_mask(
                s,
                16,
                method=m,
                check_ties_first=c,
                rows_per_block=rows_per_block,
            )
        )
        mask = ops.convert_to_numpy(mask(scores))
        for row, name in enumerate(names):
            np.testing.assert_array_equal(
                mask[row], expected[row], err_msg=f"{method}, row {name}"
            )


@pytest.mark.parametrize("method", METHODS)
def test_blocks_of_rank_3_scores_with_ties(method, rng):
    scores = rng.integers(-3, 3, size=(3, 5, 64)).astype("float32")
    mask = topk_mask(scores, 20, method=method, rows_per_block=4)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(mask), reference_mask(scores, 20)
    )


@pytest.mark.parametrize("shape", [(0, 6), (3, 0, 6)])
def test_blocks_of_an_empty_batch(shape):
    mask = topk_mask(np.zeros(shape, "float32"), 2, rows_per_block=4)
    assert tuple(mask.shape) == shape


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "8"])
def test_topk_mask_rejects_invalid_rows_per_block(value):
    with pytest.raises(ValueError, match=f"rows_per_block={value!r}"):
        topk_mask(np.zeros((2, 10), "float32"), 3, rows_per_block=value)


@pytest.mark.parametrize(
    "units, rows",
    [(1, CACHE_BLOCK_SCORES), (1024, 32), (4096, 8), (10**6, 1), (0, None)],
)
def test_cache_sized_block(units, rows):
    expected = CACHE_BLOCK_SCORES if rows is None else rows
    assert cache_sized_block(units) == expected


# --- topk_mask and kth_largest ---------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, k",
    [((4, 10), 3), ((1, 10), 3), ((2, 5, 16), 7), ((3, 8), 1), ((3, 8), 8)],
)
def test_topk_mask_selects_the_k_largest(method, shape, k, rng):
    scores = rng.normal(size=shape).astype("float32")
    mask = ops.convert_to_numpy(topk_mask(scores, k, method=method))
    assert mask.shape == shape
    np.testing.assert_array_equal(mask.sum(axis=-1), np.full(shape[:-1], k))
    np.testing.assert_array_equal(mask, reference_mask(scores, k))


@pytest.mark.parametrize("method", METHODS)
def test_topk_mask_breaks_ties_by_lowest_index(method):
    scores = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],
            [0.0, 2.0, 1.0, 1.0],
            [3.0, 1.0, 3.0, 3.0],
            [-1.0, -1.0, -2.0, -1.0],
        ],
        dtype="float32",
    )
    expected = np.array(
        [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]],
        dtype="float32",
    )
    mask = ops.convert_to_numpy(topk_mask(scores, 2, method=method))
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("method", METHODS)
def test_topk_mask_ranks_nan_lowest_and_inf_highest(method):
    scores = np.array(
        [[np.nan, -np.inf, np.inf, -0.0, 0.0, np.nan]], dtype="float32"
    )
    mask = ops.convert_to_numpy(topk_mask(scores, 3, method=method))
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 0]])
    all_nan = np.full((2, 5), np.nan, dtype="float32")
    mask = ops.convert_to_numpy(topk_mask(all_nan, 2, method=method))
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0]] * 2)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e30])
def test_selection_methods_agree_at_every_scale(scale, rng):
    scores = (rng.normal(size=(16, 33)) * scale).astype("float32")
    for k in (1, 5, 32):
        by_top_k = ops.convert_to_numpy(kth_largest(scores, k, "top_k"))
        by_bits = ops.convert_to_numpy(kth_largest(scores, k, "bisection"))
        np.testing.assert_array_equal(by_top_k, by_bits)


@pytest.mark.parametrize("k", [0, -1, 11, 2.0, True])
def test_topk_mask_rejects_invalid_k(k):
    with pytest.raises(ValueError, match=f"k={k!r}"):
        topk_mask(np.zeros((2, 10), "float32"), k)


def test_topk_mask_rejects_unknown_method():
    with pytest.raises(ValueError, match="method='sort'"):
        topk_mask(np.zeros((2, 10), "float32"), 3, method="sort")


def test_topk_mask_accepts_half_precision_scores(rng):
    scores = rng.normal(size=(4, 12)).astype("float32")
    for dtype in ("float16", "bfloat16"):
        half = ops.cast(scores, dtype)
        mask = ops.convert_to_numpy(topk_mask(half, 4))
        expected = reference_mask(
            ops.convert_to_numpy(ops.cast(half, "float32")), 4
        )
        np.testing.assert_array_equal(mask, expected)


def test_straight_through_has_hard_value_and_soft_gradient(rng):
    logits = rng.normal(size=(3, 6)).astype("float32")
    upstream = rng.normal(size=(3, 6)).astype("float32")
    temperature = 0.7

    def loss(s):
        gate = straight_through(topk_mask(s, 2), ops.sigmoid(s / temperature))
        return ops.sum(gate * ops.convert_to_tensor(upstream))

    value, (grad,) = value_and_gradients(loss, logits)
    mask = reference_mask(logits, 2)
    np.testing.assert_allclose(value, np.sum(mask * upstream), rtol=1e-6)
    sigmoid = 1 / (1 + np.exp(-logits / temperature))
    expected = upstream * sigmoid * (1 - sigmoid) / temperature
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_straight_through_forward_is_exactly_hard(rng):
    hard = (rng.random((5, 7)) > 0.5).astype("float32")
    soft = rng.random((5, 7)).astype("float32")
    out = ops.convert_to_numpy(straight_through(hard, soft))
    np.testing.assert_array_equal(out, hard)
    assert out.dtype == np.float32


@pytest.mark.parametrize("method", METHODS)
def test_subnormal_scores_tie_with_zero(method):
    """Subnormal scores tie with zero, with the same mask on every backend.

    XLA on CPU (JAX, TensorFlow) flushes subnormals to zero by itself, so
    there this test checks the platform's behaviour and cannot catch a
    missing flush in `topk_mask`; only on torch, which keeps subnormals,
    does it guard the explicit flush.
    """
    tiny = np.float32(1e-40)  # subnormal
    scores = np.array([[0.0, tiny, -tiny, 2 * tiny, -1.0]], dtype="float32")
    mask = ops.convert_to_numpy(topk_mask(scores, 2, method=method))
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0]])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, 6), (3, 0, 6)])
def test_empty_batch(method, shape):
    """No rows, no error: `ops.min` of the top-k values refused an empty
    tensor on torch and eager TensorFlow (issue 11, defect 3)."""
    scores = np.zeros(shape, "float32")
    mask = topk_mask(scores, 2, method=method)
    assert tuple(mask.shape) == shape
    assert tuple(kth_largest(scores, 2, method).shape) == (*shape[:-1], 1)


@pytest.mark.parametrize("soft_dtype", ["float16", "float32", "float64"])
def test_straight_through_returns_the_dtype_of_soft(soft_dtype, rng):
    """A float32 mask and a float64 surrogate do not mix dtypes (defect 2:
    TensorFlow refused to add them)."""
    hard = (rng.random((3, 4)) > 0.5).astype("float32")
    soft = ops.cast(rng.random((3, 4)), soft_dtype)
    out = straight_through(hard, soft)
    expected_dtype = ops.convert_to_tensor(soft).dtype
    assert out.dtype == expected_dtype
    np.testing.assert_array_equal(ops.convert_to_numpy(out), hard)


def _chain_mix(mask, logits, full, light, temperature):
    """The straight-through mix as a chain of ops, the reference."""
    gate = straight_through(mask, ops.sigmoid(logits / temperature))
    return gate * full + (1.0 - gate) * light


@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_straight_through_mix_matches_the_chain(temperature, rng):
    mask = (rng.random((4, 9)) > 0.5).astype("float32")
    logits, full, light, upstream = (
        rng.normal(size=(4, 9)).astype("float32") for _ in range(4)
    )
    weights = ops.convert_to_tensor(upstream)

    def loss(mix):
        return lambda s, f, h: ops.sum(
            weights * mix(mask, s, f, h, temperature)
        )

    def fused(mask, s, f, h, t):
        return straight_through_mix(mask, s, f, h, temperature=t)

    value, grads = value_and_gradients(loss(fused), logits, full, light)
    expected, expected_grads = value_and_gradients(
        loss(_chain_mix), logits, full, light
    )
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    # `upstream * (full - light)` against the chain's difference of two
    # products: float32 rounding apart.
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=2e-4, atol=1e-6)
    # And against the formula, not only the chain.
    soft = 1 / (1 + np.exp(-logits.astype("float64") / temperature))
    np.testing.assert_allclose(
        grads[0],
        upstream * (full - light) * soft * (1 - soft) / temperature,
        rtol=2e-4,
        atol=1e-6,
    )
    np.testing.assert_array_equal(grads[1], upstream * mask)
    np.testing.assert_array_equal(grads[2], upstream * (1 - mask))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("with_light", [True, False])
@pytest.mark.parametrize("dispatched", [False, True])
def test_frequencies_of_the_mix_match_the_balance_loss_chain(
    temperature, with_light, dispatched, rng
):
    """`return_frequencies=True`: the mask's mean over the rows, whose
    gradient reaches the logits in the mix's backward pass as
    `selection_frequencies`' straight-through gradient does; the rows are
    all leading axes. `dispatched`: through `keras_midl.ops.dispatch`
    (the native kernel on torch)."""
    shape = (3, 4, 9)
    mask = (rng.random(shape) > 0.5).astype("float32")
    logits, full, light, upstream = (
        rng.normal(size=shape).astype("float32") for _ in range(4)
    )
    weights = ops.convert_to_tensor(upstream)
    per_unit = ops.convert_to_tensor(rng.normal(size=9).astype("float32"))
    mix = dispatch.straight_through_mix if dispatched else straight_through_mix

    def fused(s, f, h=None):
        outputs, frequencies = mix(
            ops.convert_to_tensor(mask), s, f, h if with_light else None,
            temperature, return_frequencies=True,
        )
        return ops.sum(weights * outputs) + ops.sum(per_unit * frequencies)

    def chain(s, f, h=None):
        outputs = _chain_mix(mask, s, f, h if with_light else 0.0, temperature)
        soft = ops.sigmoid(s / temperature)
        frequencies = selection_frequencies(mask, soft)
        return ops.sum(weights * outputs) + ops.sum(per_unit * frequencies)

    arrays = (logits, full, light) if with_light else (logits, full)
    value, grads = value_and_gradients(fused, *arrays)
    expected, expected_grads = value_and_gradients(chain, *arrays)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=2e-4, atol=1e-6)
    _, frequencies = mix(
        ops.convert_to_tensor(mask), ops.convert_to_tensor(logits),
        ops.convert_to_tensor(full), None, temperature,
        return_frequencies=True,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(frequencies),
        mask.reshape(-1, 9).mean(axis=0),
        rtol=1e-6,
    )


def test_frequency_balance_loss_is_the_balance_loss(rng):
    mask = (rng.random((6, 10)) > 0.6).astype("float32")
    soft = rng.random((6, 10)).astype("float32")
    frequencies = selection_frequencies(mask, soft)
    np.testing.assert_allclose(
        ops.convert_to_numpy(frequency_balance_loss(frequencies, 4, 0.3)),
        ops.convert_to_numpy(balance_loss(mask, soft, 4, 0.3)),
        rtol=1e-6,
    )
    share = 0.4
    expected = 0.3 * np.mean((mask.mean(axis=0) - share) ** 2) / share**2
    np.testing.assert_allclose(
        ops.convert_to_numpy(frequency_balance_loss(frequencies, 4, 0.3)),
        expected,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_straight_through_mix_value_is_exactly_full_or_light(dtype, rng):
    mask = (rng.random((5, 7)) > 0.5).astype("float32")
    logits = rng.normal(size=(5, 7)).astype("float32")
    full = ops.cast(rng.normal(size=(5, 7)) * 1e3, dtype)
    light = ops.cast(rng.normal(size=(5, 7)), dtype)
    out = straight_through_mix(mask, logits, full, light)
    assert ops.dtype(out) == dtype

    def as_float32(x):
        return ops.convert_to_numpy(ops.cast(x, "float32"))

    expected = np.where(mask > 0, as_float32(full), as_float32(light))
    np.testing.assert_array_equal(as_float32(out), expected)
    zero_light = straight_through_mix(mask, logits, full)
    np.testing.assert_array_equal(
        as_float32(zero_light), np.where(mask > 0, as_float32(full), 0.0)
    )
