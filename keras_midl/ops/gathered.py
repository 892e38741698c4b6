"""The gathered inference path in `keras.ops`: the full path of the `k`
selected neurons only.

The masked path computes `x W` for all `n` neurons and then masks it, so
it saves no time. The gathered path computes, for each input row, the
full path of its `k` selected neurons only, by gathering those `k` rows
of the kernel (stored as `W^T`, `(units, input_dim)`, so that each neuron
is one contiguous row), and scatters the `k` results into the light path:

```
z = x V;  s = z G + c;  m = topk_mask(s, k);  h_lite = z U + b_lite
J = the k indices with m = 1 (increasing)
y[J] = x . W^T[J] + b[J];  y[not J] = h_lite[not J]      (before activation)
```

which equals the masked path's `m * h_full + (1 - m) * h_lite` up to float
rounding. Written with `keras.ops` only, it runs on every backend and
inside any trace, and it exports (SavedModel, ONNX): the indices come from
the mask by a cumulative sum and a scatter, without `ops.top_k`. The
native C kernel (`keras_midl.native`) computes the same where it may run
(`keras_midl.ops.dispatch`).

Example:

>>> layer = keras_midl.MIDL(8, k_ratio=0.5)
>>> x = np.random.rand(2, 6).astype("float32")
>>> masked = layer(x, training=False)
>>> weights = keras_midl.ops.dispatch.layer_weights(layer)
>>> gathered = keras_midl.ops.gathered.gathered_outputs(x, weights, layer.k)
>>> to_numpy = keras.ops.convert_to_numpy
>>> bool(np.allclose(to_numpy(gathered), to_numpy(masked), atol=1e-5))
True
"""

from keras import ops

from keras_midl import backend as backends
from keras_midl.ops.selection import topk_mask

# Rows of `W^T` gathered per step by the chunked formulation: 256 rows of
# 4096 float32 are 4 MiB, read from cache by the dot products that follow.
CHUNK_ROWS = 256


def selected_indices(mask, k):
    """Indices of the `k` ones of each row of a 0/1 mask, without `top_k`.

    A neuron's slot is the running count of ones up to it (a cumulative
    sum); each selected neuron writes its index into its slot, the others
    into a spare slot `k` that is dropped.

    Example:

    >>> indices = keras_midl.ops.gathered.selected_indices(
    ...     np.array([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]), 2)
    >>> keras.ops.convert_to_numpy(indices)
    array([[1, 2],
           [0, 3]], dtype=int32)

    Args:
        mask: Tensor `(rows, n)` of 0s and 1s, exactly `k` ones per row.
        k: Python int.

    Returns:
        int32 tensor `(rows, k)`, increasing along each row.
    """
    mask = ops.convert_to_tensor(mask)
    ones = ops.cast(ops.greater(mask, 0.5), "int32")
    slots = ops.where(ones > 0, ops.cumsum(ones, axis=-1) - 1, k)
    shape = ops.shape(ones)
    positions = ops.broadcast_to(ops.arange(shape[1], dtype="int32"), shape)
    row_ids = ops.broadcast_to(
        ops.arange(shape[0], dtype="int32")[:, None], shape
    )
    pairs = ops.reshape(ops.stack([row_ids, slots], axis=-1), (-1, 2))
    table = ops.scatter_update(
        ops.zeros((shape[0], k + 1), "int32"),
        pairs,
        ops.reshape(positions, (-1,)),
    )
    return table[:, :k]


def _dot_selected(rows, weights):
    """`values[b, j] = weights[b, j] . rows[b]` as a (batched) matrix-vector
    product, which the CPU backends run faster than an `einsum` (that one
    transposes the gathered weights first). One row, static: a plain
    matrix-vector product (TensorFlow's batched matmul is slower)."""
    if rows.shape[0] == 1:
        return ops.transpose(ops.matmul(weights[0], ops.transpose(rows)))
    return ops.squeeze(ops.matmul(weights, ops.expand_dims(rows, -1)), -1)


def gathered_full_path(
    rows,
    kernel,
    selected,
    compute_dtype="float32",
    chunk=None,
    kernel_scale=None,
    rows_scale=None,
    bias=None,
):
    """`rows . kernel[selected]` for each row: the `k` selected dot products.

    `values[i, j] = sum_d rows[i, d] * kernel[selected[i, j], d]`, divided
    by `kernel_scale[selected[i, j]] * rows_scale[i]` when given
    (dequantization), plus `bias[selected[i, j]]`.

    Args:
        rows: Tensor `(rows, d)` in `compute_dtype`.
        kernel: Tensor `(units, d)`, float or int8 (cast after the gather).
        selected: int32 tensor `(rows, k)`.
        compute_dtype: dtype of the dot products.
        chunk: `None` gathers all `rows * k * d` weights at once; an int
            gathers `chunk` rows of `kernel` per step (`ops.map`), so that
            each chunk is read from cache by its dot products.
        kernel_scale: Optional `(units,)` per-neuron scale.
        rows_scale: Optional `(rows, 1)` per-row scale of `rows`.
        bias: Optional `(units,)`.

    Returns:
        Tensor `(rows, k)`.
    """
    k = selected.shape[-1]
    # Read values, not variables: TensorFlow gathers from a variable with
    # `ResourceGather`, which switches the variable to copy-on-read for
    # good, and every later read of it (the native kernel's included)
    # then copies the whole kernel (8 ms for 4096 x 4096 here).
    read = backends.current().read_value
    kernel = read(kernel)
    kernel_scale = None if kernel_scale is None else read(kernel_scale)
    bias = None if bias is None else read(bias)
    if chunk is None or chunk >= k:
        weights = ops.cast(ops.take(kernel, selected, axis=0), compute_dtype)
        values = _dot_selected(rows, weights)
    else:
        pad = (-k) % chunk
        count = (k + pad) // chunk
        # Padding indices are 0 (a valid row); their values are dropped.
        padded = ops.pad(selected, [[0, 0], [0, pad]])
        chunks = ops.transpose(
            ops.reshape(padded, (-1, count, chunk)), (1, 0, 2)
        )

        def one_chunk(indices):
            weights = ops.take(kernel, indices, axis=0)  # (rows, chunk, d)
            return _dot_selected(rows, ops.cast(weights, compute_dtype))

        values = ops.map(one_chunk, chunks)  # (count, rows, chunk)
        values = ops.reshape(
            ops.transpose(values, (1, 0, 2)), (-1, count * chunk)
        )[:, :k]
    if kernel_scale is not None:
        scale = ops.take(kernel_scale, selected)
        if rows_scale is not None:
            scale = scale * ops.cast(rows_scale, scale.dtype)
        values = ops.divide(values, ops.cast(scale, compute_dtype))
    if bias is not None:
        values = values + ops.cast(ops.take(bias, selected), compute_dtype)
    return values


def selected_lora_update(
    rows, selected, lora_kernel_a, lora_kernel_b, scale, compute_dtype="float32"
):
    """The LoRA update of the selected neurons: `scale * (rows A) B[:, j]`.

    `values[i, j] = scale * sum_r (rows A)[i, r] * B[r, selected[i, j]]`,
    that is `rows[i] . (scale * A B)[:, selected[i, j]]` without forming
    `A B`: `rows * (d * r + k * r)` multiply-adds.

    Args:
        rows: Tensor `(rows, d)` in `compute_dtype`.
        selected: int32 tensor `(rows, k)`.
        lora_kernel_a: Tensor `(d, r)`.
        lora_kernel_b: Tensor `(r, units)`.
        scale: Python float, `lora_alpha / lora_rank`.
        compute_dtype: dtype of the update.

    Returns:
        Tensor `(rows, k)`.
    """
    read = backends.current().read_value
    code = ops.matmul(rows, ops.cast(read(lora_kernel_a), compute_dtype))
    columns = ops.transpose(ops.cast(read(lora_kernel_b), compute_dtype))
    update = _dot_selected(code, ops.take(columns, selected, axis=0))
    return ops.multiply(update, ops.cast(scale, compute_dtype))


def gathered_outputs(
    inputs,
    weights,
    k,
    selection="top_k",
    compute_dtype="float32",
    gate_dtype="float32",
    inputs_quantizer=None,
    chunk=None,
    lora=None,
):
    """The MIDL inference forward, full path of the selected neurons only.

    Returns the output before the activation.

    Args:
        inputs: Tensor `(..., input_dim)`, any numeric or bool dtype (cast
            to `compute_dtype`).
        weights: Dict over `keras_midl.ops.dispatch.WEIGHT_NAMES` (see
            `layer_weights` there).
        k: Python int, neurons selected per row.
        selection: `"top_k"` or `"bisection"` (`topk_mask`'s `method`).
        compute_dtype: dtype of the paths.
        gate_dtype: dtype of the gate logits (the layer's `gate_dtype`).
        inputs_quantizer: Optional callable `(x, axis) -> (q, scale)`
            applied to the full path's inputs (int8 layers).
        chunk: See `gathered_full_path`.
        lora: Optional `(lora_kernel_a, lora_kernel_b, scale)` of a layer
            with LoRA (`MIDL.enable_lora`): the full path is that of `W +
            scale * A B`, the update computed for the selected neurons
            only (`selected_lora_update`), from the float inputs.

    Returns:
        Tensor `(..., units)` in `compute_dtype`.
    """
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    inputs = ops.cast(inputs, compute_dtype)
    leading_shape = ops.shape(inputs)[:-1]
    rows = ops.reshape(inputs, (-1, input_dim))
    # As `MIDL._gate_outputs`: the code feeding the gate is computed in
    # `gate_dtype` and rounded to `compute_dtype` only for the light path,
    # so the mask is the one `MIDL.gate()` reports.
    gate_code = ops.matmul(
        ops.cast(rows, gate_dtype),
        ops.cast(weights["projection"], gate_dtype),
    )
    logits = ops.add(
        ops.matmul(gate_code, ops.cast(weights["gate_kernel"], gate_dtype)),
        ops.cast(weights["gate_bias"], gate_dtype),
    )
    code = ops.cast(gate_code, compute_dtype)
    mask = topk_mask(logits, k, method=selection)
    selected = selected_indices(mask, k)
    full_rows, rows_scale = rows, None
    if inputs_quantizer is not None:
        full_rows, rows_scale = inputs_quantizer(rows, axis=-1)
        full_rows = ops.cast(full_rows, compute_dtype)
    values = gathered_full_path(
        full_rows,
        kernel,
        selected,
        compute_dtype=compute_dtype,
        chunk=chunk,
        kernel_scale=weights.get("kernel_scale"),
        rows_scale=rows_scale,
        bias=weights.get("bias"),
    )
    if lora is not None:
        values = values + selected_lora_update(
            rows, selected, *lora, compute_dtype=compute_dtype
        )
    if weights.get("light_kernel") is None:
        base = ops.zeros(ops.shape(mask), compute_dtype)
    else:
        base = ops.matmul(code, ops.cast(weights["light_kernel"], code.dtype))
        if weights.get("light_bias") is not None:
            base = ops.add(base, ops.cast(weights["light_bias"], code.dtype))
    shape = ops.shape(selected)
    row_ids = ops.broadcast_to(
        ops.arange(shape[0], dtype="int32")[:, None], shape
    )
    pairs = ops.reshape(ops.stack([row_ids, selected], axis=-1), (-1, 2))
    outputs = ops.scatter_update(base, pairs, ops.reshape(values, (-1,)))
    return ops.reshape(outputs, (*leading_shape, units))
