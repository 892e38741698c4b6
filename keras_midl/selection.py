"""Selection ops used by the MIDL gate, usable on their own.

Both functions are written with `keras.ops` only and give the same results on
TensorFlow, JAX and PyTorch, including how ties are broken.
"""

import math

from keras import ops

from keras_midl._checks import is_integer

SELECTION_METHODS = ("top_k", "bisection")
FLOAT32_TINY = 1.1754944e-38  # smallest normal float32


def kth_largest(scores, k, method="top_k"):
    """Returns the k-th largest value of each row of `scores`.

    Args:
        scores: Float tensor of shape `(..., n)`.
        k: Python int in `[1, n]`.
        method: `"top_k"` takes the smallest of the `k` values that
            `ops.top_k` returns (unsorted). `"bisection"`
            runs 32 fixed steps of a bitwise binary search on the float32
            bit patterns of the scores: each step is one comparison and one
            row sum, there is no sort, and the result is exact (not an
            approximation) for every finite or infinite float32 value.
            NaN scores are not supported here (`topk_mask` maps them to
            `-inf` first).

    Returns:
        Tensor of shape `(..., 1)` in float32.
    """
    scores = ops.cast(scores, "float32")
    if method == "top_k":
        # The smallest of the k largest values: no need to sort them, which
        # is faster than reading the k-th of a sorted top_k.
        values, _ = ops.top_k(scores, k, sorted=False)
        if 0 in tuple(values.shape):
            # An empty batch: `ops.min` refuses empty tensors (torch, eager
            # TensorFlow), although only the leading axes are empty here.
            return ops.zeros((*values.shape[:-1], 1), "float32")
        return ops.min(values, axis=-1, keepdims=True)
    if method == "bisection":
        return _kth_largest_bisection(scores, k)
    raise ValueError(
        "Received an invalid value for `method`, expected one of "
        f"{SELECTION_METHODS}. Received: method={method!r}"
    )


def _sortable_keys(scores):
    """Maps float32 values to int32 keys with the same order.

    For a non-negative float the bit pattern, read as a signed integer, is
    already ordered. For a negative one the order of the magnitude bits is
    reversed, so those bits are flipped.
    """
    bits = ops.view(scores, "int32")
    flipped = ops.bitwise_xor(bits, ops.convert_to_tensor(0x7FFFFFFF, "int32"))
    return ops.where(bits < 0, flipped, bits)


def _keys_to_floats(keys):
    flipped = ops.bitwise_xor(keys, ops.convert_to_tensor(0x7FFFFFFF, "int32"))
    return ops.view(ops.where(keys < 0, flipped, keys), "float32")


def _kth_largest_bisection(scores, k):
    keys = _sortable_keys(scores)

    def count_at_least(threshold):
        return ops.sum(ops.cast(keys >= threshold[..., None], "int32"), -1)

    # Sign bit first: is the k-th largest key non-negative?
    zero = ops.zeros_like(keys[..., 0])
    int_min = ops.full_like(zero, -(2**31))
    answer = ops.where(count_at_least(zero) >= k, zero, int_min)

    # Then set each lower bit, from bit 30 down, when at least k keys stay
    # at or above it. A loop rather than 31 unrolled steps: the same run
    # time, half the XLA compile time.
    def set_bit_if_room(step, answer):
        bit = ops.left_shift(ops.ones_like(answer), 30 - step)
        candidate = ops.bitwise_or(answer, bit)
        return ops.where(count_at_least(candidate) >= k, candidate, answer)

    answer = ops.fori_loop(0, 31, set_bit_if_room, answer)
    return _keys_to_floats(answer[..., None])


def topk_mask(scores, k, method="top_k"):
    """Marks the `k` largest scores of each row.

    `mask[..., i] = 1` if `scores[..., i]` is among the `k` largest values of
    its row, else `0`; every row has exactly `k` ones.

    Ties: scores equal to the row's k-th largest value are taken in order of
    increasing index until the row has `k` ones (the lowest indices win).
    This rule is applied by the function itself, so it is the same on every
    backend whatever `ops.top_k` does with ties. NaN scores rank below every
    number (they are treated as `-inf`), so a row with NaNs still has exactly
    `k` ones; `+inf` ranks highest. Subnormal scores count as zero (XLA on
    CPU flushes them), so they tie with zeros on every backend.

    The mask carries no gradient (use `straight_through` for that).

    Example:

    >>> from keras_midl.selection import topk_mask
    >>> mask = topk_mask(np.array([[0.1, 0.9, 0.5, 0.9]]), k=2)
    >>> keras.ops.convert_to_numpy(mask)
    array([[0., 1., 0., 1.]], dtype=float32)
    >>> keras.ops.convert_to_numpy(topk_mask(np.array([[1.0, 1.0, 1.0]]), 2))
    array([[1., 1., 0.]], dtype=float32)

    Args:
        scores: Float tensor of shape `(..., n)`, any rank >= 1.
        k: Python int, `1 <= k <= n`.
        method: How the row's k-th largest value is found, `"top_k"` or
            `"bisection"` (see `kth_largest`). Both give the same mask.

    Returns:
        Float32 tensor of the shape of `scores` holding 0s and 1s.
    """
    n = scores.shape[-1]
    if not is_integer(k) or k < 1:
        raise ValueError(
            "Received an invalid value for `k`, expected a positive "
            f"integer. Received: k={k!r}"
        )
    if n is not None and k > n:
        raise ValueError(
            "Received an invalid value for `k`, expected at most the size "
            f"of the last axis of `scores` ({n}). Received: k={k}"
        )
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    scores = ops.where(ops.isnan(scores), -math.inf, scores)
    # XLA on CPU flushes subnormals to zero and other runtimes do not: flush
    # them here so that every backend sees the same ties.
    scores = ops.where(ops.abs(scores) < FLOAT32_TINY, 0.0, scores)
    if n is not None and k == n:
        return ops.ones_like(scores)
    threshold = kth_largest(scores, k, method=method)
    above = scores > threshold
    tied = ops.cast(scores == threshold, "int32")
    still_needed = k - ops.sum(ops.cast(above, "int32"), axis=-1, keepdims=True)
    first_tied = ops.logical_and(
        tied > 0, ops.cumsum(tied, axis=-1) <= still_needed
    )
    return ops.cast(ops.logical_or(above, first_tied), "float32")


def straight_through(hard, soft):
    """Straight-through estimator: the value of `hard`, the gradient of `soft`.

    `hard + (soft - stop_gradient(soft))`: in the forward pass this equals
    `hard` exactly; in the backward pass the gradient flows
    through `soft` as if `hard` had been replaced by it.

    Example:

    >>> from keras_midl.selection import straight_through, topk_mask
    >>> logits = np.array([[2.0, -1.0, 0.5]], dtype="float32")
    >>> mask = topk_mask(logits, k=1)
    >>> gate = straight_through(mask, keras.ops.sigmoid(logits))
    >>> keras.ops.convert_to_numpy(gate)  # the value of the mask
    array([[1., 0., 0.]], dtype=float32)

    Args:
        hard: Tensor, typically a 0/1 mask with no gradient.
        soft: Tensor broadcastable to `hard`, a differentiable surrogate.

    Returns:
        Tensor equal to `hard` whose gradient is that of `soft`, in the
        dtype of `soft` (`hard` is cast to it, so a float32 mask and a
        float64 or float16 surrogate do not mix dtypes).
    """
    soft = ops.convert_to_tensor(soft)
    hard = ops.cast(hard, soft.dtype)
    return hard + (soft - ops.stop_gradient(soft))
