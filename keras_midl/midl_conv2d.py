"""Convolutional MID-L: a Conv2D layer with learned top-k filter selection."""

import math

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_midl import backend
from keras_midl._checks import is_integer
from keras_midl.gating import GatedLayer
from keras_midl.gating import num_selected
from keras_midl.lowrank import default_conv_rank
from keras_midl.lowrank import from_conv2d
from keras_midl.ops import dispatch
from keras_midl.ops.gathered_conv import gathered_conv
from keras_midl.ops.gathered_conv import use_gathered_conv
from keras_midl.ops.selection import balance_loss
from keras_midl.ops.selection import straight_through
from keras_midl.ops.selection import straight_through_mix
from keras_midl.ops.selection import topk_mask

PADDINGS = ("valid", "same")
DATA_FORMATS = ("channels_last", "channels_first")


def _pair(value, name):
    """`value` as a tuple of two positive ints, as Conv2D standardizes
    `kernel_size`, `strides` and `dilation_rate`."""
    pair = (value, value) if is_integer(value) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = None
    if (
        pair is None
        or len(pair) != 2
        or not all(is_integer(size) and size >= 1 for size in pair)
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer or a tuple of 2 positive integers. "
            f"Received: {name}={value!r}"
        )
    return pair


def _output_size(size, kernel, stride, dilation, padding):
    """One spatial size of a convolution's output (`None` stays `None`)."""
    if size is None:
        return None
    if padding == "same":
        return (size - 1) // stride + 1
    return (size - dilation * (kernel - 1) - 1) // stride + 1


@keras.saving.register_keras_serializable(package="keras_midl")
class MIDLConv2D(GatedLayer):
    """Convolutional MID-L: a Conv2D layer with learned top-k filter
    selection.

    For each example (not each pixel) a gate looks at the example's mean
    over the image and picks the `k` most informative of the `filters`
    output channels. Those get the full convolution `conv(x, W) + b`; the
    others get a cheap one, `r` filters followed by a 1x1 convolution up to
    `filters` (or zero). For `channels_last` inputs `x` of shape
    `(batch, H, W, c_in)`:

    ```
    p      = mean over H, W of x           # (batch, c_in)
    s      = (p V) G + c                   # gate logits, V: (c_in, r),
                                           #   G: (r, filters)
    m      = topk_mask(s + noise, k)       # exactly k ones per example
    h_full = conv(x, W) + b                # W: (kh, kw, c_in, filters)
    h_lite = conv(x, W_r) U + b_lite       # W_r: (kh, kw, c_in, r),
                                           #   U: (r, filters), a 1x1
    a      = sigmoid(s / temperature)
    g      = m + a - stop_gradient(a)      # value m, gradient of a
    output = activation(g * h_full + (1 - g) * h_lite)
    ```

    with `g` broadcast over the output's height and width. The gradient of
    the mask is the straight-through estimate through `sigmoid(s /
    temperature)`, so every weight trains end to end. With `k_ratio=1` the
    layer computes exactly `keras.layers.Conv2D` with kernel `W` and bias
    `b`. In training the layer adds the load-balancing loss of `MIDL` to
    `layer.losses`.

    These equations are this project's reading of the MID-L paper
    (`keras_midl.MIDL`) carried over to convolutions; its authors
    published no code.

    Inference multiply-adds per example, for an output of `Ho x Wo`
    pixels: the gate `c_in*r + r*filters`, the light path `Ho*Wo*(kh*kw*
    c_in*r + r*filters)` (none with `light_path="zero"`) and the full path
    of the `k` selected filters `Ho*Wo*kh*kw*c_in*k`, against
    `Ho*Wo*kh*kw*c_in*filters` for Conv2D. Only the gathered path
    (`inference_path="gathered"`, or `"auto"` at small batch sizes)
    computes the selected filters alone; the masked path convolves with
    every filter and saves no time.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras_midl.MIDLConv2D(16, (3, 3), k_ratio=0.5, padding="same",
    ...                           activation="relu"),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(10, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> model.predict(np.zeros((2, 8, 8, 3)), verbose=0).shape
    (2, 10)
    >>> layer = model.layers[0]
    >>> layer.k, tuple(layer.kernel.shape)
    (8, (3, 3, 3, 16))

    Args:
        filters: Positive integer, the number of output channels.
        kernel_size: Integer or tuple of 2 integers, the height and width
            of the convolution window, as for `Conv2D`.
        k_ratio: Float in `(0, 1]`, fraction of the filters computed by the
            full path for each example; `k = max(1, round(k_ratio *
            filters))`, rounded up to a multiple of `k_multiple` if set.
            `layer.k_ratio` can be set later (validated, and `layer.k`
            follows); `layer.k` itself is read-only.
        rank: Positive integer, the rank `r` of the gate's code and the
            number of light-path filters. `None` uses
            `keras_midl.lowrank.default_conv_rank(kernel_size, c_in,
            filters)`: the largest rank <= 32 whose light path costs at
            most 10% of the convolution per output pixel.
        light_path: `"lowrank"` (default) for `h_lite = conv(x, W_r) U +
            b_lite`, or `"zero"` for `h_lite = 0`: unselected filters
            output `activation(0)`, a learned input-dependent channel
            dropout.
        temperature: Positive finite float, temperature of the sigmoid
            whose gradient the straight-through estimator uses.
        gate_noise: Non-negative finite float, standard deviation of
            Gaussian noise added to the gate logits before selection, in
            training only.
        balance_weight: Non-negative finite float, weight of the load
            balancing loss added in training, `var_j(f_j) / (k/filters)^2`
            with `f_j` the fraction of the batch's examples that select
            filter `j` (as `MIDL`'s). `0` adds no loss.
        strides: Integer or tuple of 2 integers, as for `Conv2D`.
        padding: `"valid"` or `"same"` (case-insensitive), as for `Conv2D`.
        data_format: `"channels_last"` or `"channels_first"`; `None` uses
            `keras.config.image_data_format()`.
        dilation_rate: Integer or tuple of 2 integers, as for `Conv2D`
            (not with `strides > 1`).
        activation: Activation function, as for `Conv2D`.
        use_bias: Boolean, whether the full and light paths have biases
            `b` and `b_lite`. The gate bias `c` always exists.
        kernel_initializer: Initializer of `W`, `W_r`, `V`, `G` and `U`,
            one draw per weight (a seed derived per weight for a seeded
            initializer).
        bias_initializer: Initializer of `b`, `b_lite` and `c`.
        kernel_regularizer: Regularizer applied to `W`, `W_r`, `V`, `G`
            and `U`.
        bias_regularizer: Regularizer applied to `b` and `b_lite`.
        activity_regularizer: Regularizer applied to the output.
        kernel_constraint: Constraint applied to `W`, `W_r`, `V`, `G` and
            `U`.
        bias_constraint: Constraint applied to `b` and `b_lite`.
        selection: How the top-k mask is found: `"top_k"` or
            `"bisection"` (the same mask, see `keras_midl.ops.topk_mask`);
            `None` picks the faster one for the current backend.
        inference_path: How the full path is computed outside training
            (training always uses the masked path); all give the same
            outputs up to float rounding. `"masked"`: one convolution with
            all `filters` filters, then the mask. `"gathered"`: each
            example convolved with its `k` selected filters only
            (`keras_midl.ops.gathered_conv`), for a static batch size of
            at most `GATHERED_CONV_MAX_UNROLL` examples; masked otherwise.
            `"auto"`: gathered where that was measured faster than masked
            (`keras_midl.ops.gathered_conv.use_gathered_conv`: one
            example, PyTorch from 256 filters, JAX from 512, never on
            TensorFlow), masked otherwise.
        k_multiple: Optional positive integer: `k` is rounded up to a
            multiple of it (at most `filters`), for hardware that
            computes channels in groups.
        seed: Integer, seed of the gate noise.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 4D tensor.
        training: Python boolean; gate noise and the balancing loss only
            when `True`.

    Input shape:
        4D tensor `(batch_size, height, width, channels)` with
        `channels_last`, `(batch_size, channels, height, width)` with
        `channels_first`.

    Output shape:
        4D tensor `(batch_size, new_height, new_width, filters)` with
        `channels_last`, `(batch_size, filters, new_height, new_width)`
        with `channels_first`, the sizes of `Conv2D`'s.

    Dtypes: as in `MIDL`, the gate (the mean over the image, `V`, `G`,
    `c`, the selection and the sigmoid) runs in `gate_dtype`, float32
    under 16-bit and mixed policies; the paths and the output in the
    compute dtype.

    Not supported yet: int8 quantization (`quantize` raises
    `NotImplementedError`, so `model.quantize("int8")` warns and leaves
    this layer in float), LoRA, groups, and a native kernel.

    Reference:
        Shaeri & Middel, "MID-L: Matrix-Interpolated Dropout Layer with
        Layer-wise Neuron Selection", arXiv:2505.11416.
    """

    # Outside training the mask is `topk_mask`'s (`MIDL` asks
    # `dispatch.inference_topk_mask`, which may run the native kernel).
    _inference_topk_mask = staticmethod(topk_mask)

    def __init__(
        self,
        filters,
        kernel_size,
        k_ratio=0.5,
        rank=None,
        light_path="lowrank",
        temperature=1.0,
        gate_noise=0.0,
        balance_weight=0.1,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        selection=None,
        inference_path="masked",
        k_multiple=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not is_integer(filters) or filters <= 0:
            raise ValueError(
                "Received an invalid value for `filters`, expected a "
                f"positive integer. Received: filters={filters!r}"
            )
        kernel_size = _pair(kernel_size, "kernel_size")
        strides = _pair(strides, "strides")
        dilation_rate = _pair(dilation_rate, "dilation_rate")
        if max(strides) > 1 and max(dilation_rate) > 1:
            raise ValueError(
                "Received an invalid combination of `strides` and "
                "`dilation_rate`: `strides > 1` is not supported with "
                f"`dilation_rate > 1`, as in Conv2D. Received: "
                f"strides={strides}, dilation_rate={dilation_rate}"
            )
        if not isinstance(padding, str) or padding.lower() not in PADDINGS:
            raise ValueError(
                "Received an invalid value for `padding`, expected one of "
                f"{PADDINGS}. Received: padding={padding!r}"
            )
        if data_format is None:
            data_format = keras.config.image_data_format()
        if (
            not isinstance(data_format, str)
            or data_format.lower() not in DATA_FORMATS
        ):
            raise ValueError(
                "Received an invalid value for `data_format`, expected None "
                f"or one of {DATA_FORMATS}. "
                f"Received: data_format={data_format!r}"
            )
        self._set_gate_arguments(
            k_ratio=k_ratio,
            rank=rank,
            light_path=light_path,
            temperature=temperature,
            gate_noise=gate_noise,
            balance_weight=balance_weight,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            selection=selection,
            inference_path=inference_path,
            seed=seed,
        )
        if k_multiple is not None and (
            not is_integer(k_multiple) or k_multiple < 1
        ):
            raise ValueError(
                "Received an invalid value for `k_multiple`, expected None or "
                f"a positive integer. Received: k_multiple={k_multiple!r}"
            )
        self.filters = filters
        self.kernel_size = kernel_size
        self.k_multiple = k_multiple
        self.strides = strides
        self.padding = padding.lower()
        self.data_format = data_format.lower()
        self.dilation_rate = dilation_rate
        self.input_spec = keras.layers.InputSpec(ndim=4)

    # --- k (k_ratio and the selection methods: `GatedLayer`) --------------

    @property
    def k(self):
        """Filters on the full path per example: `num_selected(k_ratio,
        filters)`, rounded up to a multiple of `k_multiple` (at most
        `filters`); read-only (set `k_ratio` instead)."""
        k = num_selected(self._k_ratio, self.filters)
        if self.k_multiple:
            k = math.ceil(k / self.k_multiple) * self.k_multiple
        return min(k, self.filters)

    @k.setter
    def k(self, value):
        raise AttributeError(
            f"`k` of layer {self.name} is read-only: it is derived from "
            f"`k_ratio`, `filters` and `k_multiple`. Set `layer.k_ratio` "
            f"instead (in (0, 1]). Received: k={value!r}"
        )

    # --- Weights -----------------------------------------------------------

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    @property
    def _spatial_axes(self):
        return (1, 2) if self.data_format == "channels_last" else (2, 3)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"Layer {self.name} expects 4D inputs, of shape (batch_size, "
                "height, width, channels) for channels_last or (batch_size, "
                "channels, height, width) for channels_first. Received: "
                f"input_shape={input_shape}"
            )
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"Layer {self.name} needs the channel axis of its inputs to "
                f"be defined ({self.data_format}). Received: "
                f"input_shape={input_shape}"
            )
        self.compute_output_shape(input_shape)  # checks the output size
        rank = self.rank or default_conv_rank(
            self.kernel_size, channels, self.filters
        )
        self.effective_rank = rank
        self.input_channels = channels
        self.built_input_shape = tuple(input_shape)
        kernel, bias = self._weight_makers(self.filters)

        window = self.kernel_size + (channels,)
        self.kernel = kernel("kernel", window + (self.filters,))
        self.bias = bias("bias") if self.use_bias else None
        # The gate stays in float32 under mixed precision (`gate_dtype`).
        self.projection = kernel("projection", (channels, rank), False)
        self.gate_kernel = kernel("gate_kernel", (rank, self.filters), False)
        self.gate_bias = bias("gate_bias", regularized=False, autocast=False)
        if self.light_path == "lowrank":
            self.light_conv_kernel = kernel(
                "light_conv_kernel", window + (rank,)
            )
            self.light_kernel = kernel("light_kernel", (rank, self.filters))
            self.light_bias = bias("light_bias") if self.use_bias else None
        else:
            self.light_conv_kernel = None
            self.light_kernel = None
            self.light_bias = None
        self.input_spec = keras.layers.InputSpec(
            ndim=4, axes={self._channel_axis: channels}
        )

    # --- The gate ----------------------------------------------------------

    def gate(self, inputs, training=False):
        """Computes the gate for a batch, without the paths.

        The same computation as in `call`, so `"mask"` is the selection
        `call` makes for these inputs.

        Example:

        >>> layer = keras_midl.MIDLConv2D(8, 3, k_ratio=0.25)
        >>> layer.build((None, 6, 6, 3))
        >>> gate = layer.gate(np.ones((2, 6, 6, 3)))
        >>> keras.ops.convert_to_numpy(gate["mask"]).sum(axis=-1)
        array([2., 2.], dtype=float32)

        Args:
            inputs: 4D tensor, as for `call`.
            training: Whether to add the gate noise before selection.

        Returns:
            Dict with `"logits"` (`s`), `"mask"` (`m`, 0/1, exactly `k`
            ones per example) and `"probabilities"` (`sigmoid(s /
            temperature)`), each of shape `(batch_size, filters)` and
            dtype `gate_dtype`.

        Raises:
            ValueError: If the layer is not built.
        """
        self._require_built("gate()")
        logits, mask = self._gate_outputs(
            ops.convert_to_tensor(inputs), training
        )
        return {
            "logits": logits,
            "mask": mask,
            "probabilities": self._gate_probabilities(logits),
        }

    def _gate_outputs(self, inputs, training):
        """`(logits, mask)` in `gate_dtype`: the inputs rounded to the
        compute dtype (as `call` receives them), then averaged over the
        image, projected and gated in `gate_dtype`."""
        dtype = self.gate_dtype
        inputs = ops.cast(inputs, self.compute_dtype)
        pooled = ops.mean(ops.cast(inputs, dtype), axis=self._spatial_axes)
        code = ops.matmul(pooled, ops.cast(self.projection, dtype))
        logits = ops.matmul(code, ops.cast(self.gate_kernel, dtype))
        logits = ops.add(logits, ops.cast(self.gate_bias, dtype))
        mask = ops.cast(self._select(logits, training), dtype)
        return logits, mask

    # --- The paths ---------------------------------------------------------

    def uses_gathered_path(self, inputs, training=False):
        """Whether a call on `inputs` takes the gathered path: outside
        training, not while torch traces an export, and where
        `keras_midl.ops.gathered_conv.use_gathered_conv` says so for
        `inference_path` and the static batch size."""
        if training or backend.current().exporting():
            return False
        return use_gathered_conv(
            self.inference_path, inputs.shape[0], filters=self.filters
        )

    def call(self, inputs, training=None):
        if not training:
            # An eager call on TensorFlow or JAX runs as one compiled
            # function (op by op, JAX compiled the selection's loop again
            # at every call: 200-770 ms per batch-1 call), traced per
            # input shape: the gathered path needs a static batch size.
            module = backend.current()
            if not module.in_trace(inputs) and not module.exporting():
                compiled = dispatch.compiled_layer_call(
                    self, module, static_shapes=True
                )
                if compiled is not None:
                    return compiled(ops.convert_to_tensor(inputs))
        if self.uses_gathered_path(inputs, training):
            return self._activate(self.gathered_outputs(inputs))
        return self.masked_outputs(inputs, training=training)

    def masked_outputs(self, inputs, training=None):
        """The masked path: every filter's full path, then the mask (the
        training path, and the reference of the gathered one)."""
        logits, mask = self._gate_outputs(inputs, training)
        if training and self.balance_weight > 0:
            self.add_loss(
                balance_loss(
                    mask,
                    self._gate_probabilities(logits),
                    self.k,
                    self.balance_weight,
                )
            )
        outputs = self._interpolate(
            mask,
            logits,
            self._full_path(inputs),
            self._light_path(inputs),
        )
        return self._activate(outputs)

    def gathered_outputs(self, inputs):
        """The gathered path before the activation: each example convolved
        with its `k` selected filters only (`keras_midl.ops.gathered_conv`).
        Needs a static batch size."""
        _, mask = self._gate_outputs(inputs, training=False)
        return gathered_conv(
            inputs,
            self.kernel,
            mask,
            self.k,
            bias=self.bias,
            light=self._light_path(inputs),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
            compute_dtype=self.compute_dtype,
        )

    def _activate(self, outputs):
        if self.activation is None:
            return outputs
        return self.activation(outputs)

    def _conv(self, inputs, kernel):
        return ops.conv(
            ops.cast(inputs, self.compute_dtype),
            backend.current().conv_kernel(kernel),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def _add_bias(self, outputs, bias):
        if bias is None:
            return outputs
        if self.data_format == "channels_last":
            return ops.add(outputs, bias)
        return ops.add(outputs, ops.reshape(bias, (1, self.filters, 1, 1)))

    def _full_path(self, inputs):
        """`conv(x, W) + b` for every filter, in the compute dtype."""
        return self._add_bias(self._conv(inputs, self.kernel), self.bias)

    def _light_path(self, inputs):
        """`conv(x, W_r) U + b_lite`, or `None` with `light_path="zero"`."""
        if self.light_conv_kernel is None:
            return None
        code = self._conv(inputs, self.light_conv_kernel)
        if self.data_format == "channels_last":
            light = ops.matmul(code, self.light_kernel)
        else:
            light = ops.einsum("brhw,rf->bfhw", code, self.light_kernel)
        return self._add_bias(light, self.light_bias)

    def _interpolate(self, mask, logits, full, light):
        """`g * full + (1 - g) * light` with the straight-through gate `g`
        of shape `(batch, filters)` broadcast over the image: its value
        is `where(mask, full, light)` (`straight_through_mix`, on the mask
        and logits broadcast to the output's shape, so that the logits'
        gradient sums over the pixels)."""
        if self.data_format == "channels_last":
            shape = (-1, 1, 1, self.filters)
        else:
            shape = (-1, self.filters, 1, 1)
        mask = ops.reshape(mask, shape)
        logits = ops.reshape(logits, shape)
        if backend.current().exporting():
            # Tracing exporters record no custom gradient (as in MIDL).
            soft = self._gate_probabilities(logits)
            gate = ops.cast(straight_through(mask, soft), self.compute_dtype)
            outputs = gate * full
            return outputs if light is None else outputs + (1 - gate) * light
        full_shape = ops.shape(full)
        return straight_through_mix(
            ops.broadcast_to(mask, full_shape),
            ops.broadcast_to(logits, full_shape),
            full,
            light,
            temperature=self.temperature,
        )

    # --- Shapes, cost, conversion, quantization, config --------------------

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(
                f"Layer {self.name} expects 4D inputs. Received: "
                f"input_shape={input_shape}"
            )
        spatial = (
            input_shape[1:3]
            if self.data_format == "channels_last"
            else input_shape[2:4]
        )
        sizes = tuple(
            _output_size(size, kernel, stride, dilation, self.padding)
            for size, kernel, stride, dilation in zip(
                spatial, self.kernel_size, self.strides, self.dilation_rate
            )
        )
        if any(size is not None and size <= 0 for size in sizes):
            raise ValueError(
                f"Layer {self.name}: the output size would be zero or "
                f"negative. Received: input_shape={input_shape}, "
                f"kernel_size={self.kernel_size}, strides={self.strides}, "
                f"dilation_rate={self.dilation_rate}, "
                f"padding={self.padding!r}"
            )
        if self.data_format == "channels_last":
            return (input_shape[0], *sizes, self.filters)
        return (input_shape[0], self.filters, *sizes)

    def inference_multiply_adds(self, input_shape=None):
        """Multiply-adds per example at inference, on the gathered path.

        The gate `c_in*r + r*filters`, the light path `Ho*Wo*(kh*kw*c_in*r
        + r*filters)` (absent with `light_path="zero"`) and the full path
        of the `k` selected filters `Ho*Wo*kh*kw*c_in*k`. The mean over the
        image that feeds the gate (additions only), bias additions and the
        O(filters) selection are not counted, as for Conv2D's
        `Ho*Wo*kh*kw*c_in*filters`.

        Example:

        >>> layer = keras_midl.MIDLConv2D(16, 3, k_ratio=0.5, rank=2)
        >>> layer.inference_multiply_adds((None, 8, 8, 4))  # Ho = Wo = 6
        14152

        Args:
            input_shape: Input shape, batch axis included (its size is
                ignored); defaults to the shape the layer was built with.

        Raises:
            ValueError: If `input_shape` is not given and the layer is not
                built, or if its height, width or channels are undefined.
        """
        if input_shape is None:
            self._require_built("inference_multiply_adds()")
            input_shape = self.built_input_shape
        input_shape = tuple(input_shape)
        output_shape = self.compute_output_shape(input_shape)
        channels = input_shape[self._channel_axis]
        spatial = (
            output_shape[1:3]
            if self.data_format == "channels_last"
            else output_shape[2:4]
        )
        if channels is None or any(size is None for size in spatial):
            raise ValueError(
                f"Layer {self.name} needs a defined height, width and "
                "channels to count its multiply-adds. Received: "
                f"input_shape={input_shape}"
            )
        r = self.rank or default_conv_rank(
            self.kernel_size, channels, self.filters
        )
        pixels = math.prod(spatial)
        patch = math.prod(self.kernel_size) * channels
        gate = channels * r + r * self.filters
        light = 0
        if self.light_path == "lowrank":
            light = pixels * (patch * r + r * self.filters)
        return gate + light + pixels * patch * self.k

    @classmethod
    def from_conv2d(
        cls, layer, k_ratio=0.5, rank=None, gate_init="lowrank", **kwargs
    ):
        """A built MIDLConv2D layer initialized from a built `Conv2D` layer.

        The full path is the Conv2D layer (`W`, `b`). The light path is the
        truncated SVD of `W` reshaped to `(kh*kw*c_in, filters)`, `W ~ P S
        Q^T`: `W_r = reshape(P_r sqrt(S_r))`, `U = sqrt(S_r) Q_r^T`,
        `b_lite = b`, the best rank-`r` approximation of the convolution.
        With `gate_init="lowrank"` the gate starts as `V = W_r` summed
        over its `kh*kw` taps (so that `p V` is the light code of a
        constant image of value `p`), `G = U`, `c = b`: it picks the
        filters with the largest approximate mean pre-activation.
        Arguments of the convolution (kernel size, strides, padding,
        data format, dilation, activation, bias use, initializers,
        regularizers, constraints, dtype policy) are the Conv2D layer's.

        Example:

        >>> conv = keras.layers.Conv2D(8, 3, activation="relu")
        >>> conv.build((None, 6, 6, 3))
        >>> layer = keras_midl.MIDLConv2D.from_conv2d(conv, k_ratio=1.0)
        >>> x = np.random.rand(2, 6, 6, 3).astype("float32")
        >>> np.allclose(
        ...     keras.ops.convert_to_numpy(layer(x)),
        ...     keras.ops.convert_to_numpy(conv(x)),
        ...     atol=1e-5,
        ... )
        True

        Args:
            layer: A built `keras.layers.Conv2D` (`groups=1`, not
                quantized, no LoRA).
            k_ratio: The layer's `k_ratio`.
            rank: `r`, at most `min(kh*kw*c_in, filters)`; `None` uses
                `default_conv_rank(kernel_size, c_in, filters)`.
            gate_init: `"lowrank"` or `"random"` (this layer's own
                initializers for `V`, `G` and `c`).
            **kwargs: Other MIDLConv2D arguments (`name`, `light_path`,
                `inference_path`, ...), not those taken from `layer`.

        Returns:
            A built `MIDLConv2D` layer.
        """
        return from_conv2d(cls, layer, k_ratio, rank, gate_init, **kwargs)

    def quantize(self, mode=None, type_check=True, config=None):
        """Not supported yet: raises `NotImplementedError`.

        `model.quantize(mode)` catches the error, warns with its message
        and leaves this layer in float (as for any layer that does not
        implement `quantize`); the other layers are quantized.
        """
        raise NotImplementedError(
            f"Layer {self.__class__.__name__} does not support quantization "
            f"yet: int8 (or any mode) is not supported for MIDLConv2D "
            f"('{self.name}' stays in float). Received: mode={mode!r}"
        )

    def get_config(self):
        base_config = super().get_config()
        config = {
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "k_ratio": self.k_ratio,
            "rank": self.rank,
            "light_path": self.light_path,
            "temperature": self.temperature,
            "gate_noise": self.gate_noise,
            "balance_weight": self.balance_weight,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(
                self.activity_regularizer
            ),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "selection": self.selection,
            "inference_path": self.inference_path,
            "k_multiple": self.k_multiple,
            "seed": self.seed,
        }
        return {**base_config, **config}
