"""Low-rank parts of a MIDL layer: the default rank, and a layer's weights
from a trained Dense layer by truncated SVD (`MIDL.from_dense`), or from a
trained Conv2D layer (`MIDLConv2D.from_conv2d`, the SVD of its kernel
reshaped to `(kh*kw*c_in, filters)`; `default_conv_rank`).

A trained `Dense` layer maps onto MID-L's parts: the full path is the Dense
layer itself (`W`, `b`); the light path is its best rank-`r` approximation,
from the truncated SVD `W ~ P_r S_r Q_r^T` with the singular values split
between the two factors,

```
V = P_r sqrt(S_r)        (d, r)   projection
U = sqrt(S_r) Q_r^T      (r, n)   light kernel, b_lite = b
```

so that `z U = x V U` is the best rank-`r` approximation of `x W`
(Eckart-Young). The gate starts as `G = U`, `c = b` (`gate_init="lowrank"`).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_midl._checks import is_integer


def default_rank(input_dim, units, overhead=0.1, max_rank=32):
    """The rank used when `rank=None`: the largest that keeps the gate cheap.

    The gate and the light path cost `r * (d + 2 * n)` multiply-adds per
    row; the default rank is the largest `r <= max_rank` (and at least 1)
    with `r * (d + 2 * n) <= overhead * d * n`. With the default 10% budget
    a layer's inference cost is at most `(k_ratio + 0.1) * d * n`, a FLOPs
    ratio to Dense of at least 1.8 at `k_ratio = 0.45`.

    Example:

    >>> keras_midl.lowrank.default_rank(784, 512)  # r*(d + 2n) <= 0.1*d*n
    22

    Args:
        input_dim: `d`, the layer's input size.
        units: `n`, the layer's units.
        overhead: Budget as a fraction of the Dense cost `d * n`.
        max_rank: Upper bound.

    Returns:
        Python int.
    """
    if not 0 < overhead < 1:
        raise ValueError(
            "Received an invalid value for `overhead`, expected a float in "
            f"(0, 1). Received: overhead={overhead!r}"
        )
    rank = math.floor(overhead * input_dim * units / (input_dim + 2 * units))
    return int(max(1, min(max_rank, rank)))



def default_conv_rank(
    kernel_size, input_channels, filters, overhead=0.1, max_rank=32
):
    """The rank of a `MIDLConv2D` with `rank=None`: the largest that keeps
    the light path cheap.

    Per output pixel the light path costs `kh*kw*c_in*r + r*filters`
    multiply-adds (an `r`-filter convolution, then a 1x1 up to `filters`)
    against the convolution's `kh*kw*c_in*filters`; the default rank is
    the largest `r <= max_rank` (and at least 1) with `r * (kh*kw*c_in +
    filters) <= overhead * kh*kw*c_in*filters`. The gate, `c_in*r +
    r*filters` per example (not per pixel), is left out: it is below one
    output pixel's light path.

    Example:

    >>> keras_midl.lowrank.default_conv_rank((3, 3), 64, 128)  # r * 704 <= 7373
    10

    Args:
        kernel_size: `(kh, kw)`, or an int for a square kernel.
        input_channels: `c_in`.
        filters: The layer's filters.
        overhead: Budget as a fraction of the convolution's cost.
        max_rank: Upper bound.

    Returns:
        Python int.
    """
    if not 0 < overhead < 1:
        raise ValueError(
            "Received an invalid value for `overhead`, expected a float in "
            f"(0, 1). Received: overhead={overhead!r}"
        )
    if is_integer(kernel_size):
        kernel_size = (kernel_size, kernel_size)
    patch = math.prod(int(size) for size in kernel_size) * input_channels
    rank = math.floor(overhead * patch * filters / (patch + filters))
    return int(max(1, min(max_rank, rank)))



GATE_INITS = ("lowrank", "random")
# Arguments `from_dense` takes from the Dense layer and does not accept.
_FROM_DENSE = (
    "units",
    "activation",
    "use_bias",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


def lowrank_factors(kernel, rank):
    """Truncated-SVD factors `V (d, r)`, `U (r, n)` of a kernel `W (d, n)`.

    `V U` is the best rank-`rank` approximation of `W` in the Frobenius and
    spectral norms; each factor carries the square root of the singular
    values, so both have the same scale.

    Example:

    >>> from keras_midl.lowrank import lowrank_factors
    >>> w = np.arange(12.0).reshape(4, 3)
    >>> v, u = lowrank_factors(w, 2)
    >>> v.shape, u.shape
    ((4, 2), (2, 3))
    >>> bool(np.allclose(v @ u, w))   # w has rank 2
    True

    Args:
        kernel: Array of shape `(d, n)`, as a Dense layer's kernel.
        rank: Integer in `[1, min(d, n)]`.

    Returns:
        `(V, U)`, float64 NumPy arrays.
    """
    kernel = np.asarray(kernel, dtype="float64")
    if kernel.ndim != 2:
        raise ValueError(
            "Expected a 2D kernel of shape (input_dim, units). "
            f"Received: kernel.shape={kernel.shape}"
        )
    if not is_integer(rank) or not 1 <= rank <= min(kernel.shape):
        raise ValueError(
            "Received an invalid value for `rank`, expected an integer in "
            f"[1, min(input_dim, units)] = [1, {min(kernel.shape)}]. "
            f"Received: rank={rank!r}"
        )
    left, singular, right = np.linalg.svd(kernel, full_matrices=False)
    root = np.sqrt(singular[:rank])
    return left[:, :rank] * root, root[:, None] * right[:rank]


def check_dense(layer):
    if type(layer) is not keras.layers.Dense:
        raise ValueError(
            "Expected a `keras.layers.Dense` layer (subclasses are not "
            f"supported). Received: layer={layer!r} of type "
            f"{type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(
            f"The Dense layer '{layer.name}' is not built: build it (or call "
            "the model on data) before converting it."
        )
    if layer.quantization_mode is not None:
        raise ValueError(
            f"The Dense layer '{layer.name}' is quantized "
            f"(quantization_mode={layer.quantization_mode!r}). Convert the "
            "float model, then quantize the converted one with "
            "`model.quantize('int8')`."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"The Dense layer '{layer.name}' has LoRA enabled. Merge or "
            "drop the LoRA weights before converting it."
        )


def _assign(variable, value):
    variable.assign(ops.cast(np.asarray(value), variable.dtype))


def _copied_arguments(layer):
    """The arguments a converted layer takes from its `Dense` or `Conv2D`
    layer besides the shape: activation, bias use, initializers,
    regularizers and constraints."""
    return {
        "activation": layer.activation,
        "use_bias": layer.use_bias,
        "kernel_initializer": layer.kernel_initializer,
        "bias_initializer": layer.bias_initializer,
        "kernel_regularizer": layer.kernel_regularizer,
        "bias_regularizer": layer.bias_regularizer,
        "activity_regularizer": layer.activity_regularizer,
        "kernel_constraint": layer.kernel_constraint,
        "bias_constraint": layer.bias_constraint,
    }


def _check_conversion_arguments(method, kind, taken_from_layer, gate_init,
                                kwargs):
    """`gate_init` is one of `GATE_INITS`, and `kwargs` passes none of the
    arguments `method` takes from the `kind` layer."""
    if gate_init not in GATE_INITS:
        raise ValueError(
            "Received an invalid value for `gate_init`, expected one of "
            f"{GATE_INITS}. Received: gate_init={gate_init!r}"
        )
    taken = sorted(set(kwargs) & set(taken_from_layer))
    if taken:
        raise ValueError(
            f"`{method}` takes {taken} from the {kind} layer; do not pass "
            f"them. Received: {', '.join(f'{k}={kwargs[k]!r}' for k in taken)}"
        )


def from_dense(
    cls, layer, k_ratio=0.5, rank=None, gate_init="lowrank", **kwargs
):
    """Implementation of `MIDL.from_dense` (see its docstring)."""
    check_dense(layer)
    _check_conversion_arguments("from_dense", "Dense", _FROM_DENSE,
                                gate_init, kwargs)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float64")
    input_dim, units = kernel.shape
    if rank is None:
        rank = default_rank(input_dim, units)
    if not is_integer(rank) or not 1 <= rank <= min(input_dim, units):
        raise ValueError(
            "Received an invalid value for `rank`, expected None or an "
            "integer in [1, min(input_dim, units)] = "
            f"[1, {min(input_dim, units)}] for Dense layer '{layer.name}'. "
            f"Received: rank={rank!r}"
        )
    kwargs.setdefault("dtype", layer.dtype_policy)
    midl = cls(
        units,
        k_ratio=k_ratio,
        rank=rank,
        **_copied_arguments(layer),
        **kwargs,
    )
    midl.build((None, input_dim))
    projection, light = lowrank_factors(kernel, rank)
    bias = None
    if layer.use_bias:
        bias = keras.ops.convert_to_numpy(layer.bias)
        _assign(midl.bias, bias)
    _assign(midl.kernel, kernel.T)
    _assign(midl.projection, projection)
    if midl.light_kernel is not None:
        _assign(midl.light_kernel, light)
        if midl.light_bias is not None:
            _assign(midl.light_bias, bias)
    if gate_init == "lowrank":
        _assign(midl.gate_kernel, light)
        _assign(midl.gate_bias, bias if bias is not None else np.zeros(units))
    return midl


# Arguments `from_conv2d` takes from the Conv2D layer and does not accept.
_FROM_CONV2D = (
    "filters",
    "kernel_size",
    "strides",
    "padding",
    "data_format",
    "dilation_rate",
    "activation",
    "use_bias",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


def check_conv2d(layer):
    if type(layer) is not keras.layers.Conv2D:
        raise ValueError(
            "Expected a `keras.layers.Conv2D` layer (subclasses are not "
            f"supported). Received: layer={layer!r} of type "
            f"{type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(
            f"The Conv2D layer '{layer.name}' is not built: build it (or "
            "call the model on data) before converting it."
        )
    if layer.groups != 1:
        raise ValueError(
            f"The Conv2D layer '{layer.name}' has groups={layer.groups}; "
            "only groups=1 converts to MIDLConv2D."
        )
    if layer.quantization_mode is not None:
        raise ValueError(
            f"The Conv2D layer '{layer.name}' is quantized "
            f"(quantization_mode={layer.quantization_mode!r}); convert the "
            "float model."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"The Conv2D layer '{layer.name}' has LoRA enabled. Merge or "
            "drop the LoRA weights before converting it."
        )


def from_conv2d(
    cls, layer, k_ratio=0.5, rank=None, gate_init="lowrank", **kwargs
):
    """Implementation of `MIDLConv2D.from_conv2d` (see its docstring)."""
    check_conv2d(layer)
    _check_conversion_arguments("from_conv2d", "Conv2D", _FROM_CONV2D,
                                gate_init, kwargs)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float64")
    *window, channels, filters = kernel.shape
    patch = math.prod(window) * channels
    if rank is None:
        rank = default_conv_rank(tuple(window), channels, filters)
    if not is_integer(rank) or not 1 <= rank <= min(patch, filters):
        raise ValueError(
            "Received an invalid value for `rank`, expected None or an "
            "integer in [1, min(kh*kw*c_in, filters)] = "
            f"[1, {min(patch, filters)}] for Conv2D layer '{layer.name}'. "
            f"Received: rank={rank!r}"
        )
    kwargs.setdefault("dtype", layer.dtype_policy)
    midl = cls(
        filters,
        tuple(window),
        k_ratio=k_ratio,
        rank=rank,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        **_copied_arguments(layer),
        **kwargs,
    )
    if layer.data_format == "channels_last":
        midl.build((None, None, None, channels))
    else:
        midl.build((None, channels, None, None))
    left, light = lowrank_factors(kernel.reshape(patch, filters), rank)
    light_conv = left.reshape(*window, channels, rank)
    bias = None
    if layer.use_bias:
        bias = keras.ops.convert_to_numpy(layer.bias)
        _assign(midl.bias, bias)
    _assign(midl.kernel, kernel)
    if midl.light_kernel is not None:
        _assign(midl.light_conv_kernel, light_conv)
        _assign(midl.light_kernel, light)
        if midl.light_bias is not None:
            _assign(midl.light_bias, bias)
    if gate_init == "lowrank":
        # `p V` is the light code of a constant image of value `p` (away
        # from the borders): the sum of `W_r` over its taps.
        _assign(midl.projection, light_conv.sum(axis=(0, 1)))
        _assign(midl.gate_kernel, light)
        _assign(
            midl.gate_bias, bias if bias is not None else np.zeros(filters)
        )
    return midl
