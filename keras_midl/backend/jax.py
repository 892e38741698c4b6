"""JAX: the native kernel in eager calls, compiled eager calls, and the
training selection as an XLA FFI call."""

import jax
import jax.numpy as jnp
import numpy as np
from keras import ops

from keras_midl import config
from keras_midl.backend import generic
from keras_midl.native import build
from keras_midl.native import kernels
from keras_midl.ops.selection import cache_sized_block

# The same as on a backend without a module of its own.
exporting = generic.exporting
conv_kernel = generic.conv_kernel
compiled_gathered = generic.compiled_gathered
native_mix = generic.native_mix
native_select_mix_runs = generic.native_select_mix_runs
native_select_mix = generic.native_select_mix
read_value = generic.read_value

# Below this many rows (a static count), on a CPU, `matmul_transposed`
# keeps XLA from folding its transposes into the dot (see there).
MATERIALIZED_TRANSPOSE_ROWS = 128


def matmul_transposed(inputs, kernel):
    """`inputs @ kernel^T` for a kernel stored as `(units, input_dim)`.

    `(kernel @ rows^T)^T`, as `generic.matmul_transposed`. XLA folds
    those transposes into one dot that reads the kernel with its
    contracting axis minor, whatever form is written (`x @ kernel.T`,
    `dot_general`, `(kernel @ x.T).T` compile to the same dot); on a CPU
    that dot is slow at small batches. So below
    `MATERIALIZED_TRANSPOSE_ROWS` rows (a static count) on a CPU, the
    forward pass keeps each transpose as a copy
    (`jax.lax.optimization_barrier`), and its dot is `kernel @ rows^T` as
    laid out: a matrix times a few columns. The backward pass is the two
    plain products `g @ kernel` and `g^T @ rows`, laid out by XLA (through
    the barriers it took 1.35-1.53x the time of Dense's).

    On the AMD EPYC of this project's later results (jaxlib 0.10.2, one
    thread, `jax.jit`, time over `x @ W` in Dense's layout; one-off A/Bs,
    interleaved medians), at d = n = 4096 the forward pass took 0.37-0.58x
    from 2 to 16 rows and 0.73-0.95x from 32 to 96, where the folded form
    took 1.12-1.69x; at d = n = 1024 0.40-0.60x from 2 to 32 rows against
    0.93-1.28x. Forward and backward: 0.76-0.96x from 2 to 100 rows,
    against the folded form's 0.98-1.08x. From 128 rows the folded form
    is as fast or faster (forward at 256 x 4096 -> 4096 1.08x against
    1.14-1.15x), and a GPU's matmul takes transposed operands as they are.
    """
    return generic.matmul_rows(inputs, kernel, _matmul_transposed_rows)


def _matmul_transposed_rows(rows, kernel):
    """`rows @ kernel^T` of a matrix `rows`, by `matmul_transposed`'s
    rule."""
    count = rows.shape[0]
    if (
        # `None`, or a symbolic dimension of `jax.export`.
        not isinstance(count, int)
        or count >= MATERIALIZED_TRANSPOSE_ROWS
        or jax.default_backend() != "cpu"
    ):
        return generic.transposed_activations(rows, kernel)
    return _laid_out_product(rows, ops.convert_to_tensor(kernel))


@jax.custom_vjp
def _laid_out_product(rows, kernel):
    """`rows @ kernel^T` as `kernel @ rows^T` with both transposes kept
    as copies (see `matmul_transposed`)."""
    columns = jax.lax.optimization_barrier(rows.T)
    return jax.lax.optimization_barrier(kernel @ columns).T


def _laid_out_product_forward(rows, kernel):
    return _laid_out_product(rows, kernel), (rows, kernel)


def _laid_out_product_backward(residuals, gradient):
    rows, kernel = residuals
    return gradient @ kernel, gradient.T @ rows


_laid_out_product.defvjp(_laid_out_product_forward, _laid_out_product_backward)


def in_trace(inputs):
    """Whether JAX is tracing (`jax.jit`, Keras's `predict` and `fit`, an
    export): the inputs are tracers."""
    return isinstance(inputs, jax.core.Tracer)


FFI_TARGET = "keras_midl_topk_mask"
_ffi_registered = []


def _ffi_selection_ready():
    """Whether the FFI handler of the native selection is registered with
    JAX (built and registered on the first call)."""
    if not config.native_kernels_enabled():
        return False
    if not _ffi_registered:
        library = build.jax_ffi_library(jax.ffi.include_dir())
        if library is not None:
            jax.ffi.register_ffi_target(
                FFI_TARGET, jax.ffi.pycapsule(library.MidlTopkMask),
                platform="cpu",
            )
        _ffi_registered.append(library is not None)
    return _ffi_registered[0]


def native_topk_mask(scores, k, training):
    """`keras_midl.ops.topk_mask(scores, k)` in the native kernel (the
    same mask, bit for bit), with no gradient, in training only; `None`
    elsewhere (an inference function holding a custom call would not
    export with `jax.export` or `jax2tf`), or where it cannot run (the
    default backend is not the CPU, scores not float32, the FFI handler
    not built).

    It is an XLA FFI call (`keras_midl/native/jax_ffi.cc`), compiled into
    the training step like any op: at 256 x 1024 scores it took 0.49-0.56
    ms here, the XLA bisection in blocks 0.89-0.93 ms (the runs at 10cdd2f
    and 150434c, `benchmarks/results/selection/`)."""
    if (
        not training
        or jax.default_backend() != "cpu"
        or scores.dtype != jnp.float32
        or scores.ndim == 0
        or not _ffi_selection_ready()
    ):
        return None
    call = jax.ffi.ffi_call(
        FFI_TARGET,
        jax.ShapeDtypeStruct(scores.shape, jnp.float32),
        vmap_method="broadcast_all",
    )
    # Rows shared among as many threads as XLA's CPU pool has (one per
    # CPU this process may run on).
    return call(
        jax.lax.stop_gradient(scores),
        k=np.int64(k),
        threads=np.int64(kernels.available_cpus()),
    )


def compiled_selection(select, scores):
    """`select(scores)` in blocks of rows that stay in a core's cache
    (`keras_midl.ops.selection.cache_sized_block`) on a CPU: JAX compiles
    it with XLA, which ran the bisection 1.4-1.6x faster so here. The
    same mask."""
    return select(scores, rows_per_block=_block_rows(scores))


def _block_rows(scores):
    if jax.default_backend() != "cpu":
        return None
    return cache_sized_block(scores.shape[-1])


def native_forward(inputs, weights, k, quantize_inputs=True):
    """The whole gathered forward in the native kernel, on the arrays'
    buffers (CPU arrays share their memory with NumPy); `None` where it
    cannot run (the default backend is not the CPU, an array neither
    float32 nor the int8 kernel of a quantized layer). `quantize_inputs`:
    int8 only, see `keras_midl.native.sparse_forward`. The shapes are the
    built layer's, so the kernel runs without `sparse_forward`'s checks.
    The kernel runs on as many threads as XLA's CPU thread pool has (one
    per CPU this process may run on; `XLA_FLAGS` do not change it)."""
    if jax.default_backend() != "cpu":
        return None
    # NumPy views of the CPU buffers; the outputs are shaped in NumPy and
    # cross into JAX once (each JAX op in an eager call costs 10-30 us).
    arrays = {
        name: None if weights[name] is None else np.ascontiguousarray(
            weights[name]
        )
        for name in kernels.FORWARD_WEIGHTS
    }
    outputs = generic.forward_on_arrays(
        np.asarray(inputs),
        arrays,
        k,
        quantize_inputs=quantize_inputs,
        threads=kernels.available_cpus(),
    )
    return None if outputs is None else jnp.asarray(outputs)


def compile_layer_call(call, static_shapes=False):
    """`call(trainable, non_trainable, x)` under `jax.jit`: run op by op,
    MIDL's gate (a `fori_loop` for the bisection) costs 10-50x a Dense
    layer. Its shapes are always static (one trace per input shape)."""
    return jax.jit(call)

