"""The NumPy entry points of the native kernels (`select_gather.c`).

`select_gather` takes the gate logits, selects the `k` neurons
`keras_midl.ops.topk_mask` selects, and writes their full-path dot
products, read from the selected rows of the kernel in place, over the
light path. `sparse_forward` computes the gate and the light path too:
a MIDL layer's whole inference forward before its activation, with a
float or an int8 kernel. Both share the dot products among `threads`
threads (default: `available_cpus()`), with the same outputs, bit for
bit, on any count. Where the library is not available (no
compiler, native kernels off) both compute the same in NumPy. The
`*_pointers` functions are the same calls on raw
addresses, for the backends that hold their own buffers.
"""

import os

import numpy as np

from keras_midl.native import build

# `midl_sparse_forward`'s weight arguments, in order, then the int8
# kernel's scales; the first two and `kernel` are required, the others
# may be `None` (`kernel_scale` is required with an int8 kernel).
FORWARD_WEIGHTS = (
    "projection",
    "gate_kernel",
    "gate_bias",
    "light_kernel",
    "light_bias",
    "kernel",
    "bias",
    "kernel_scale",
)
REQUIRED_WEIGHTS = ("projection", "gate_kernel", "kernel")


def available_cpus():
    """The CPUs this process may run on: its affinity where the platform
    reports one (`taskset`, a container's CPU set), else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _threads(threads):
    """`threads`, or `available_cpus()` for `None`.

    Raises:
        ValueError: If `threads` is not `None` or a positive int.
    """
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(
        threads, (int, np.integer)
    ) or threads < 1:
        raise ValueError(
            f"`threads` must be a positive int or None; received "
            f"threads={threads!r}"
        )
    return int(threads)


def _selection_scratch(units):
    """The scratch of the C selection of one row of `units` scores
    (`select_gather.c`: the cleaned scores and their `2 * units` keys),
    for `midl_select_gather`, `midl_topk_mask` and `midl_select_mix`."""
    return np.empty(3 * units, np.float32)


def select_gather_pointers(
    logits, units, kernel, dim, rows, count, k, bias, outputs, selected,
    threads=None,
):
    """`midl_select_gather` on raw addresses (ints; `bias` may be 0).

    The caller guarantees C-contiguous float32 `logits (count, units)`,
    `kernel (units, dim)`, `rows (count, dim)`, `bias (units,)`,
    `outputs (count, units)` (the light path, overwritten at the selected
    neurons) and int64 `selected (count, k)`, `1 <= k <= units`, all
    alive until the call returns. At most `threads` threads (default
    `available_cpus()`) compute the dot products; the outputs are the
    same for any count. Returns the threads that ran (fewer where each
    would read less than 1 MiB of the kernel).
    """
    scratch = _selection_scratch(units)
    return build.library().midl_select_gather(
        logits,
        units,
        kernel,
        dim,
        rows,
        count,
        k,
        bias or None,
        outputs,
        selected,
        scratch.ctypes.data,
        _threads(threads),
    )


def sparse_forward_pointers(
    rows, count, dim, weights, rank, units, k, outputs, selected,
    quantize_inputs=True, threads=None,
):
    """`midl_sparse_forward` (or `midl_sparse_forward_int8`) on raw
    addresses.

    `weights` maps the names of `FORWARD_WEIGHTS` to addresses (0 or
    missing: none; `REQUIRED_WEIGHTS` must be non-zero). With a non-zero
    `kernel_scale`, `kernel` is int8 `(units, dim)` and the full path is
    `x . q[j] / kernel_scale[j]`, `x` quantized per row as Keras's
    `AbsMaxQuantizer` does when `quantize_inputs`. The caller guarantees
    C-contiguous float32 arrays (int8 for such a kernel) of the documented
    shapes, alive until the call returns, int64 `selected (count, k)`,
    `1 <= k <= units`. At most `threads` threads (default
    `available_cpus()`) compute the selected neurons' full path; the
    outputs are the same for any count. Returns the threads that ran
    (fewer where each would read less than 1 MiB of the kernel).
    """
    for name in REQUIRED_WEIGHTS:
        if not weights.get(name):
            raise ValueError(f"`{name}` is required; received none")
    scratch = np.empty(rank + 4 * units, np.float32)
    library = build.loaded_library() or build.library()
    gate = (
        rows,
        count,
        dim,
        weights["projection"],
        rank,
        weights["gate_kernel"],
        weights.get("gate_bias") or None,
        weights.get("light_kernel") or None,
        weights.get("light_bias") or None,
    )
    if weights.get("kernel_scale"):
        return library.midl_sparse_forward_int8(
            *gate,
            weights["kernel"],
            weights["kernel_scale"],
            weights.get("bias") or None,
            units,
            k,
            1 if quantize_inputs else 0,
            outputs,
            selected,
            scratch.ctypes.data,
            _threads(threads),
        )
    return library.midl_sparse_forward(
        *gate,
        weights["kernel"],
        weights.get("bias") or None,
        units,
        k,
        outputs,
        selected,
        scratch.ctypes.data,
        _threads(threads),
    )


def topk_mask_pointers(scores, count, units, k, mask, threads=None):
    """`midl_topk_mask` on raw addresses: `keras_midl.ops.topk_mask` of
    the C-contiguous float32 `scores (count, units)` into the float32
    `mask (count, units)`, `1 <= k <= units`, on up to `threads` threads
    (default: `available_cpus()`; the mask is the same for any count).
    Returns the threads that ran."""
    scratch = _selection_scratch(units)
    return build.loaded_library().midl_topk_mask(
        scores, count, units, k, mask, scratch.ctypes.data,
        _threads(threads),
    )


def mix_pointers(
    mask, full, light, size, outputs, bias=0, light_bias=0, units=None
):
    """`midl_mix` on raw addresses (`light`, `bias`, `light_bias` 0 where
    absent): `where(mask > 0, full + bias, light + light_bias)` over
    `size` float32 elements in rows of `units` (default `size`: one
    row), the biases `units` floats each."""
    units = size if units is None else units
    scratch = _mix_scratch(units)  # referenced until the call returns
    build.loaded_library().midl_mix(
        mask,
        full,
        light or None,
        bias or None,
        light_bias or None,
        size,
        units,
        outputs,
        scratch.ctypes.data,
    )


def _mix_scratch(units):
    """The scratch of `midl_mix` and `midl_mix_backward`: the missing
    biases and column, `units` floats each."""
    return np.empty(3 * max(units, 1), np.float32)


def select_mix_pointers(
    logits, count, units, k, full, bias, light, light_bias, threads=None
):
    """`midl_select_mix` on raw addresses (`bias`, `light`, `light_bias`
    0 where absent): over the C-contiguous float32 `full (count, units)`,
    `full + bias` at the `k` neurons `keras_midl.ops.topk_mask` selects
    from `logits (count, units)`, `light + light_bias` (0 without `light`)
    at the others, `1 <= k <= units`, on up to `threads` threads (as
    `topk_mask_pointers`). Returns the threads that ran."""
    scratch = _selection_scratch(units)
    return build.loaded_library().midl_select_mix(
        logits,
        count,
        units,
        k,
        full,
        bias or None,
        light or None,
        light_bias or None,
        scratch.ctypes.data,
        _threads(threads),
    )


def mix_backward_pointers(
    upstream, mask, soft, full, light, size, temperature, d_full, d_light,
    d_logits, column=0, units=None, bias=0, light_bias=0, d_bias=0,
    d_light_bias=0,
):
    """`midl_mix_backward` on raw addresses (`light`, `d_light`,
    `light_bias`, `d_light_bias` 0 for a zero light path; any bias, its
    gradient and `column` 0 where absent or not wanted): the gradients of
    `straight_through_mix` of `full + bias` and `light + light_bias` from
    `soft = sigmoid(logits / temperature)`, over `size` float32 elements
    in rows of `units` (default `size`: one row); `column`, `units`
    float32 added to each row before the slope (the gradient of the
    selection frequencies over the rows, see `straight_through_mix`);
    `d_bias`, `d_light_bias`, `units` float32 each, the sums over the
    rows of `d_full` and `d_light`."""
    units = size if units is None else units
    scratch = _mix_scratch(units)  # referenced until the call returns
    build.loaded_library().midl_mix_backward(
        upstream,
        mask,
        soft,
        full,
        light or None,
        bias or None,
        light_bias or None,
        size,
        temperature,
        column or None,
        units,
        d_full,
        d_light or None,
        d_logits,
        d_bias or None,
        d_light_bias or None,
        scratch.ctypes.data,
    )


def topk_mask(scores, k, threads=None):
    """`keras_midl.ops.topk_mask(scores, k)` in C, on a float32 NumPy
    array of any rank >= 1 (the same mask, bit for bit; the library must
    be loaded, `build.library()`), rows shared among up to `threads`
    threads (default: `available_cpus()`; the same mask on any count)."""
    threads = _threads(threads)
    scores = np.ascontiguousarray(scores, np.float32)
    units = scores.shape[-1]
    _check_k(k, units)
    mask = np.empty(scores.shape, np.float32)
    if mask.size:
        topk_mask_pointers(
            scores.ctypes.data, mask.size // units, units, k,
            mask.ctypes.data, threads=threads,
        )
    return mask


def _address(array):
    return 0 if array is None else array.ctypes.data


def _float32_arrays(*arrays):
    return [
        None if a is None else np.ascontiguousarray(a, np.float32)
        for a in arrays
    ]


def mix(mask, full, light=None, bias=None, light_bias=None):
    """The value of `straight_through_mix` of `full + bias` and `light +
    light_bias` in C: float32 NumPy arrays of one shape (`light=None`:
    zero), the biases of its last axis's length (`None`: none)."""
    mask, full, light, bias, light_bias = _float32_arrays(
        mask, full, light, bias, light_bias
    )
    units = _units(full, bias=bias, light_bias=light_bias)
    outputs = np.empty(full.shape, np.float32)
    if outputs.size:
        mix_pointers(
            mask.ctypes.data, full.ctypes.data, _address(light), full.size,
            outputs.ctypes.data, bias=_address(bias),
            light_bias=_address(light_bias), units=units,
        )
    return outputs


def mix_backward(
    upstream, mask, soft, full, light=None, temperature=1.0, column=None,
    bias=None, light_bias=None,
):
    """The gradients of `straight_through_mix` of `full + bias` and
    `light + light_bias` in C: `(d_full, d_light, d_logits, d_bias,
    d_light_bias)` (`d_light`, `d_light_bias` `None` where `light` is,
    `d_bias` where `bias` is), float32 NumPy arrays of one shape, the
    biases' gradients of its last axis's length; `soft =
    sigmoid(logits / temperature)`; `column`, of the last axis's length
    (or `None`), is added to each row's `upstream * (full - light)` before
    the slope."""
    upstream, mask, soft, full, light, column, bias, light_bias = (
        _float32_arrays(
            upstream, mask, soft, full, light, column, bias, light_bias
        )
    )
    units = _units(
        full, column=column, bias=bias, light_bias=light_bias
    )
    d_full, d_logits = np.empty_like(full), np.empty_like(full)
    d_light = None if light is None else np.empty_like(full)
    # Zeros: the sums of no rows where `full` is empty.
    d_bias = None if bias is None else np.zeros(units, np.float32)
    d_light_bias = None
    if light is not None and light_bias is not None:
        d_light_bias = np.zeros(units, np.float32)
    if full.size:
        mix_backward_pointers(
            upstream.ctypes.data, mask.ctypes.data, soft.ctypes.data,
            full.ctypes.data, _address(light), full.size, temperature,
            d_full.ctypes.data, _address(d_light), d_logits.ctypes.data,
            column=_address(column), units=units, bias=_address(bias),
            light_bias=_address(light_bias), d_bias=_address(d_bias),
            d_light_bias=_address(d_light_bias),
        )
    return d_full, d_light, d_logits, d_bias, d_light_bias


def _units(full, **vectors):
    """The length of `full`'s last axis (1 for a scalar), which each of
    `vectors` (`None` or an array, by argument name) must have."""
    units = full.shape[-1] if full.ndim else 1
    for name, vector in vectors.items():
        if vector is not None:
            _check_shape(name, vector, (units,))
    return units


def _check_shape(name, array, shape):
    if array.shape != shape:
        raise ValueError(
            f"`{name}` must have shape {shape}; received {array.shape}"
        )


def _check_k(k, units):
    if not 1 <= k <= units:
        raise ValueError(f"`k` must be in [1, {units}]; received k={k}")


def select_gather(logits, kernel, rows, k, light, bias=None, threads=None):
    """The selection and the selected neurons' full path, in C.

    Example:

    >>> logits = np.array([[0.5, 2.0, -1.0, 2.0]], "float32")
    >>> kernel = np.arange(12, dtype="float32").reshape(4, 3)
    >>> rows = np.ones((1, 3), "float32")
    >>> light = np.zeros((1, 4), "float32")
    >>> outputs, selected = keras_midl.native.select_gather(
    ...     logits, kernel, rows, 2, light)
    >>> outputs.tolist(), selected.tolist()
    ([[0.0, 12.0, 0.0, 30.0]], [[1, 3]])

    Args:
        logits: Array `(count, units)`, the gate logits.
        kernel: Array `(units, dim)`.
        rows: Array `(count, dim)`.
        k: Int in `[1, units]`, neurons selected per row.
        light: Array `(count, units)`, the light path.
        bias: Optional array `(units,)`.
        threads: Optional int, the most threads that compute the dot
            products (default: `available_cpus()`); the outputs are the
            same for any count.

    Returns:
        `(outputs, selected)`: float32 `(count, units)`, the light path
        with the selected neurons' full path, and int64 `(count, k)`,
        their indices, increasing.
    """
    threads = _threads(threads)
    logits = np.ascontiguousarray(logits, np.float32)
    kernel = np.ascontiguousarray(kernel, np.float32)
    rows = np.ascontiguousarray(rows, np.float32)
    if logits.ndim != 2 or kernel.ndim != 2:
        raise ValueError(
            "`logits` and `kernel` must be 2-D; received shapes "
            f"{logits.shape} and {kernel.shape}"
        )
    count, units = logits.shape
    dim = kernel.shape[1]
    if kernel.shape[0] != units or rows.shape != (count, dim):
        raise ValueError(
            f"Expected `kernel` of shape ({units}, d) and `rows` of shape "
            f"({count}, d); received {kernel.shape} and {rows.shape}"
        )
    _check_k(k, units)
    outputs = np.array(light, np.float32, order="C", copy=True)
    _check_shape("light", outputs, (count, units))
    if bias is not None:
        bias = np.ascontiguousarray(bias, np.float32)
        _check_shape("bias", bias, (units,))
    if count == 0:
        return outputs, np.empty((0, k), np.int64)
    if build.library() is None:
        return _select_gather_numpy(logits, kernel, rows, k, outputs, bias)
    selected = np.empty((count, k), np.int64)
    select_gather_pointers(
        logits.ctypes.data,
        units,
        kernel.ctypes.data,
        dim,
        rows.ctypes.data,
        count,
        k,
        0 if bias is None else bias.ctypes.data,
        outputs.ctypes.data,
        selected.ctypes.data,
        threads=threads,
    )
    return outputs, selected


def _select_numpy(logits, k):
    """The `k` indices per row `topk_mask` selects (increasing), in NumPy."""
    clean = np.where(np.isnan(logits), -np.inf, logits)
    clean = np.where(np.abs(clean) < np.finfo(np.float32).tiny, 0, clean)
    # Stable sort of the negated logits: ties to the lowest index.
    order = np.argsort(-clean, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1).astype(np.int64)


def _select_gather_numpy(logits, kernel, rows, k, outputs, bias):
    """`select_gather` in NumPy, where the library is not available."""
    selected = _select_numpy(logits, k)
    values = np.einsum("bd,bkd->bk", rows, kernel[selected])
    if bias is not None:
        values = values + bias[selected]
    np.put_along_axis(outputs, selected, values, axis=1)
    return outputs, selected


def sparse_forward(rows, weights, k, quantize_inputs=True, threads=None):
    """A MIDL layer's inference forward (before the activation), in C.

    `z = x V`, logits `z G + c`, light path `z U + b_lite`; the `k`
    neurons `topk_mask` selects from the logits get `x . W^T[j] + b[j]`.
    The gate's sums run in C's order: where two logits are within float
    rounding of each other at the threshold, the selection can differ
    from that of a gate computed by BLAS.

    With an int8 `kernel` (`model.quantize("int8")`) and its per-neuron
    `kernel_scale`, the selected neurons get `x . q[j] / kernel_scale[j] +
    b[j]`, reading a quarter of the bytes. With `quantize_inputs`, `x` is
    first quantized per row as Keras's `AbsMaxQuantizer` does (`xq =
    clip(round(x * s), -127, 127)`, `s = 127 / (max|x| + 1e-7)`) and the
    dot products are exact int32 sums divided by `kernel_scale[j] * s`:
    Keras's int8 `Dense` arithmetic. Otherwise `x` stays float.

    Example:

    >>> rows = np.array([[1.0, -2.0]], "float32")
    >>> weights = {"projection": np.ones((2, 1), "float32"),
    ...            "gate_kernel": np.array([[1.0, 0.0, 2.0]], "float32"),
    ...            "kernel": np.array([[127, 0], [0, 127], [64, -127]],
    ...                               "int8"),
    ...            "kernel_scale": np.full(3, 127.0, "float32")}
    >>> outputs, selected = keras_midl.native.sparse_forward(rows, weights, 1)
    >>> selected.tolist()    # logits -1, 0, -2: neuron 1
    [[1]]
    >>> outputs.round(4).tolist()   # -2 * 127 / 127
    [[0.0, -2.0, 0.0]]

    Args:
        rows: Array `(count, dim)`.
        weights: Dict of arrays over `FORWARD_WEIGHTS` (MIDL's names:
            `kernel` is `(units, dim)`); `projection`, `gate_kernel` and
            `kernel` are required (and `kernel_scale` with an int8
            kernel), the others may be `None` or missing.
        k: Int in `[1, units]`.
        quantize_inputs: int8 kernel only: whether to quantize the rows as
            Keras's default input quantizer does.
        threads: Optional int, the most threads that compute the selected
            neurons' full path (default: `available_cpus()`); the outputs
            are the same for any count.

    Returns:
        `(outputs, selected)`: float32 `(count, units)` and int64
        `(count, k)` (increasing).
    """
    threads = _threads(threads)
    missing = [n for n in REQUIRED_WEIGHTS if weights.get(n) is None]
    if missing:
        raise ValueError(
            f"`weights` must hold {REQUIRED_WEIGHTS}; missing or None: "
            f"{missing}"
        )
    int8 = np.asarray(weights["kernel"]).dtype == np.int8
    if int8 and weights.get("kernel_scale") is None:
        raise ValueError(
            "An int8 `kernel` needs its `kernel_scale`; received none"
        )
    if not int8 and weights.get("kernel_scale") is not None:
        raise ValueError(
            "`kernel_scale` is for an int8 `kernel`; received a kernel of "
            f"dtype {np.asarray(weights['kernel']).dtype}"
        )
    rows = np.ascontiguousarray(rows, np.float32)
    arrays = {
        name: None
        if weights.get(name) is None
        else np.ascontiguousarray(
            weights[name], np.int8 if name == "kernel" and int8 else np.float32
        )
        for name in FORWARD_WEIGHTS
    }
    if arrays["kernel"].ndim != 2 or arrays["projection"].ndim != 2:
        raise ValueError(
            "`kernel` and `projection` must be 2-D; received shapes "
            f"{arrays['kernel'].shape} and {arrays['projection'].shape}"
        )
    units, dim = arrays["kernel"].shape
    rank = arrays["projection"].shape[1]
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(
            f"`rows` must have shape (count, {dim}); received {rows.shape}"
        )
    shapes = {
        "projection": (dim, rank),
        "gate_kernel": (rank, units),
        "gate_bias": (units,),
        "light_kernel": (rank, units),
        "light_bias": (units,),
        "bias": (units,),
        "kernel_scale": (units,),
    }
    for name, shape in shapes.items():
        if arrays[name] is not None:
            _check_shape(name, arrays[name], shape)
    _check_k(k, units)
    if rows.shape[0] == 0:
        return np.empty((0, units), np.float32), np.empty((0, k), np.int64)
    if build.library() is None:
        return _sparse_forward_numpy(rows, arrays, k, quantize_inputs)
    return sparse_forward_arrays(rows, arrays, k, quantize_inputs, threads)


def sparse_forward_arrays(
    rows, arrays, k, quantize_inputs=True, threads=None
):
    """`sparse_forward` without its checks, for the backends' calls on a
    built layer's own weights (the checks cost a tenth of the kernel's
    time at batch 1).

    The caller guarantees what `sparse_forward` checks: C-contiguous
    float32 `rows (count, dim)`, `count >= 1`, `arrays` over
    `FORWARD_WEIGHTS` of the documented dtypes and shapes (each array
    C-contiguous, `None` where absent), `1 <= k <= units`, and a loaded
    library (`build.library()`).

    Returns:
        `(outputs, selected)` as `sparse_forward`.
    """
    kernel = arrays["kernel"]
    units, dim = kernel.shape
    count = rows.shape[0]
    outputs = np.empty((count, units), np.float32)
    selected = np.empty((count, k), np.int64)
    addresses = {
        name: 0 if array is None else array.ctypes.data
        for name, array in arrays.items()
    }
    sparse_forward_pointers(
        rows.ctypes.data,
        count,
        dim,
        addresses,
        arrays["projection"].shape[1],
        units,
        k,
        outputs.ctypes.data,
        selected.ctypes.data,
        quantize_inputs=quantize_inputs,
        threads=threads,
    )
    return outputs, selected


def quantize_rows(rows):
    """Keras's `AbsMaxQuantizer` per row, in NumPy: `(int8 rows, scales)`
    with `scales` of shape `(count, 1)`."""
    peak = np.max(np.abs(rows), axis=-1, keepdims=True)
    scale = np.float32(127.0) / (peak + np.float32(1e-7))
    quantized = np.clip(np.round(rows * scale), -127, 127).astype(np.int8)
    return quantized, scale.astype(np.float32)


def _sparse_forward_numpy(rows, arrays, k, quantize_inputs=True):
    code = rows @ arrays["projection"]
    logits = code @ arrays["gate_kernel"]
    if arrays["gate_bias"] is not None:
        logits = logits + arrays["gate_bias"]
    light = np.zeros(logits.shape, np.float32)
    if arrays["light_kernel"] is not None:
        light = code @ arrays["light_kernel"]
        if arrays["light_bias"] is not None:
            light = light + arrays["light_bias"]
    if arrays["kernel_scale"] is None:
        return _select_gather_numpy(
            logits, arrays["kernel"], rows, k, light, arrays["bias"]
        )
    # int8: the selection, then the selected rows' dequantized products.
    selected = _select_numpy(logits, k)
    outputs = light
    kernel = arrays["kernel"][selected].astype(np.int32)
    if quantize_inputs:
        quantized, row_scale = quantize_rows(rows)
        sums = np.einsum("bd,bkd->bk", quantized.astype(np.int32), kernel)
        values = sums.astype(np.float32) / (
            arrays["kernel_scale"][selected] * row_scale
        )
    else:
        values = np.einsum("bd,bkd->bk", rows, kernel.astype(np.float32))
        values = values / arrays["kernel_scale"][selected]
    if arrays["bias"] is not None:
        values = values + arrays["bias"][selected]
    np.put_along_axis(outputs, selected, values.astype(np.float32), axis=1)
    return outputs, selected
