"""Sparse inference for MIDL: the full path of the `k` selected neurons only.

The masked path computes `x W` for all `n` neurons and then masks it, so it
saves no time. The functions here compute, for each input row, the full path
of its `k` selected neurons only, by gathering those `k` rows of the kernel
(stored as `W^T`, `(units, input_dim)`, so each neuron is one contiguous
row), and scatter the `k` results into the light path:

```
z = x V;  s = float32(z) G + c;  m = topk_mask(s, k);  h_lite = z U + b_lite
J = the k indices with m = 1 (increasing)
y[J] = x . W^T[J] + b[J];  y[not J] = h_lite[not J]      (before activation)
```

which equals the masked path's `m * h_full + (1 - m) * h_lite` up to float
rounding. `MIDL(inference_path="gathered")` (or `"auto"`, see
`keras_midl.midl.use_gathered_path`) calls `sparse_inference`.

Per backend:

* **reference** (`sparse_outputs`, `keras.ops` only, every backend): the
  indices come from the mask by a cumulative sum and a scatter, without
  `ops.top_k` (so a model exported from JAX or TensorFlow with
  `selection="bisection"` contains no `top_k`). With `chunk=None` the
  `rows * k * d` selected weights are gathered at once; with `chunk=C` they
  are gathered `C` rows at a time (`ops.map` over chunks), so a chunk stays
  in cache while it is read.
* **native kernel** (`keras_midl.native`, C, built on first use): one C
  call selects the `k` neurons from the gate logits (`topk_mask`'s rule)
  and computes their dot products, reading the selected rows of the
  kernel in place, eight rows at a time (with several input rows, each
  selected row once for all of them).
  * **PyTorch** (float32 CPU tensors): where no gradient is recorded
    (`torch.no_grad()`, `predict`), the whole forward, gate and light path
    included, is one C call (`native.sparse_forward`); otherwise the gate
    logits and the light path come from torch's matmuls and the rest is
    an autograd function (`native.select_gather`, its backward in torch
    ops).
  * **TensorFlow** (float32, no GPU visible): the whole forward as one
    `tf.numpy_function`, only in traces nothing exports
    (`in_native_scope`): the functions keras_midl compiles itself for
    eager calls (`eager_inference`, `native_allowed`) and a Keras model's
    `predict` without XLA. A SavedModel cannot serve a Python function,
    and any other graph (a caller's `tf.function`, an export) may be
    exported, so there the reference runs.
  * **JAX** (float32, CPU backend): the whole forward as an XLA FFI custom
    call (`native.JAX_TARGET`, built against jaxlib's FFI headers), in
    the same traces (the `jax.jit` keras_midl compiles for eager calls, a
    Keras model's `predict`), for the same reason: an export (jax2tf)
    cannot carry a custom call.
  * Where the gate runs in C its sums are ordered differently from
    BLAS's: two logits within float rounding of each other at the
    threshold may then be selected differently from the masked path.
* **TensorFlow, elsewhere**: the reference, chunked (`CHUNK_ROWS`), in a
  `tf.function` when called eagerly (inlined in the caller's graph
  otherwise).
* **JAX, elsewhere**: the reference, chunked (`CHUNK_ROWS`), under
  `jax.jit`.
* **PyTorch where the native kernel cannot run** (no C compiler, GPU
  tensors, inside `torch.compile`): the whole forward written in torch and
  compiled by `torch.compile` (inductor), lazily on the first call, one
  compiled function per layer shape (graphs cached per input shape and
  dtype by `torch.compile`, a batch of one row specialized, other row
  counts sharing one dynamic graph after the second). If compiling fails,
  one warning is emitted and the reference runs instead. Set the
  environment variable `KERAS_MIDL_COMPILE=0` to build and compile
  nothing (the reference then runs).

Weights are passed as arguments (never captured), so compiled functions are
reused across calls and weight updates. `kernel` may be int8 with
`kernel_scale` (one scale per neuron, Keras's convention: float value =
int value / scale) and an `inputs_quantizer` (Keras's
`AbsMaxQuantizer`-like callable, `(x, axis) -> (q, scale)`): the selected
rows are then read as int8, a quarter of the bytes.

Example:

>>> layer = keras_midl.MIDL(8, k_ratio=0.5)
>>> x = np.random.rand(2, 6).astype("float32")
>>> masked = layer(x, training=False)
>>> weights = keras_midl.fast_inference.layer_weights(layer)
>>> sparse = keras_midl.fast_inference.sparse_outputs(
...     x, weights, layer.k, selection="top_k", compute_dtype="float32")
>>> to_numpy = keras.ops.convert_to_numpy
>>> bool(np.allclose(to_numpy(sparse), to_numpy(masked), atol=1e-5))
True
"""

import contextlib
import sys
import threading
import types
import typing
import warnings
import weakref

import keras
from keras import ops

from keras_midl import native
from keras_midl.native import COMPILE_ENV
from keras_midl.selection import FLOAT32_TINY
from keras_midl.selection import topk_mask

# Rows of `W^T` gathered per step by the chunked path (TensorFlow, JAX):
# 256 rows of 4096 float32 are 4 MiB, about one L2/L3 slice.
CHUNK_ROWS = 256
WEIGHT_NAMES = (
    "kernel",
    "bias",
    "projection",
    "gate_kernel",
    "gate_bias",
    "light_kernel",
    "light_bias",
    "kernel_scale",
)

_warned = set()
_jax_cache = {}
_tf_cache = {}
_torch_cache = {}
_failed = set()  # backends whose compiled path failed
_eager_cache = weakref.WeakKeyDictionary()
_owned = threading.local()  # inside a function keras_midl compiles itself


class AutoRule(typing.NamedTuple):
    """Where `inference_path="auto"` gathers, for one backend.

    Gathered when the native kernel can run (see `use_gathered_path`), the
    input has `1 <= rows <= max_rows` rows (known statically), the layer
    at least `min_weights` weights (`d * n`) and `k_ratio <= max_k_ratio`;
    masked otherwise.
    """

    max_rows: int
    min_weights: int
    max_k_ratio: float


# Where benchmarks/latency.py measured the native gathered path faster
# than the masked path (benchmarks/results/latency.md, one thread, both
# in the same compiled forward; the gathered path ran for every measured
# k_ratio up to 0.75 and d = n from 1024):
# * torch: 1-8 rows at every measured size, by 1.46-3.8x; at 16 rows
#   still by 1.08-1.85x, but there both are slower than Dense up to
#   d = n = 2048;
# * tensorflow: 1-8 rows at every measured size, by 1.03-4.5x (at 16
#   rows from d = n = 2048 the masked path wins);
# * jax: 1-2 rows at every measured size with k_ratio <= 0.45, by
#   1.44-2.76x; at k_ratio 0.75 (d = n = 8192: 0.90x) and from 4 rows
#   (0.71-1.19x from d = n = 2048) XLA's matmul in MIDL's layout, the
#   masked path, is as fast or faster.
AUTO_RULES = {
    "torch": AutoRule(max_rows=8, min_weights=1024 * 1024, max_k_ratio=0.75),
    "tensorflow": AutoRule(
        max_rows=8, min_weights=1024 * 1024, max_k_ratio=0.75
    ),
    "jax": AutoRule(max_rows=2, min_weights=1024 * 1024, max_k_ratio=0.45),
}


def native_path_available(backend=None, native_scope=None):
    """Whether the layer's native sparse kernel can run here.

    torch: whenever the kernel is built (`keras_midl.native.library()`;
    the layer checks that its tensors are float32 on the CPU). TensorFlow
    and JAX: moreover only on a machine computing on its CPU (no GPU
    visible to TensorFlow, JAX's default backend the CPU), and only where
    nothing can export the trace (`in_native_scope`): in keras_midl's own
    eager-call functions and in a Keras model's `predict`, never in an
    export (on JAX, as an XLA FFI custom call,
    `keras_midl.native.jax_ffi_available()`).

    Args:
        backend: Backend name; default the current one.
        native_scope: For TensorFlow and JAX, whether the call is in such
            a trace; default: `in_native_scope()`.
    """
    backend = backend or keras.backend.backend()
    if backend not in ("torch", "tensorflow", "jax"):
        return False
    if backend != "torch":
        if native_scope is None:
            native_scope = in_native_scope()
        if not native_scope or not _computes_on_cpu(backend):
            return False
    if backend == "jax":
        return native.jax_ffi_available()
    return native.library() is not None


def _computes_on_cpu(backend):
    """TensorFlow: no GPU visible (the kernel would copy the weights to the
    host at every call); JAX: the default backend is the CPU (the custom
    call is registered for the CPU only)."""
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU")


def use_gathered_path(
    rows, input_dim, units, k_ratio, backend=None, native_scope=None
):
    """The `inference_path="auto"` rule: whether to run the sparse path.

    Example:

    >>> keras_midl.fast_inference.use_gathered_path(
    ...     256, 4096, 4096, 0.45)    # a large batch: always masked
    False

    Args:
        rows: Number of input rows (product of the leading axes), `None`
            when not known statically (then masked).
        input_dim: `d`.
        units: `n`.
        k_ratio: The layer's `k_ratio`.
        backend: Backend name; default the current one.
        native_scope: See `native_path_available`.

    Returns:
        Python bool: `True` where the native kernel can run
        (`native_path_available`) and `AUTO_RULES[backend]` says the
        sparse path is faster.
    """
    backend = backend or keras.backend.backend()
    rule = AUTO_RULES.get(backend)
    if rule is None or rows is None:
        return False
    if not native_path_available(backend, native_scope):
        return False
    return (
        1 <= rows <= rule.max_rows
        and input_dim * units >= rule.min_weights
        and k_ratio <= rule.max_k_ratio
    )


def compile_enabled():
    """Whether keras_midl may compile its own kernels (`KERAS_MIDL_COMPILE`):
    the native and torch fast inference paths, the TensorFlow training
    selection."""
    return native.enabled()


def layer_weights(layer):
    """The tensors `sparse_inference` needs, from a built MIDL layer.

    Returns:
        Dict `name -> tensor or None` over `WEIGHT_NAMES`; `kernel_scale`
        is set for an int8-quantized layer only.
    """
    variables = [getattr(layer, name, None) for name in WEIGHT_NAMES]
    if keras.backend.backend() == "torch":
        values = _torch_values(variables)
    else:
        values = [
            None if variable is None else ops.convert_to_tensor(variable)
            for variable in variables
        ]
    return dict(zip(WEIGHT_NAMES, values))


def _torch_values(variables):
    """The variables' tensors on torch (`None` stays `None`).

    `variable.value` checks, for each variable, the stateless scope, the
    autocast scope and the symbolic (meta) device; converting through
    `ops` costs more still. Where none of the three applies the value is
    the variable's own tensor, read directly: at batch 1 these checks cost
    about as much as MIDL's gate.
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.variables import get_autocast_scope
    from keras.src.backend.torch.core import get_device

    direct = (
        not in_stateless_scope()
        and get_autocast_scope() is None
        and str(get_device()) != "meta"
    )
    return [
        None
        if variable is None
        else (
            variable._value
            if direct and variable._value is not None
            else variable.value
        )
        for variable in variables
    ]


def selected_indices(mask, k):
    """Indices of the `k` ones of each row of a 0/1 mask, without `top_k`.

    A neuron's slot is the running count of ones up to it (a cumulative
    sum); each selected neuron writes its index into its slot, the others
    into a spare slot `k` that is dropped.

    Example:

    >>> indices = keras_midl.fast_inference.selected_indices(
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
            gathers `chunk` rows of `kernel` per step.
        kernel_scale: Optional `(units,)` per-neuron scale.
        rows_scale: Optional `(rows, 1)` per-row scale of `rows`.
        bias: Optional `(units,)`.

    Returns:
        Tensor `(rows, k)`.
    """
    k = selected.shape[-1]
    if chunk is None or chunk >= k:
        weights = ops.cast(ops.take(kernel, selected, axis=0), compute_dtype)
        values = ops.einsum("bd,bkd->bk", rows, weights)
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
            weights = ops.cast(weights, compute_dtype)
            return ops.einsum("bcd,bd->bc", weights, rows)

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


def sparse_outputs(
    inputs,
    weights,
    k,
    selection="top_k",
    compute_dtype="float32",
    chunk=None,
    inputs_quantizer=None,
    gate_dtype="float32",
):
    """The MIDL inference forward, full path of the selected neurons only.

    The `keras.ops` reference of the fast paths (see the module
    docstring). Returns the output before the activation.

    Args:
        inputs: Tensor `(..., input_dim)`, any numeric or bool dtype (cast
            to `compute_dtype`).
        weights: Dict over `WEIGHT_NAMES` (see `layer_weights`).
        k: Python int, neurons selected per row.
        selection: `"top_k"` or `"bisection"` (`topk_mask`'s `method`).
        compute_dtype: dtype of the paths; the gate runs in float32.
        chunk: See `gathered_full_path`.
        inputs_quantizer: Optional callable `(x, axis) -> (q, scale)`
            applied to the full path's inputs (int8 layers).
        gate_dtype: dtype of the gate logits (the layer's `gate_dtype`).

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


def sparse_inference(
    inputs,
    weights,
    k,
    selection="top_k",
    compute_dtype="float32",
    gate_dtype="float32",
    inputs_quantizer=None,
):
    """`sparse_outputs` through the current backend's fast path.

    Same arguments and result as `sparse_outputs` (output before the
    activation); the backend-specific formulations are described in the
    module docstring. Outputs equal the masked path's up to float rounding.
    """
    backend = keras.backend.backend()
    options = (k, selection, compute_dtype, gate_dtype, inputs_quantizer)
    if backend == "torch":
        outputs = _torch_sparse(inputs, weights, *options)
        if outputs is not None:
            return outputs
    elif backend == "jax":
        return _jax_sparse(inputs, weights, *options)
    elif backend == "tensorflow":
        return _tf_sparse(inputs, weights, *options)
    return _reference(inputs, weights, *options)


def _reference(
    inputs,
    weights,
    k,
    selection,
    compute_dtype,
    gate_dtype,
    quantizer,
    chunk=None,
):
    return sparse_outputs(
        inputs,
        weights,
        k,
        selection=selection,
        compute_dtype=compute_dtype,
        chunk=chunk,
        inputs_quantizer=quantizer,
        gate_dtype=gate_dtype,
    )


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --- Eager calls on TensorFlow and JAX: the whole layer, compiled ---------


def eager_inference(layer, inputs):
    """The layer's inference call, compiled, when called eagerly.

    `model(x)` outside `predict` runs each op on its own on TensorFlow and
    JAX; MIDL's gate (a `fori_loop` for the bisection) then costs 10-50x
    a Dense layer. Called eagerly, the layer's inference call runs as one
    compiled function instead: a `tf.function` (without XLA, as Keras's
    `predict`), or `jax.jit` over the layer's `stateless_call`, cached per
    layer. Inside a graph or a trace (`predict`, `jit_compile`, an
    export) this returns `None` and the caller runs the ops inline.

    Returns:
        The layer's output, or `None` where nothing is to be compiled.
    """
    backend = keras.backend.backend()
    # The cached functions hold the layer weakly, so it can be freed.
    layer_ref = weakref.ref(layer)
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
        function = _eager_cache.get(layer)
        if function is None:
            # One trace per input shape (no `reduce_retracing`): the
            # "auto" rule needs the static number of rows.

            def owned_call(x):
                with native_allowed():
                    return layer_ref().call(x, training=False)

            function = tf.function(owned_call)
            _eager_cache[layer] = function
        return function(inputs)
    if backend == "jax":
        import jax

        if isinstance(inputs, jax.core.Tracer) or _in_stateless_scope():
            return None
        function = _eager_cache.get(layer)
        if function is None:

            def stateless(trainable, non_trainable, x):
                with native_allowed():
                    outputs, _ = layer_ref().stateless_call(
                        trainable, non_trainable, x, training=False
                    )
                return outputs

            function = _eager_cache[layer] = jax.jit(stateless)
        return function(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            inputs,
        )
    return None


@contextlib.contextmanager
def native_allowed():
    """Marks a trace as keras_midl's own (the eager-call functions of
    `eager_inference`), never exported: the native kernel, a
    `tf.numpy_function` on TensorFlow and an XLA FFI custom call on JAX,
    which a SavedModel cannot carry, may run there (as in Keras's
    `predict`, see `in_native_scope`). Graphs and jitted functions traced
    elsewhere (a caller's own, an export) run `keras.ops`."""
    depth = getattr(_owned, "depth", 0)
    _owned.depth = depth + 1
    try:
        yield
    finally:
        _owned.depth = depth


def in_native_scope():
    """Whether the current TensorFlow or JAX call may run the native kernel:
    inside `native_allowed()` (keras_midl's eager-call functions), or
    traced by a Keras model's `predict` or `predict_on_batch`, which runs
    the trace it compiles and never exports it (on TensorFlow not where
    the model compiles `predict` with XLA, `jit_compile=True`, which
    cannot run a `tf.numpy_function`). An export (`model.export`,
    `tf.saved_model.save`, jax2tf) traces the model's call elsewhere, so
    it gets the `keras.ops` path."""
    return getattr(_owned, "depth", 0) > 0 or _in_keras_predict()


def _in_keras_predict():
    """Whether `predict_step` of Keras's TensorFlow or JAX trainer is on
    the call stack (found by its code object), with XLA off on
    TensorFlow."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

        code = TensorFlowTrainer.predict_step.__code__
    elif backend == "jax":
        from keras.src.backend.jax.trainer import JAXTrainer

        code = JAXTrainer.predict_step.__code__
    else:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            model = frame.f_locals.get("self")
            return backend == "jax" or not (
                getattr(model, "jit_compile", False)
                and not getattr(model, "run_eagerly", False)
            )
        frame = frame.f_back
    return False


def torch_tracing():
    """Whether torch is tracing the call (`torch.jit.trace`, as the ONNX
    exporter does), which records no custom autograd function."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.jit.is_tracing()


def _in_stateless_scope():
    from keras.src.backend import in_stateless_scope

    return in_stateless_scope()


# --- JAX and TensorFlow: the reference, chunked, compiled as a whole -----


def _jax_sparse(inputs, weights, *options):
    import jax

    if _owned_native_applies(weights, options):
        return _jax_native_outputs(inputs, weights, options[0])

    key = options[:4] + (id(options[4]),)
    function = _jax_cache.get(key)
    if function is None:

        def forward(inputs, weights):
            return _reference(inputs, weights, *options, chunk=CHUNK_ROWS)

        function = _jax_cache[key] = jax.jit(forward)
    return function(inputs, weights)


def _tf_sparse(inputs, weights, *options):
    import tensorflow as tf

    if _owned_native_applies(weights, options):
        return _tf_native_outputs(inputs, weights, options[0])
    if not tf.executing_eagerly():  # inlined in the caller's graph
        return _reference(inputs, weights, *options, chunk=CHUNK_ROWS)
    key = options[:4] + (id(options[4]),)
    function = _tf_cache.get(key)
    if function is None:

        def forward(inputs, weights):
            return _reference(inputs, weights, *options, chunk=CHUNK_ROWS)

        function = _tf_cache[key] = tf.function(forward, reduce_retracing=True)
    return function(inputs, weights)


# --- PyTorch: the whole forward, compiled by torch.compile (inductor) ----


def _torch_forward(
    inputs,
    kernel,
    bias,
    projection,
    gate_kernel,
    gate_bias,
    light_kernel,
    light_bias,
    kernel_scale,
    k,
):
    """The inference forward in torch, for `torch.compile`.

    Selection as `keras_midl.selection.topk_mask` (NaN lowest, subnormals
    as zero, ties to the lowest index), then the indices of the mask by a
    second `topk` over `mask * (n - position)`.
    """
    import torch

    code = inputs @ projection
    logits = code.float() @ gate_kernel + gate_bias
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)
    logits = torch.where(logits.abs() < FLOAT32_TINY, 0.0, logits)
    units = logits.shape[-1]
    threshold = torch.topk(logits, k, sorted=False).values.amin(
        -1, keepdim=True
    )
    above = logits > threshold
    tied = (logits == threshold).to(torch.int32)
    needed = k - above.to(torch.int32).sum(-1, keepdim=True)
    mask = above | ((tied > 0) & (torch.cumsum(tied, -1) <= needed))
    order = units - torch.arange(units, device=logits.device)
    selected = torch.topk(
        mask.to(logits.dtype) * order.to(logits.dtype), k, sorted=False
    ).indices
    weights = kernel[selected].to(inputs.dtype)  # fused, never materialized
    values = (weights * inputs[:, None, :]).sum(-1)
    if kernel_scale is not None:
        values = values / kernel_scale[selected].to(inputs.dtype)
    if bias is not None:
        values = values + bias[selected]
    if light_kernel is None:
        base = torch.zeros_like(logits, dtype=inputs.dtype)
    else:
        base = code @ light_kernel
        if light_bias is not None:
            base = base + light_bias
    return base.scatter(1, selected, values)


def _compile(function):
    """`torch.compile(function)`; a seam for tests."""
    import torch

    return torch.compile(function)


def _torch_function(key):
    """A compiled `_torch_forward` of its own code object per layer shape.

    `torch.compile` keeps its graphs (and its recompile limit) per code
    object: one copy per `key` keeps layers of different shapes from
    evicting each other's graphs.
    """
    function = _torch_cache.get(key)
    if function is None:
        code = _torch_forward.__code__
        name = "midl_sparse_" + "_".join(str(part) for part in key)
        name = "".join(c if c.isalnum() else "_" for c in name)
        copy = types.FunctionType(
            code.replace(co_name=name), _torch_forward.__globals__, name
        )
        function = _torch_cache[key] = _compile(copy)
    return function


def _torch_sparse(
    inputs, weights, k, selection, compute_dtype, gate_dtype, quantizer
):
    """The native kernel, else the compiled torch path; `None` where the
    reference must run."""
    import torch

    if (
        quantizer is not None
        or compute_dtype != "float32"
        or gate_dtype != "float32"
    ):
        return None
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    if inputs.dtype != torch.float32:
        inputs = ops.cast(inputs, compute_dtype)
    leading_shape = tuple(inputs.shape[:-1])
    rows = inputs.reshape(-1, input_dim)
    if rows.shape[0] == 0:
        return None
    if _native_applies(rows, weights):  # checks `compile_enabled()` too
        outputs = _torch_native(rows, weights, k)
        return outputs.reshape(*leading_shape, units)
    if "torch" in _failed or not compile_enabled():
        return None
    arguments = [
        rows,
        *(weights.get(name) for name in WEIGHT_NAMES),
    ]
    if torch.compiler.is_compiling():  # inside a caller's torch.compile
        outputs = _torch_forward(*arguments, k)
        return outputs.reshape(*leading_shape, units)
    if rows.shape[0] > 1:
        # One graph for every batch of 2 rows or more (a batch of one row
        # gets its own, static graph): fewer compilations in `predict`,
        # whose last batch is usually smaller.
        torch._dynamo.mark_dynamic(rows, 0)
    key = (k, units, input_dim, compute_dtype) + tuple(
        weights.get(name) is None for name in WEIGHT_NAMES
    )
    try:
        outputs = _torch_function(key)(*arguments, k)
    except Exception as error:  # no compiler, no inductor, ...
        _failed.add("torch")
        _warn_once(
            "torch",
            "keras_midl: torch.compile failed for the sparse inference "
            f"path ({type(error).__name__}: {error}); falling back to the "
            "keras.ops path, which is slower than Dense. Set "
            f"{COMPILE_ENV}=0 to skip compiling.",
        )
        return None
    return outputs.reshape(*leading_shape, units)


# --- PyTorch on CPU: the native kernel (keras_midl/native) ----------------


def _native_applies(rows, weights):
    """Whether the native kernel can run: float32 CPU tensors, not while
    `torch.compile` or `torch.jit.trace` records the call, and the kernel
    built."""
    import torch

    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    cpu = torch.device("cpu")
    for tensor in (rows, *weights.values()):
        if tensor is not None and (
            tensor.dtype != torch.float32 or tensor.device != cpu
        ):
            return False
    return native.library() is not None


def _torch_native(rows, weights, k):
    """The sparse forward in the native kernel.

    Where no gradient is recorded (`torch.no_grad()`, `predict`): the
    whole forward in one C call (`midl_sparse_forward`). Otherwise the
    gate logits and the light path come from torch's matmuls, and the
    selection and the selected dot products from `midl_select_gather`, an
    autograd function.
    """
    import torch

    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in [rows, *weights.values()]
    )
    if not recording:
        return _torch_native_forward(rows, weights, k)
    code = rows @ weights["projection"]
    logits = code @ weights["gate_kernel"] + weights["gate_bias"]
    if weights["light_kernel"] is None:
        base = torch.zeros_like(logits)
    else:
        base = code @ weights["light_kernel"]
        if weights["light_bias"] is not None:
            base = base + weights["light_bias"]
    return _native_select_gather().apply(
        logits, rows, weights["kernel"], weights["bias"], base, k
    )


def _torch_native_forward(rows, weights, k):
    """`native.sparse_forward` on torch tensors, without a copy."""
    import torch

    rows = rows.contiguous()
    addresses, kept = {}, []  # `kept`: the tensors live until the call
    for name in native.FORWARD_WEIGHTS:
        tensor = weights[name]
        if tensor is not None:  # `data_ptr` needs no `detach`
            kept.append(tensor.contiguous())
            addresses[name] = kept[-1].data_ptr()
    units, dim = weights["kernel"].shape
    count = rows.shape[0]
    outputs = torch.empty((count, units), dtype=torch.float32)
    selected = torch.empty((count, k), dtype=torch.int64)
    native.sparse_forward_pointers(
        rows.data_ptr(),
        count,
        dim,
        addresses,
        weights["projection"].shape[1],
        units,
        k,
        outputs.data_ptr(),
        selected.data_ptr(),
    )
    return outputs


def _native_select_gather():
    """The native kernel as a `torch.autograd.Function` (built once).

    Forward: the light path `base`, with the `k` neurons `topk_mask` picks
    from `logits` replaced by `rows . kernel[j] + bias[j]`. Backward, in
    torch ops: that of this selection held fixed (no gradient to the
    logits, as the hard mask has none).
    """
    function = _torch_cache.get("native")
    if function is not None:
        return function
    import torch

    class SelectGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, rows, kernel, bias, base, k):
            logits = logits.detach().contiguous()
            rows, kernel = rows.contiguous(), kernel.contiguous()
            units, dim = kernel.shape
            outputs = base.detach().clone(memory_format=torch.contiguous_format)
            selected = torch.empty((rows.shape[0], k), dtype=torch.int64)
            native.select_gather_pointers(
                logits.data_ptr(),
                units,
                kernel.data_ptr(),
                dim,
                rows.data_ptr(),
                rows.shape[0],
                k,
                0 if bias is None else bias.contiguous().data_ptr(),
                outputs.data_ptr(),
                selected.data_ptr(),
            )
            ctx.save_for_backward(rows, kernel, selected)
            ctx.has_bias = bias is not None
            return outputs

        @staticmethod
        def backward(ctx, grad):
            rows, kernel, selected = ctx.saved_tensors
            grad_values = grad.gather(1, selected)
            flat = selected.reshape(-1)
            grad_rows = grad_kernel = grad_bias = grad_base = None
            if ctx.needs_input_grad[1]:
                grad_rows = torch.einsum(
                    "bk,bkd->bd", grad_values, kernel[selected]
                )
            if ctx.needs_input_grad[2]:
                outer = grad_values[:, :, None] * rows[:, None, :]
                grad_kernel = torch.zeros_like(kernel).index_add_(
                    0, flat, outer.reshape(-1, kernel.shape[1])
                )
            if ctx.has_bias and ctx.needs_input_grad[3]:
                grad_bias = torch.zeros(
                    kernel.shape[0], dtype=grad.dtype
                ).index_add_(0, flat, grad_values.reshape(-1))
            if ctx.needs_input_grad[4]:
                grad_base = grad.scatter(1, selected, 0.0)
            return None, grad_rows, grad_kernel, grad_bias, grad_base, None

    _torch_cache["native"] = SelectGather
    return SelectGather


# --- TensorFlow and JAX: the native kernel, in traces nothing exports ---


def _owned_native_applies(weights, options):
    """Whether the native kernel runs in a TensorFlow or JAX trace: a
    float32 layer (`options` as `sparse_inference` passes them) where
    `native_path_available()` (in a trace nothing exports, on the CPU, the
    kernel built)."""
    _, _, compute_dtype, gate_dtype, quantizer = options
    return (
        quantizer is None
        and compute_dtype == "float32"
        and gate_dtype == "float32"
        and weights["kernel"].dtype == "float32"
        and native_path_available()
    )


def _tf_native_outputs(inputs, weights, k):
    """The whole sparse forward in the native kernel
    (`native.sparse_forward`), as one `tf.numpy_function` (no gradient:
    inference only)."""
    import tensorflow as tf

    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    inputs = tf.cast(inputs, "float32")
    leading_shape = tf.shape(inputs)[:-1]
    rows = tf.reshape(inputs, (-1, input_dim))
    names = [n for n in native.FORWARD_WEIGHTS if weights[n] is not None]

    def forward(rows, *arrays):
        outputs, _ = native.sparse_forward(rows, dict(zip(names, arrays)), k)
        return outputs

    outputs = tf.numpy_function(
        forward,
        [rows] + [weights[name] for name in names],
        tf.float32,
        stateful=False,
    )
    outputs = tf.ensure_shape(outputs, (rows.shape[0], units))
    return tf.reshape(outputs, tf.concat([leading_shape, [units]], 0))


# --- JAX: the native kernel as an XLA FFI call ---------------------------


def _jax_native_outputs(inputs, weights, k):
    """The whole sparse forward as the custom call `native.JAX_TARGET`
    (`midl_sparse_forward` on XLA's buffers; no gradient: inference
    only). A missing weight is passed as an empty array."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    inputs = jnp.asarray(inputs, "float32")
    leading_shape = inputs.shape[:-1]
    rows = inputs.reshape(-1, input_dim)
    empty = jnp.zeros((0,), "float32")
    arguments = [rows] + [
        empty if weights[name] is None else weights[name]
        for name in native.FORWARD_WEIGHTS
    ]
    outputs = jax.ffi.ffi_call(
        native.JAX_TARGET,
        jax.ShapeDtypeStruct((rows.shape[0], units), jnp.float32),
    )(*arguments, k=np.int64(k))
    return outputs.reshape(*leading_shape, units)
