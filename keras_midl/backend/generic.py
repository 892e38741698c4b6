"""The backend functions for a backend without a module of its own (such
as NumPy's): no native kernel and nothing compiled; `keras.ops` only.
The backend modules take from here the functions where they do the same
(nothing to export specially, nothing compiled, values read as they
are)."""

import numpy as np
from keras import ops

from keras_midl.native import kernels


def in_trace(inputs):
    """Whether the call is traced; never on this backend."""
    return False


def exporting():
    """Whether a tracing exporter that freezes branches records the call;
    never here (the exporters of TensorFlow and JAX trace as `in_trace`
    sees)."""
    return False


def matmul_transposed(inputs, kernel):
    """`inputs @ kernel^T` for a kernel stored as `(units, input_dim)`,
    computed as `(kernel @ rows^T)^T`.

    Some CPU matmuls with a transposed right operand are slower than
    `x @ W` at small batches (TensorFlow's `MatMul` with `transpose_b` up
    to 2x; XLA's dot up to 13x at batch 1, where it copies the transposed
    kernel), while transposing the activations costs no more than Dense.
    TensorFlow and JAX take forms of their own
    (`keras_midl.backend.tensorflow`, `keras_midl.backend.jax`).
    """
    return matmul_rows(inputs, kernel, transposed_activations)


def conv_kernel(kernel):
    """A convolution kernel `(*spatial, c_in, c_out)` as `ops.conv` takes
    it, in the layout the backend's convolution needs; here unchanged."""
    return kernel


def transposed_activations(rows, kernel):
    """`rows @ kernel^T` of a matrix `rows` as `(kernel @ rows^T)^T`."""
    return ops.transpose(ops.matmul(kernel, ops.transpose(rows)))


def matmul_rows(inputs, kernel, multiply):
    """`multiply(rows, kernel)`, a product of the matrix `rows` with a
    kernel stored as `(units, input_dim)`, on `inputs` of any rank: its
    leading axes flattened into rows, then restored around `units`."""
    units, input_dim = kernel.shape
    flat = len(inputs.shape) == 2
    rows = inputs if flat else ops.reshape(inputs, (-1, input_dim))
    outputs = multiply(rows, kernel)
    if flat:
        return outputs
    return ops.reshape(outputs, (*ops.shape(inputs)[:-1], units))


def native_forward(inputs, weights, k):
    """The native kernel does not run on this backend."""
    return None


def compiled_gathered(inputs, weights, k):
    """No compiled gathered path: the `keras.ops` one runs."""
    return None


def read_value(value):
    """The value as it is."""
    return value


def compile_layer_call(call, static_shapes=False):
    """Eager calls are not compiled."""
    return None


def compiled_selection(select, scores):
    """The training selection as it is (not compiled separately)."""
    return select(scores)


def native_topk_mask(scores, k, training):
    """No native selection: `None`, the caller runs `topk_mask`."""
    return None


def native_mix(
    mask,
    logits,
    full,
    light,
    temperature,
    return_frequencies=False,
    training=False,
    bias=None,
    light_bias=None,
):
    """No native mix: `None`, the caller runs `straight_through_mix`."""
    return None


def native_select_mix_runs(inputs):
    """No native select-and-mix: `False`, the caller runs the masked
    path."""
    return False


def native_select_mix(logits, k, full, bias, light, light_bias):
    """No native select-and-mix: `None`."""
    return None


def native_dtypes(weights, is_float32, is_int8):
    """Whether the native kernel takes these weights: all float32, or an
    int8 `kernel` with its `kernel_scale` and the rest float32."""
    int8 = weights.get("kernel_scale") is not None
    for name, weight in weights.items():
        if weight is None:
            continue
        if name == "kernel" and int8:
            if not is_int8(weight):
                return False
        elif not is_float32(weight):
            return False
    return True


def forward_on_arrays(rows, arrays, k, quantize_inputs=True, threads=None):
    """The native forward on NumPy views of a built layer's inputs and
    weights, for the backends whose CPU tensors share their buffers with
    NumPy (TensorFlow, JAX).

    Args:
        rows: Array `(..., input_dim)`, the inputs.
        arrays: Dict of arrays over `kernels.FORWARD_WEIGHTS`, the
            layer's weights (`None` where absent), C-contiguous.
        k: Neurons selected per row.
        quantize_inputs: int8 only, see `kernels.sparse_forward`.
        threads: The most threads of the native kernel (default: the
            CPUs this process may run on).

    Returns:
        Float32 array `(..., units)`, or `None` where the weights' dtypes
        are not the kernel's (`native_dtypes`).
    """
    if not native_dtypes(
        arrays,
        lambda array: array.dtype == np.float32,
        lambda array: array.dtype == np.int8,
    ):
        return None
    units, input_dim = arrays["kernel"].shape
    flat = np.ascontiguousarray(rows.reshape(-1, input_dim), np.float32)
    if not flat.shape[0]:
        return np.zeros((*rows.shape[:-1], units), np.float32)
    outputs, _ = kernels.sparse_forward_arrays(
        flat, arrays, k, quantize_inputs=quantize_inputs, threads=threads
    )
    return outputs.reshape(*rows.shape[:-1], units)
