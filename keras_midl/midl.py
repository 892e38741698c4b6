"""The Matrix-Interpolated Dropout Layer (MID-L)."""

import itertools
import math

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_midl._checks import is_integer
from keras_midl._checks import is_number
from keras_midl.selection import SELECTION_METHODS
from keras_midl.selection import straight_through
from keras_midl.selection import topk_mask

LIGHT_PATHS = ("lowrank", "zero")
INFERENCE_PATHS = ("auto", "masked", "gathered")
# "auto" gathers when an input has at most this many rows (static shapes).
# 0: on the CPUs measured (benchmarks/results/latency.md) the gathered path
# is slower than the masked one on every backend, even for a single row at
# d = n = 4096 and k_ratio 0.45, so "auto" runs the masked path. Raise it to
# 1 on hardware where gathering one row pays off.
GATHERED_MAX_ROWS = 0


def default_rank(input_dim, units, overhead=0.1, max_rank=32):
    """The rank used when `rank=None`: the largest that keeps the gate cheap.

    The gate and the light path cost `r * (d + 2 * n)` multiply-adds per
    row; the default rank is the largest `r <= max_rank` (and at least 1)
    with `r * (d + 2 * n) <= overhead * d * n`. With the default 10% budget
    a layer's inference cost is at most `(k_ratio + 0.1) * d * n`, a FLOPs
    ratio to Dense of at least 1.8 at `k_ratio = 0.45`.

    Example:

    >>> default_rank(784, 512)   # 22 * (784 + 1024) <= 0.1 * 784 * 512
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


def num_selected(k_ratio, units):
    """`k = max(1, round(k_ratio * units))`, rounding halves up."""
    return int(min(units, max(1, math.floor(k_ratio * units + 0.5))))


def _matmul_transposed(inputs, kernel):
    """`inputs @ kernel^T` for a kernel stored as `(units, input_dim)`.

    Computed as `(kernel @ rows^T)^T`: TensorFlow's CPU matmul with a
    transposed right operand (what `matmul(x, transpose(kernel))` and
    `einsum` lower to) runs about 1.7x slower than `x @ W`, while
    transposing the activations instead costs no more than Dense on any
    backend (see the README, "Speed").
    """
    units, input_dim = kernel.shape
    if len(inputs.shape) == 2:
        return ops.transpose(ops.matmul(kernel, ops.transpose(inputs)))
    rows = ops.reshape(inputs, (-1, input_dim))
    outputs = ops.transpose(ops.matmul(kernel, ops.transpose(rows)))
    return ops.reshape(outputs, (*ops.shape(inputs)[:-1], units))


def _initializer_for(initializer, index):
    """A copy of `initializer` that gives the weight number `index` its own
    draw.

    Keras initializers are stateless: one instance returns the same values
    on every call, so sharing it between weights of the same shape makes
    them identical (and those of other shapes correlated). An unseeded
    initializer is cloned from its config, which draws a fresh seed; a
    seeded one gets a seed derived from its own and `index`, so the layer
    stays reproducible with distinct weights.
    """
    config = initializer.get_config()
    seed = config.get("seed")
    if is_integer(seed):
        config["seed"] = (seed * 1_000_003 + index) % (2**31 - 1)
    return initializer.__class__.from_config(config)


def _static_rows(inputs):
    """Number of rows (product of the leading axes), `None` if not static."""
    rows = 1
    for size in inputs.shape[:-1]:
        if size is None:
            return None
        rows *= size
    return rows


@keras.saving.register_keras_serializable(package="keras_midl")
class MIDL(keras.layers.Layer):
    """Matrix-Interpolated Dropout Layer: a Dense layer with learned top-k
    neuron selection.

    For each input row `x` a gate picks the `k` most informative of the
    `units` output neurons. Those get the full transformation `x W + b`; the
    others get a cheap low-rank one, `(x V) U + b_lite`:

    ```
    z      = x V                       # low-rank code, V: (d, r)
    s      = z G + c                   # gate logits,   G: (r, n)
    h_lite = z U + b_lite              # light path,    U: (r, n)
    h_full = x W + b                   # full path,     W: (d, n)
    m      = topk_mask(s + noise, k)   # exactly k ones per row
    a      = sigmoid(s / temperature)
    g      = m + a - stop_gradient(a)  # value m, gradient of a
    output = activation(h_lite + g * (h_full - h_lite))
    ```

    that is `activation(M(x) x + bias)` with the per-input interpolated
    matrix `M(x) = diag(g) W + (I - diag(g)) U V`. The gradient of the mask
    is the straight-through estimate through `sigmoid(s / temperature)`, so
    `V`, `G`, `c`, `U` and `W` all train end to end. With `k_ratio=1` the
    layer computes exactly `activation(x W + b)`, a Dense layer.

    These equations are this project's reading of the paper, whose authors
    published no code.

    Inference multiply-adds per row: `d*r + 2*r*n + k*d` (gate and light
    path included) against `d*n` for Dense, when only the `k` selected
    neurons' full path is computed (`inference_path="gathered"`). The
    masked path computes `x W` for every neuron and saves no time.

    The full-path kernel is stored as `W^T`, of shape `(units, input_dim)`,
    so that the weights of one neuron are one contiguous row: the gathered
    path reads `k` rows. To copy weights from a `Dense` layer, transpose its
    kernel.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     MIDL(512, k_ratio=0.45, activation="relu"),
    ...     keras.layers.Dense(10, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy")

    Args:
        units: Positive integer, dimensionality of the output space.
        k_ratio: Float in `(0, 1]`, fraction of the units computed by the
            full path for each input; `k = max(1, round(k_ratio * units))`.
        rank: Positive integer, rank `r` of the low-rank code shared by the
            gate and the light path. `None` uses `default_rank(d, units)`:
            the largest rank <= 32 whose gate and light path cost at most
            10% of the Dense layer's `d * units` multiply-adds.
        light_path: `"lowrank"` (default) for `h_lite = z U + b_lite`, or
            `"zero"` for `h_lite = 0`: unselected neurons output
            `activation(0)`, a learned input-dependent dropout.
        temperature: Positive float, temperature of the sigmoid whose
            gradient the straight-through estimator uses.
        gate_noise: Non-negative float, standard deviation of Gaussian noise
            added to the gate logits before selection, in training only.
        activation: Activation function, as for `Dense`.
        use_bias: Boolean, whether the full and light paths have biases
            `b` and `b_lite`. The gate bias `c` always exists.
        kernel_initializer: Initializer of `W`, `V`, `G` and `U`.
        bias_initializer: Initializer of `b`, `b_lite` and `c`.
        kernel_regularizer: Regularizer applied to `W`, `V`, `G` and `U`.
        bias_regularizer: Regularizer applied to `b` and `b_lite`.
        activity_regularizer: Regularizer applied to the output.
        kernel_constraint: Constraint applied to `W`, `V`, `G` and `U`.
        bias_constraint: Constraint applied to `b` and `b_lite`.
        selection: How the top-k mask is found: `"top_k"` or
            `"bisection"`; both give the same mask (see
            `keras_midl.selection.topk_mask`). `None` picks the faster one
            for the current backend.
        inference_path: How the full path is computed outside training
            (training always uses the masked path); all give the same
            outputs up to float rounding. `"masked"`: one matmul `x W` for
            all `units`, then the 0/1 mask. `"gathered"`: for each input
            row, gathers the `k` selected rows of `W^T` and computes only
            those `k` dot products; it materializes `rows * k * input_dim`
            weights, so it is meant for one or a few rows. `"auto"`:
            gathered when the input's leading axes hold at most
            `keras_midl.midl.GATHERED_MAX_ROWS` rows (known statically),
            else masked; that is 0 rows (always masked) because, measured
            on CPU, gathering through `keras.ops` is slower than the
            masked path even for one row (README, "Speed").
        seed: Integer, seed of the gate noise.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: Tensor of shape `(..., input_dim)`, rank >= 2.
        training: Python boolean; gate noise is added only when `True`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Mixed precision: the gate (`G`, `c`, the logits, the selection and the
    sigmoid) is computed in float32 whatever the compute dtype, so the
    selection sees no float16 overflow or bfloat16 ties; the paths and the
    output are in the compute dtype.

    Non-finite inputs propagate as in `Dense`: a row containing NaN or inf
    gives non-finite outputs for that row. Its NaN gate logits rank lowest,
    so its mask still has exactly `k` ones, and other rows are unaffected.

    Reference:
        Shaeri & Middel, "MID-L: Matrix-Interpolated Dropout Layer with
        Layer-wise Neuron Selection", arXiv:2505.11416.
    """

    def __init__(
        self,
        units,
        k_ratio=0.5,
        rank=None,
        light_path="lowrank",
        temperature=1.0,
        gate_noise=0.0,
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
        seed=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not is_integer(units) or units <= 0:
            raise ValueError(
                "Received an invalid value for `units`, expected a positive "
                f"integer. Received: units={units!r}"
            )
        if not is_number(k_ratio) or not 0.0 < k_ratio <= 1.0:
            raise ValueError(
                "Received an invalid value for `k_ratio`, expected a float "
                f"in the interval (0, 1]. Received: k_ratio={k_ratio!r}"
            )
        if rank is not None and (not is_integer(rank) or rank < 1):
            raise ValueError(
                "Received an invalid value for `rank`, expected a positive "
                f"integer or None. Received: rank={rank!r}"
            )
        if light_path not in LIGHT_PATHS:
            raise ValueError(
                "Received an invalid value for `light_path`, expected one "
                f"of {LIGHT_PATHS}. Received: light_path={light_path!r}"
            )
        if not is_number(temperature) or not temperature > 0:
            raise ValueError(
                "Received an invalid value for `temperature`, expected a "
                f"positive float. Received: temperature={temperature!r}"
            )
        if not is_number(gate_noise) or not gate_noise >= 0:
            raise ValueError(
                "Received an invalid value for `gate_noise`, expected a "
                f"non-negative float. Received: gate_noise={gate_noise!r}"
            )
        if selection is not None and selection not in SELECTION_METHODS:
            raise ValueError(
                "Received an invalid value for `selection`, expected None or "
                f"one of {SELECTION_METHODS}. Received: selection={selection!r}"
            )
        if inference_path not in INFERENCE_PATHS:
            raise ValueError(
                "Received an invalid value for `inference_path`, expected one "
                f"of {INFERENCE_PATHS}. "
                f"Received: inference_path={inference_path!r}"
            )
        self.units = units
        self.k_ratio = float(k_ratio)
        self.rank = rank
        self.light_path = light_path
        self.temperature = float(temperature)
        self.gate_noise = float(gate_noise)
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.selection = selection
        self.inference_path = inference_path
        self.seed = seed
        self.k = num_selected(self.k_ratio, units)
        if self.gate_noise > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    @property
    def selection_method(self):
        """The selection method in use (`selection`, or the backend's)."""
        if self.selection is not None:
            return self.selection
        return _FASTEST_SELECTION.get(keras.backend.backend(), "top_k")

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"Layer {self.name} expects inputs of rank >= 2, of shape "
                f"(batch_size, ..., input_dim). Received: "
                f"input_shape={input_shape}"
            )
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"Layer {self.name} needs the last axis of its inputs "
                "(input_dim) to be defined, e.g. shape (batch_size, 784). "
                f"Received: input_shape={input_shape}"
            )
        rank = self.rank or default_rank(input_dim, self.units)
        self.effective_rank = rank
        self.input_dim = input_dim

        # Each weight gets its own draw (see `_initializer_for`).
        weight_index = itertools.count()

        def kernel(name, shape, autocast=True):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=_initializer_for(
                    self.kernel_initializer, next(weight_index)
                ),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
                autocast=autocast,
            )

        def bias(name, regularized=True, autocast=True):
            return self.add_weight(
                name=name,
                shape=(self.units,),
                initializer=_initializer_for(
                    self.bias_initializer, next(weight_index)
                ),
                regularizer=self.bias_regularizer if regularized else None,
                constraint=self.bias_constraint if regularized else None,
                autocast=autocast,
            )

        self.kernel = kernel("kernel", (self.units, input_dim))
        self.bias = bias("bias") if self.use_bias else None
        self.projection = kernel("projection", (input_dim, rank))
        # The gate stays in float32 under mixed precision (see docstring).
        self.gate_kernel = kernel("gate_kernel", (rank, self.units), False)
        self.gate_bias = bias("gate_bias", regularized=False, autocast=False)
        if self.light_path == "lowrank":
            self.light_kernel = kernel("light_kernel", (rank, self.units))
            self.light_bias = bias("light_bias") if self.use_bias else None
        else:
            self.light_kernel = None
            self.light_bias = None
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def gate_logits(self, code):
        """Gate logits `s = z G + c` in float32, from the low-rank code."""
        code = ops.cast(code, "float32")
        return ops.add(ops.matmul(code, self.gate_kernel), self.gate_bias)

    def gate(self, inputs, training=False):
        """Computes the gate for a batch, without the paths.

        Args:
            inputs: Tensor of shape `(..., input_dim)`.
            training: Whether to add the gate noise before selection.

        Returns:
            Dict with `"logits"` (`s`, float32), `"mask"` (`m`, float32
            0/1, exactly `k` ones per row) and `"probabilities"`
            (`sigmoid(s / temperature)`), each of shape `(..., units)`.
        """
        inputs = ops.cast(inputs, self.compute_dtype)
        code = ops.matmul(inputs, self.projection)
        logits = self.gate_logits(code)
        return {
            "logits": logits,
            "mask": self._select(logits, training),
            "probabilities": ops.sigmoid(logits / self.temperature),
        }

    def _select(self, logits, training):
        scores = logits
        if training and self.gate_noise > 0:
            scores = scores + self.gate_noise * keras.random.normal(
                ops.shape(logits), seed=self.seed_generator
            )
        return topk_mask(scores, self.k, method=self.selection_method)

    def call(self, inputs, training=None):
        code = ops.matmul(inputs, self.projection)
        logits = self.gate_logits(code)
        mask = self._select(logits, training)
        if self.light_kernel is None:
            light = None
        else:
            light = ops.matmul(code, self.light_kernel)
            if self.light_bias is not None:
                light = ops.add(light, self.light_bias)

        if not training and self._use_gathered_path(inputs):
            outputs = self._gathered_outputs(inputs, mask, light)
        else:
            soft = ops.sigmoid(logits / self.temperature)
            gate = ops.cast(straight_through(mask, soft), self.compute_dtype)
            full = _matmul_transposed(inputs, self.kernel)
            if self.bias is not None:
                full = ops.add(full, self.bias)
            # g*full + (1-g)*light rather than light + g*(full - light): a
            # 0/1 gate then returns `full` or `light` exactly.
            outputs = gate * full
            if light is not None:
                outputs = outputs + (1.0 - gate) * light
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _use_gathered_path(self, inputs):
        if self.inference_path != "auto":
            return self.inference_path == "gathered"
        rows = _static_rows(inputs)
        return rows is not None and 1 <= rows <= GATHERED_MAX_ROWS

    def _gathered_outputs(self, inputs, mask, light):
        """Full path for the `k` selected neurons of each row only.

        Gathers the `k` selected rows of `W^T` (contiguous in memory), takes
        their dot products with the row, and scatters the results into the
        light path. Equal to the masked path up to float rounding.

        The gathered weights are materialized: `rows * k * d` values, so
        this path is for a few rows at a time (see `GATHERED_MAX_ROWS`).
        """
        leading_shape = ops.shape(inputs)[:-1]
        rows = ops.reshape(inputs, (-1, self.input_dim))
        row_mask = ops.reshape(mask, (-1, self.units))
        # The mask has exactly k ones per row: any top_k of it finds them.
        _, selected = ops.top_k(row_mask, self.k, sorted=False)
        selected = ops.cast(selected, "int32")
        if _static_rows(inputs) == 1:
            # One (k, d) block and one matrix-vector product in its layout.
            weights = ops.take(self.kernel, selected[0], axis=0)
            values = ops.transpose(ops.matmul(weights, ops.transpose(rows)))
        else:
            weights = ops.take(self.kernel, selected, axis=0)  # (rows, k, d)
            values = ops.einsum("bd,bkd->bk", rows, weights)
        if self.bias is not None:
            values = values + ops.take(self.bias, selected)
        row_ids = ops.broadcast_to(
            ops.arange(ops.shape(rows)[0], dtype="int32")[:, None],
            ops.shape(selected),
        )
        indices = ops.stack([row_ids, selected], axis=-1)
        full = ops.scatter_update(
            ops.zeros(ops.shape(row_mask), self.compute_dtype),
            ops.reshape(indices, (-1, 2)),
            ops.reshape(values, (-1,)),
        )
        outputs = ops.reshape(full, (*leading_shape, self.units))
        if light is not None:
            outputs = outputs + (1.0 - ops.cast(mask, light.dtype)) * light
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def inference_multiply_adds(self, input_dim=None):
        """Multiply-adds per input row at inference: `d*r + 2*r*n + k*d`.

        The gate (`d*r + r*n`), the light path (`r*n`, absent with
        `light_path="zero"`) and the full path of the `k` selected neurons
        (`k*d`). Bias additions and the O(n) selection are not counted, as
        for Dense's `d*n`.
        """
        d = input_dim if input_dim is not None else self.input_dim
        r = self.rank or default_rank(d, self.units)
        light = r * self.units if self.light_path == "lowrank" else 0
        return d * r + r * self.units + light + self.k * d

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "k_ratio": self.k_ratio,
            "rank": self.rank,
            "light_path": self.light_path,
            "temperature": self.temperature,
            "gate_noise": self.gate_noise,
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
            "seed": self.seed,
        }
        return {**base_config, **config}


# The faster selection per backend (benchmarks/results/selection.md): MLP
# 784-512-256-10 training step MIDL/Dense, top_k vs bisection: TensorFlow
# 1.89x vs 1.81x, JAX 2.13x vs 1.57x, PyTorch 1.69x vs 2.75x. Bisection is
# 32 fused passes under XLA but ~200 separate kernels in PyTorch's eager mode.
_FASTEST_SELECTION = {
    "jax": "bisection",
    "tensorflow": "bisection",
    "torch": "top_k",
}
