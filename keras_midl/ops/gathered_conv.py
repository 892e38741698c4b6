"""The gathered inference path of `MIDLConv2D` in `keras.ops`: each
example convolved with its `k` selected filters only.

The masked path convolves every example with all `filters` filters and
then keeps the `k` selected ones. The gathered path takes, for each
example, the `k` selected filters out of the kernel (`ops.take` on its
last axis), convolves the example with those alone, adds their biases,
and puts the `k` output channels into the light path's output:

```
J      = the k selected filters of the example (increasing)
y_sel  = conv(x, W[..., J]) + b[J]                  (1, Ho, Wo, k)
cat    = concatenate([h_lite, y_sel], channel axis)  (1, Ho, Wo, filters + k)
y      = take(cat, index, channel axis)
index  = filters + (position of j in J) for j in J, else j
```

(with `light_path="zero"`, `h_lite` is one channel of zeros and the
index of an unselected filter is 0). That equals the masked path's
`where(m, h_full, h_lite)` up to float rounding. A convolution is
compute-bound, so reading the `k` filters costs little next to the
`(filters - k) * Ho * Wo * kh * kw * c_in` multiply-adds it skips; it
needs no native kernel, and it runs in any trace and exports.

Examples are looped over in Python (each its own convolution), so the
batch size must be static and small: `use_gathered_conv` is the rule.
"""

import typing

import keras
from keras import ops

from keras_midl import backend as backends
from keras_midl._checks import is_integer
from keras_midl.ops.gathered import selected_indices


class ConvAutoRule(typing.NamedTuple):
    """Where `inference_path="auto"` gathers, for one backend: a static
    batch of `1 <= rows <= max_rows` examples, layers of at least
    `min_filters` filters; masked otherwise."""

    max_rows: int
    min_filters: int


# Where the gathered path beat the masked one in an eager call
# (`model(x)`, one thread, batch 1, 3x3 convs, k_ratio 0.45, padding
# same; masked / gathered time): PyTorch 1.09 at 16x16, 256 -> 256 and
# 1.69 at 8x8, 512 -> 512 (1.01 at 32x32, 128 -> 128; 0.86 at 64 -> 64);
# JAX 1.42 at 8x8, 512 -> 512 (0.69-0.96 below); TensorFlow never
# (0.79-0.94). Only batch 1 was measured. See
# benchmarks/results/latency_conv/latency_conv.md for both against Conv2D.
GATHERED_CONV_AUTO_RULES = {
    "torch": ConvAutoRule(max_rows=1, min_filters=256),
    "jax": ConvAutoRule(max_rows=1, min_filters=512),
}
# `inference_path="gathered"` gathers up to this many examples: the loop
# over the examples is unrolled into the trace, one convolution each.
GATHERED_CONV_MAX_UNROLL = 16


def use_gathered_conv(inference_path, batch_size, filters=0, backend=None):
    """Whether a `MIDLConv2D` inference call takes the gathered path.

    `"masked"`: never. `"gathered"`: for a static batch size of 1 to
    `GATHERED_CONV_MAX_UNROLL` examples (the examples are looped over in
    Python, each convolved alone). `"auto"`: where
    `GATHERED_CONV_AUTO_RULES` says the gathered path was measured faster
    than the masked one (PyTorch from 256 filters, JAX from 512, one
    example; never on TensorFlow). A batch size unknown while tracing
    (`None`, or a symbolic size as in JAX's shape-polymorphic export) or
    empty takes the masked path.

    Example:

    >>> from keras_midl.ops.gathered_conv import use_gathered_conv
    >>> use_gathered_conv("auto", 1, filters=512, backend="torch")
    True
    >>> use_gathered_conv("auto", 1, filters=64, backend="torch")
    False
    >>> use_gathered_conv("gathered", None)
    False

    Args:
        inference_path: `"auto"`, `"masked"` or `"gathered"`.
        batch_size: Python int, or `None` when not known statically.
        filters: The layer's `filters` (for `"auto"`).
        backend: Backend name; default the current one.

    Returns:
        Python bool.
    """
    if inference_path == "masked" or not is_integer(batch_size):
        # `None`, or a symbolic size (JAX's shape-polymorphic export).
        return False
    if inference_path == "auto":
        rule = GATHERED_CONV_AUTO_RULES.get(
            backend or keras.backend.backend()
        )
        return (
            rule is not None
            and 1 <= batch_size <= rule.max_rows
            and filters >= rule.min_filters
        )
    return 1 <= batch_size <= GATHERED_CONV_MAX_UNROLL


def channel_index(mask, k, base_channels):
    """Where each output channel is read from in `concatenate([base,
    selected])`: `base_channels + position` for a selected filter (its
    position among the `k` selected, in increasing order), else the
    filter's own index (`base_channels == filters`, a light path) or 0
    (`base_channels == 1`, one channel of zeros).

    Example:

    >>> from keras_midl.ops.gathered_conv import channel_index
    >>> index = channel_index(np.array([[0.0, 1.0, 0.0, 1.0]]), 2, 4)
    >>> keras.ops.convert_to_numpy(index)
    array([[0, 4, 2, 5]], dtype=int32)

    Args:
        mask: Tensor `(rows, filters)` of 0s and 1s, `k` ones per row.
        k: Python int.
        base_channels: `filters` or 1.

    Returns:
        int32 tensor `(rows, filters)`.
    """
    ones = ops.cast(ops.greater(ops.convert_to_tensor(mask), 0.5), "int32")
    filters = ones.shape[-1]
    unselected = ops.arange(filters, dtype="int32")
    if base_channels == 1:
        unselected = ops.zeros_like(unselected)
    position = base_channels + ops.cumsum(ones, axis=-1) - 1
    return ops.where(ones > 0, position, unselected[None, :])


def gathered_conv(
    inputs,
    kernel,
    mask,
    k,
    bias=None,
    light=None,
    strides=(1, 1),
    padding="valid",
    dilation_rate=(1, 1),
    data_format="channels_last",
    compute_dtype="float32",
):
    """`where(mask, conv(x, W) + b, light)` computing the `k` selected
    filters of each example only.

    Returns the output before the activation.

    Example:

    >>> from keras_midl.ops.gathered_conv import gathered_conv
    >>> x = np.random.rand(1, 5, 5, 2).astype("float32")
    >>> w = np.random.rand(3, 3, 2, 4).astype("float32")
    >>> mask = np.array([[1.0, 0.0, 0.0, 1.0]], dtype="float32")
    >>> y = keras.ops.convert_to_numpy(gathered_conv(x, w, mask, 2))
    >>> full = keras.ops.convert_to_numpy(keras.ops.conv(x, w))
    >>> bool(np.allclose(y, full * mask[:, None, None, :], atol=1e-5))
    True

    Args:
        inputs: Tensor `(batch, H, W, c_in)` (`channels_last`) or `(batch,
            c_in, H, W)`, with a static batch size.
        kernel: Tensor `(kh, kw, c_in, filters)`, the full-path kernel.
        mask: Tensor `(batch, filters)` of 0s and 1s, `k` ones per row.
        k: Python int.
        bias: Optional tensor `(filters,)`.
        light: Optional tensor of the output's shape, the light path's
            output; `None` is zero.
        strides: Pair of ints, as for `ops.conv`.
        padding: `"valid"` or `"same"`.
        dilation_rate: Pair of ints.
        data_format: `"channels_last"` or `"channels_first"`.
        compute_dtype: dtype of the convolution and of the output.

    Returns:
        Tensor `(batch, Ho, Wo, filters)` (or `(batch, filters, Ho, Wo)`)
        in `compute_dtype`.
    """
    batch_size = inputs.shape[0]
    if batch_size is None:
        raise ValueError(
            "gathered_conv loops over the examples and needs a static "
            f"batch size. Received: inputs.shape={tuple(inputs.shape)}"
        )
    channels_last = data_format == "channels_last"
    axis = -1 if channels_last else 1
    # Read values, not variables (`keras_midl.ops.gathered`: TensorFlow's
    # gather from a variable makes it copy-on-read).
    read = backends.current().read_value
    kernel = read(kernel)
    bias = None if bias is None else ops.cast(read(bias), compute_dtype)
    inputs = ops.cast(inputs, compute_dtype)
    selected = selected_indices(mask, k)
    index = channel_index(mask, k, 1 if light is None else kernel.shape[-1])
    bias_shape = (1, 1, 1, k) if channels_last else (1, k, 1, 1)
    outputs = []
    for row in range(batch_size):
        filters = ops.take(kernel, selected[row], axis=3)
        filters = ops.cast(filters, compute_dtype)
        values = ops.conv(
            inputs[row : row + 1],
            filters,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            data_format=data_format,
        )
        if bias is not None:
            chosen = ops.take(bias, selected[row], axis=0)
            values = values + ops.reshape(chosen, bias_shape)
        if light is None:
            first = values[..., :1] if channels_last else values[:, :1]
            base = ops.zeros_like(first)
        else:
            base = ops.cast(light[row : row + 1], compute_dtype)
        both = ops.concatenate([base, values], axis=axis)
        outputs.append(ops.take(both, index[row], axis=axis))
    if len(outputs) == 1:
        return outputs[0]
    return ops.concatenate(outputs, axis=0)
