"""Selection ops used by the MIDL gate, usable on their own.

Both functions are written with `keras.ops` only and give the same results on
TensorFlow, JAX and PyTorch, including how ties are broken.
"""

import math

import keras
from keras import ops

from keras_midl._checks import is_integer

SELECTION_METHODS = ("top_k", "bisection")
FLOAT32_TINY = 1.1754944e-38  # smallest normal float32
# Scores per block of rows for `topk_mask(..., rows_per_block=...)` under
# XLA on a CPU (`cache_sized_block`): 128 KiB of scores, and as much of
# keys, stay in a core's L2 cache through the bisection's passes.
CACHE_BLOCK_SCORES = 32768


def kth_largest(scores, k, method="top_k"):
    """Returns the k-th largest value of each row of `scores`.

    Args:
        scores: Float tensor of shape `(..., n)`.
        k: Python int in `[1, n]`.
        method: `"top_k"` takes the smallest of the `k` values that
            `ops.top_k` returns (unsorted). `"bisection"`
            runs 32 fixed steps of a bitwise binary search on the float32
            bit patterns of the scores: each step is one comparison and one
            count per row, there is no sort, and the result is exact (not an
            approximation) for every finite or infinite float32 value.
            NaN scores are not supported here (`topk_mask` maps them to
            `-inf` first).

    Returns:
        Tensor of shape `(..., 1)` in float32.
    """
    threshold, _ = _kth_largest_and_count(scores, k, method)
    return threshold


def _kth_largest_and_count(scores, k, method, early_exit=False):
    """`(threshold, count)`: the k-th largest value of each row and the
    number of the row's values at least as large (`>= k`; above `k` when
    the threshold is tied), both of shape `(..., 1)`. `count` is `None`
    where the method does not find it on the way (`"top_k"`).

    With `early_exit`, the bisection may stop once every row has exactly
    `k` values at or above its threshold: the threshold is then a lower
    bound of the k-th largest that selects the same `k` values (what
    `topk_mask` needs), not the k-th largest itself."""
    scores = ops.cast(scores, "float32")
    if method == "top_k":
        # The smallest of the k largest values: no need to sort them, which
        # is faster than reading the k-th of a sorted top_k.
        values, _ = ops.top_k(scores, k, sorted=False)
        if 0 in tuple(values.shape):
            # An empty batch: `ops.min` refuses empty tensors (torch, eager
            # TensorFlow), although only the leading axes are empty here.
            return ops.zeros((*values.shape[:-1], 1), "float32"), None
        return ops.min(values, axis=-1, keepdims=True), None
    if method == "bisection":
        return _kth_largest_bisection(scores, k, early_exit)
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


def _kth_largest_bisection(scores, k, early_exit=False):
    keys = _sortable_keys(scores)
    units = keys.shape[-1]

    def count_at_least(threshold):
        at_least = keys >= threshold[..., None]
        if units > 2**24:  # beyond float32's exact integers
            return ops.sum(ops.cast(at_least, "int32"), -1)
        # Each row's count as a product with a vector of ones: a float32
        # matrix-vector product, exact below 2**24 ones. XLA on a CPU
        # compiles it to its matrix-vector kernel, faster than its code
        # for a row sum: the whole selection took 0.75x the time of float32
        # row sums on TensorFlow at 256 x 4096 and 0.5x at 256 x 1024,
        # 0.8-1.0x on JAX (one-off A/Bs, one thread), the same on torch;
        # int32 sums were about twice as slow as float32 ones.
        ones = ops.ones((units,), "float32")
        counts = ops.matmul(ops.cast(at_least, "float32"), ones)
        return ops.cast(counts, "int32")

    # Sign bit first: is the k-th largest key non-negative? The count of
    # keys at or above the answer is carried along, for the tie check.
    zero = ops.zeros_like(keys[..., 0])
    int_min = ops.full_like(zero, -(2**31))
    non_negative = count_at_least(zero)
    answer = ops.where(non_negative >= k, zero, int_min)
    count = ops.where(non_negative >= k, non_negative, keys.shape[-1])

    # Then set each lower bit, from bit 30 down, when at least k keys stay
    # at or above it. A loop rather than 31 unrolled steps: the same run
    # time, half the XLA compile time.
    def set_bit_if_room(step, answer, count):
        bit = ops.left_shift(ops.ones_like(answer), 30 - step)
        candidate = ops.bitwise_or(answer, bit)
        candidate_count = count_at_least(candidate)
        room = candidate_count >= k
        return (
            step + 1,
            ops.where(room, candidate, answer),
            ops.where(room, candidate_count, count),
        )

    if early_exit:
        # Once every row has exactly k keys at or above its answer, the
        # lower bits change the answer but not which keys are above it:
        # float logits separate their k-th and (k+1)-th largest after
        # about 20 of the 31 bits.
        _, answer, count = ops.while_loop(
            lambda step, answer, count: ops.logical_and(
                step < 31, ops.any(count != k)
            ),
            set_bit_if_room,
            (ops.convert_to_tensor(0, "int32"), answer, count),
        )
    else:
        answer, count = ops.fori_loop(
            0,
            31,
            lambda step, state: set_bit_if_room(step, *state)[1:],
            (answer, count),
        )
    return _keys_to_floats(answer[..., None]), count[..., None]


def cache_sized_block(units):
    """The `rows_per_block` of `topk_mask` for rows of `units` scores that
    keeps a block in a CPU core's cache: `CACHE_BLOCK_SCORES // units`
    rows, at least one.

    The bisection reads every score of its rows about 20 times. Under
    XLA on a CPU each read of 256 x 4096 scores (4 MiB of keys, more than
    a core's L2 cache) took about 0.3 ms here; a block of 32768 scores
    stays in the cache. The mask took 1.6x less time on JAX and 1.4x
    less on TensorFlow at 256 x 1024, 1.4x and 1.3x at 32 x 4096
    (`benchmarks/results/selection/`, the bisection with ties checked
    first, with and without blocks). Blocks of 65536 scores were slower
    than no blocks.
    """
    return max(1, CACHE_BLOCK_SCORES // max(1, units))


def topk_mask(
    scores, k, method="top_k", check_ties_first=False, rows_per_block=None
):
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

    >>> from keras_midl.ops import topk_mask
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
        check_ties_first: If `True`, the pass that breaks ties (a
            cumulative sum over the rows) runs only when some row of the
            batch has more than `k` scores at or above its k-th largest
            (`ops.cond`). The mask is the same; it is faster when ties
            are rare, as for trained float logits. It is a data-dependent
            branch, which tracing exporters (`torch.jit.trace`, ONNX from
            torch) would freeze to the branch seen while tracing: `MIDL`
            uses it except while torch traces.
        rows_per_block: `None` (default), or a positive int: the rows
            are selected in blocks of this many rows, one block after
            another (`ops.fori_loop`; the last block is padded). The mask
            is the same. Under XLA on a CPU, a block that fits a core's
            cache made the bisection 1.3-1.6x faster here
            (`cache_sized_block`); run op by op, blocks only add
            launches.

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
    if rows_per_block is not None:
        if not is_integer(rows_per_block) or rows_per_block < 1:
            raise ValueError(
                "Received an invalid value for `rows_per_block`, expected "
                "`None` or a positive integer. Received: "
                f"rows_per_block={rows_per_block!r}"
            )
        return _topk_mask_in_blocks(
            scores, k, method, check_ties_first, int(rows_per_block)
        )
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    scores = ops.where(ops.isnan(scores), -math.inf, scores)
    # XLA on CPU flushes subnormals to zero and other runtimes do not: flush
    # them here so that every backend sees the same ties.
    scores = ops.where(ops.abs(scores) < FLOAT32_TINY, 0.0, scores)
    if n is not None and k == n:
        return ops.ones_like(scores)
    threshold, count = _kth_largest_and_count(
        scores, k, method, early_exit=True
    )

    def lowest_tied_indices_first():
        above = scores > threshold
        tied = ops.cast(scores == threshold, "int32")
        still_needed = k - ops.sum(
            ops.cast(above, "int32"), axis=-1, keepdims=True
        )
        first_tied = ops.logical_and(
            tied > 0, ops.cumsum(tied, axis=-1) <= still_needed
        )
        return ops.logical_or(above, first_tied)

    if check_ties_first:
        at_least = scores >= threshold
        if count is None:
            count = ops.sum(
                ops.cast(at_least, "int32"), axis=-1, keepdims=True
            )
        # Rows with more than k scores at or above their threshold have
        # ties to break; the cumulative sum that breaks them runs only if
        # a row of the batch needs it.
        mask = ops.cond(
            ops.any(count > k), lowest_tied_indices_first, lambda: at_least
        )
    else:
        mask = lowest_tied_indices_first()
    return ops.cast(mask, "float32")


def _topk_mask_in_blocks(scores, k, method, check_ties_first, block):
    """`topk_mask` of `scores` computed `block` rows at a time. The row
    count may be unknown while tracing (TensorFlow): the padding and the
    number of blocks are then tensors."""
    n = scores.shape[-1]

    def unblocked():
        return topk_mask(
            scores, k, method=method, check_ties_first=check_ties_first
        )

    if n is None:  # rows of unknown length, while tracing
        return unblocked()
    shape = ops.shape(scores)
    rows = ops.reshape(ops.stop_gradient(ops.cast(scores, "float32")), (-1, n))
    count = ops.shape(rows)[0]
    if (isinstance(count, int) and 0 < count <= block) or not (
        isinstance(count, int) or ops.is_tensor(count)
    ):
        # One block, or a symbolic row count (`jax.export`'s shape
        # polymorphism), which slices cannot take: no blocks.
        return unblocked()
    # At least one block, so that the blocks' slices fit in an empty
    # batch too. The padding rows hold `0, 1, ..., n - 1`: no ties, so
    # they cost the bisection no more steps than scores do, and no
    # tie-breaking pass.
    if isinstance(count, int):
        total = -(-max(count, 1) // block) * block
    else:
        total = (ops.maximum(count, 1) + block - 1) // block * block
    filler = ops.broadcast_to(ops.arange(n, dtype="float32"), (block, n))
    padded = ops.concatenate([rows, filler], axis=0)[:total]

    def select_block(index, masks):
        start = [index * block, 0]
        mask = topk_mask(
            ops.slice(padded, start, [block, n]),
            k,
            method=method,
            check_ties_first=check_ties_first,
        )
        return ops.slice_update(masks, start, mask)

    masks = ops.fori_loop(
        0, total // block, select_block, ops.zeros_like(padded)
    )
    return ops.reshape(masks[:count], shape)


def straight_through(hard, soft):
    """Straight-through estimator: the value of `hard`, the gradient of `soft`.

    `hard + (soft - stop_gradient(soft))`: in the forward pass this equals
    `hard` exactly; in the backward pass the gradient flows
    through `soft` as if `hard` had been replaced by it.

    Example:

    >>> from keras_midl.ops import straight_through, topk_mask
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


def straight_through_mix(
    mask, logits, full, light=None, temperature=1.0, return_frequencies=False
):
    """Mixes two paths with a hard mask and a straight-through gradient.

    The value is `where(mask, full, light)`: `full` where the 0/1 `mask`
    is 1, `light` where it is 0 (`light=None` is zero). The gradients are
    those of `g * full + (1 - g) * light` with
    `g = straight_through(mask, sigmoid(logits / temperature))`:

    ```
    d full   = upstream * mask
    d light  = upstream * (1 - mask)
    d logits = (upstream * (full - light) + d_f / rows) * a * (1 - a) / t
    a        = sigmoid(logits / temperature)
    ```

    With `return_frequencies=True` it also returns the selection
    frequencies `f`, the fraction of the rows (all leading axes) whose
    mask selects each unit, with the straight-through gradient of the mean
    probability `mean(a)` over the rows (as `balance_loss` computes them).
    Their gradient `d_f` reaches the logits in the same backward pass, the
    term `d_f / rows` above (zero without them), so a loss on the
    frequencies (`frequency_balance_loss`) adds no pass over the rows:
    its own forward pass is one mean of the mask.

    One custom gradient instead of that chain of elementwise ops: the
    forward pass is a single select and computes no sigmoid, and the
    backward pass a few fused products.

    Example:

    >>> from keras_midl.ops import straight_through_mix
    >>> mask = np.array([[1.0, 0.0]], dtype="float32")
    >>> logits = np.array([[0.5, -0.5]], dtype="float32")
    >>> full = np.array([[3.0, 4.0]], dtype="float32")
    >>> light = np.array([[1.0, 2.0]], dtype="float32")
    >>> out = straight_through_mix(mask, logits, full, light)
    >>> keras.ops.convert_to_numpy(out)
    array([[3., 2.]], dtype=float32)
    >>> _, frequencies = straight_through_mix(
    ...     mask, logits, full, light, return_frequencies=True
    ... )
    >>> keras.ops.convert_to_numpy(frequencies)
    array([1., 0.], dtype=float32)

    Args:
        mask: 0/1 tensor broadcastable to `full` (of its shape with
            `return_frequencies`); it gets no gradient.
        logits: Float tensor of the gate logits, of the shape of `mask`.
        full: Tensor, the value where `mask` is 1.
        light: Tensor of the shape and dtype of `full`, the value where
            `mask` is 0, or `None` for zero.
        temperature: Positive float, the sigmoid's temperature.
        return_frequencies: Whether to return the frequencies too.

    Returns:
        Tensor of the shape and dtype of `full`; with `return_frequencies`,
        `(outputs, frequencies)`, the frequencies of shape `(n,)` in the
        mask's dtype.
    """
    full = ops.convert_to_tensor(full)
    mask = ops.convert_to_tensor(mask)
    logits = ops.convert_to_tensor(logits)
    if light is None:
        light = ops.zeros_like(full)
    if return_frequencies and keras.config.backend() == "torch":
        # Keras's torch `custom_gradient` takes one output: the frequencies
        # as `balance_loss` takes them (the same gradient, more passes;
        # the native kernel fuses them on torch, keras_midl/backend/torch).
        outputs = straight_through_mix(mask, logits, full, light, temperature)
        scaled = logits if temperature == 1.0 else logits / temperature
        return outputs, selection_frequencies(mask, ops.sigmoid(scaled))
    units = mask.shape[-1]

    # Every tensor is an argument, none is closed over: JAX's exporters
    # (shape-polymorphic `jax2tf`) reject closed-over arrays.
    @ops.custom_gradient
    def mix(mask, logits, full, light):
        selected = mask > 0
        # The mask's rows (all leading axes), for the frequencies.
        mask_rows = (
            ops.reshape(mask, (-1, units)) if return_frequencies else None
        )

        def grad(*args, upstream=None):
            if upstream is None:
                # One cotangent per output: TensorFlow passes each, JAX
                # one tuple of them.
                upstream = args[0] if len(args) == 1 else tuple(args)
            d_frequencies = None
            if return_frequencies:
                upstream, d_frequencies = upstream
            d_full = ops.where(selected, upstream, 0.0)
            d_light = ops.where(selected, 0.0, upstream)
            scaled = logits if temperature == 1.0 else logits / temperature
            soft = ops.sigmoid(scaled)
            slope = soft * (1.0 - soft)
            if temperature != 1.0:
                slope = slope / temperature
            d_soft = ops.cast(upstream * (full - light), soft.dtype)
            if d_frequencies is not None:
                rows = ops.shape(mask_rows)[0]
                column = d_frequencies / ops.cast(rows, d_frequencies.dtype)
                d_soft = d_soft + ops.cast(column, soft.dtype)
            return None, d_soft * slope, d_full, d_light

        outputs = ops.where(selected, full, light)
        if return_frequencies:
            frequencies = ops.mean(mask_rows, axis=0)
            return (outputs, frequencies), grad
        return outputs, grad

    return mix(mask, logits, full, light)


def selection_frequencies(mask, probabilities):
    """The fraction of the rows (all leading axes) whose `mask` selects
    each unit, with the straight-through gradient of the mean of
    `probabilities` over the rows (taken after the mean: the same
    gradient, fewer elementwise ops).

    Args:
        mask: 0/1 tensor `(..., n)`.
        probabilities: Tensor of the shape of `mask`, the gate's sigmoid.

    Returns:
        Tensor of shape `(n,)` in the dtype of `probabilities`.
    """
    rows = (-1, mask.shape[-1])
    soft = ops.mean(ops.reshape(probabilities, rows), axis=0)
    hard = ops.mean(ops.reshape(mask, rows), axis=0)
    return straight_through(hard, soft)


def balance_loss(mask, probabilities, k, weight):
    """The load-balancing loss of a top-k gate: `weight * var_j(f_j) /
    (k/n)^2`.

    `f_j` is the fraction of the rows (all leading axes) whose mask selects
    unit `j` of `n`, with the straight-through gradient of the mean
    probability (taken after the mean: the same gradient, fewer elementwise
    ops). It is the squared coefficient of variation of the selection
    frequencies, zero when every unit is selected equally often.

    Example:

    >>> from keras_midl.ops.selection import balance_loss
    >>> mask = np.array([[1.0, 0.0], [1.0, 0.0]], dtype="float32")
    >>> float(balance_loss(mask, 0.5 * np.ones((2, 2), "float32"), 1, 1.0))
    1.0

    Args:
        mask: 0/1 tensor `(..., n)` with `k` ones per row.
        probabilities: Tensor of the shape of `mask`, the gate's sigmoid,
            whose gradient the frequencies take.
        k: Python int, the ones per row.
        weight: Python float, the loss's weight.

    Returns:
        Scalar float32 tensor (as Keras sums the losses).
    """
    frequencies = selection_frequencies(mask, probabilities)
    return frequency_balance_loss(frequencies, k, weight)


def frequency_balance_loss(frequencies, k, weight):
    """`balance_loss` from the selection frequencies `f` (as
    `selection_frequencies` or `straight_through_mix(...,
    return_frequencies=True)` return them): `weight * mean_j((f_j -
    k/n)^2) / (k/n)^2`.

    Example:

    >>> from keras_midl.ops.selection import frequency_balance_loss
    >>> f = np.array([1.0, 0.0], dtype="float32")
    >>> float(frequency_balance_loss(f, 1, 1.0))
    1.0

    Args:
        frequencies: Tensor `(n,)`, the fraction of rows selecting each
            of the `n` units.
        k: Python int, the units selected per row.
        weight: Python float, the loss's weight.

    Returns:
        Scalar float32 tensor (as Keras sums the losses).
    """
    share = k / frequencies.shape[-1]
    variance = ops.mean(ops.square(frequencies - share))
    loss = weight * variance / (share * share)
    return ops.cast(loss, "float32")
