"""Analytic inference cost: multiply-adds per example, layer by layer.

The counts are computed from the layers' configurations and shapes, not by a
profiler, so they are the same on every backend. One multiply-add is one
`a * b + c` of a matrix product or convolution. Biases, activations and other
elementwise work (O(size of an activation), not O(size of a weight matrix))
are not counted, as is conventional for FLOPs tables; a FLOP count is about
twice the multiply-add count.

Rules, per example (batch axis excluded):

* `Dense(n)` on inputs `(..., d)`: `rows * d * n`, where `rows` is the
  product of the axes between the batch axis and the last one (1 for a
  `(batch, d)` input; `T` for a `(batch, T, d)` input).
* `MIDL(n)`: `rows * (d*r + 2*r*n + k*d)`, or `rows * (d*r + r*n + k*d)`
  with `light_path="zero"`: the gate, the light path and the full path of
  the `k` selected neurons (see `MIDL.inference_multiply_adds`).
* `MIDLConv2D(filters)`: the gate `c_in*r + r*filters`, the light path
  `Ho*Wo*(kh*kw*c_in*r + r*filters)` (none with `light_path="zero"`) and
  the full path of the `k` selected filters `Ho*Wo*kh*kw*c_in*k` (see
  `MIDLConv2D.inference_multiply_adds`; the mean over the image that feeds
  the gate is additions only, not counted).
* `Conv1D/2D/3D`: `output positions * prod(kernel_size) * c_in / groups *
  c_out`. `DepthwiseConv1D/2D`: `output positions * prod(kernel_size) *
  c_in * depth_multiplier`. `SeparableConv1D/2D`: the depthwise part plus a
  1x1 convolution. `Conv1D/2D/3DTranspose`: `input positions *
  prod(kernel_size) * c_in * c_out`.
* Zero: embedding lookups, pooling (comparisons and additions only),
  normalization (an elementwise scale and shift at inference, foldable into
  the previous layer), activations, dropout and noise (identity at
  inference), reshaping, padding, cropping, merging, rescaling, masking,
  random augmentation, text vectorization and input layers.
* A nested model counts as the sum of its layers.

Any other layer raises a `ValueError` naming its class; add a rule with
`register_multiply_adds` rather than letting it count as zero silently.

The Dense-equivalent count (`dense_equivalent_multiply_adds`,
`dense_multiply_adds`) counts each MIDL layer as the `Dense(units)` it
replaces, `rows * d * n`, each MIDLConv2D layer as the `Conv2D(filters)`
it replaces, and every other layer as above; `flops_fraction`
divides the two model totals.

Example:

>>> model = keras.Sequential([
...     keras.Input((784,)),
...     keras_midl.MIDL(512, k_ratio=0.45, rank=32, activation="relu"),
... ])
>>> keras_midl.flops.model_multiply_adds(model)  # 784*32 + 2*32*512 + 230*784
238176
>>> keras_midl.flops.dense_multiply_adds(model)  # 784*512
401408
"""

import math

import keras

from keras_midl._checks import is_integer
from keras_midl._checks import is_number
from keras_midl.lowrank import default_rank
from keras_midl.midl import MIDL
from keras_midl.midl import num_selected
from keras_midl.midl_conv2d import MIDLConv2D

_ZERO_COST_NAMES = (
    # Inputs, lookups and preprocessing.
    "InputLayer",
    "Embedding",
    "TextVectorization",
    "StringLookup",
    "IntegerLookup",
    "Hashing",
    "CategoryEncoding",
    "Discretization",
    "Normalization",
    "Rescaling",
    "Masking",
    "Identity",
    # Pooling.
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    # Normalization.
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    # Activations.
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    # Regularization (identity at inference).
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    # Reshaping.
    "Flatten",
    "Reshape",
    "Permute",
    "RepeatVector",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    # Merging.
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    # Augmentation (identity at inference).
    "RandomFlip",
    "RandomRotation",
    "RandomTranslation",
    "RandomZoom",
    "RandomContrast",
    "RandomCrop",
    "RandomBrightness",
)

_CUSTOM_RULES = {}


def register_multiply_adds(layer_class, rule):
    """Adds a counting rule for a layer class (and its subclasses).

    Example:

    >>> class Scale(keras.layers.Layer):   # one multiply per feature
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> keras_midl.flops.register_multiply_adds(
    ...     Scale, lambda layer, shape: shape[-1])
    >>> keras_midl.flops.layer_multiply_adds(Scale(), input_shape=(None, 8))
    8

    Args:
        layer_class: A `keras.layers.Layer` subclass.
        rule: Callable `rule(layer, input_shape) -> int` returning the
            multiply-adds per example; `input_shape` includes the batch
            axis (usually `None`).
    """
    if not (
        isinstance(layer_class, type)
        and issubclass(layer_class, keras.layers.Layer)
    ):
        raise ValueError(
            "Expected a keras.layers.Layer subclass for `layer_class`. "
            f"Received: layer_class={layer_class!r}"
        )
    if not callable(rule):
        raise ValueError(
            f"Expected a callable for `rule`. Received: rule={rule!r}"
        )
    _CUSTOM_RULES[layer_class] = rule


def _product(values):
    return int(math.prod(int(value) for value in values))


def _check_defined(layer, shape, what):
    if any(size is None for size in shape):
        raise ValueError(
            f"Cannot count the multiply-adds of layer {layer.name!r} "
            f"({type(layer).__name__}): its {what} shape {tuple(shape)} has "
            "undefined axes besides the batch axis. Build the model with a "
            "fixed input shape."
        )


def _rows_and_depth(layer, input_shape):
    inner = tuple(input_shape[1:])
    if not inner:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) needs an input "
            f"of rank >= 2. Received: input_shape={tuple(input_shape)}"
        )
    _check_defined(layer, inner, "input")
    return _product(inner[:-1]), int(inner[-1])


def _dense(layer, input_shape):
    rows, depth = _rows_and_depth(layer, input_shape)
    return rows * depth * layer.units


def _midl(layer, input_shape):
    rows, depth = _rows_and_depth(layer, input_shape)
    return rows * layer.inference_multiply_adds(depth)


def _midl_conv2d(layer, input_shape):
    _check_defined(layer, tuple(input_shape)[1:], "input")
    return layer.inference_multiply_adds(tuple(input_shape))


def _input_shape(layer, input_shape):
    return tuple(input_shape or _layer_input_shape(layer))


def _channels(layer, input_shape):
    axis = -1 if layer.data_format == "channels_last" else 1
    return int(input_shape[axis])


def _positions(layer, shape):
    spatial = shape[1:-1] if layer.data_format == "channels_last" else shape[2:]
    _check_defined(layer, spatial, "spatial")
    return _product(spatial)


def _conv(layer, input_shape):
    output_shape = layer.compute_output_shape(tuple(input_shape))
    channels_in = _channels(layer, input_shape)
    groups = getattr(layer, "groups", 1)
    return (
        _positions(layer, output_shape)
        * _product(layer.kernel_size)
        * (channels_in // groups)
        * layer.filters
    )


def _conv_transpose(layer, input_shape):
    channels_in = _channels(layer, input_shape)
    return (
        _positions(layer, input_shape)
        * _product(layer.kernel_size)
        * channels_in
        * layer.filters
    )


def _depthwise(layer, input_shape):
    output_shape = layer.compute_output_shape(tuple(input_shape))
    return (
        _positions(layer, output_shape)
        * _product(layer.kernel_size)
        * _channels(layer, input_shape)
        * layer.depth_multiplier
    )


def _separable(layer, input_shape):
    output_shape = layer.compute_output_shape(tuple(input_shape))
    positions = _positions(layer, output_shape)
    middle = _channels(layer, input_shape) * layer.depth_multiplier
    depthwise = positions * _product(layer.kernel_size) * middle
    return depthwise + positions * middle * layer.filters


_RULES = (
    (MIDL, _midl),
    (MIDLConv2D, _midl_conv2d),
    (keras.layers.Dense, _dense),
    (keras.layers.DepthwiseConv1D, _depthwise),
    (keras.layers.DepthwiseConv2D, _depthwise),
    (keras.layers.SeparableConv1D, _separable),
    (keras.layers.SeparableConv2D, _separable),
    (keras.layers.Conv1DTranspose, _conv_transpose),
    (keras.layers.Conv2DTranspose, _conv_transpose),
    (keras.layers.Conv3DTranspose, _conv_transpose),
    (keras.layers.Conv1D, _conv),
    (keras.layers.Conv2D, _conv),
    (keras.layers.Conv3D, _conv),
)


def _zero_cost(layer):
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("keras") and (
            cls.__name__ in _ZERO_COST_NAMES
        ):
            return True
    return False


def _layer_input_shape(layer):
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Cannot find the input shape of layer {layer.name!r} "
            f"({type(layer).__name__}): it has not been called on a symbolic "
            "input. Pass `input_shape`, or use a Sequential or Functional "
            "model built with `keras.Input`."
        ) from error


def layer_multiply_adds(layer, input_shape=None):
    """Inference multiply-adds per example of one built layer.

    See the module docstring for the rule of each layer type. A nested
    model counts as the sum of its layers.

    Example:

    >>> dense = keras.layers.Dense(512)
    >>> keras_midl.flops.layer_multiply_adds(dense, input_shape=(None, 784))
    401408

    Args:
        layer: A `keras.layers.Layer` (or `keras.Model`).
        input_shape: Shape of the layer's input, batch axis included (its
            size is ignored). `None` reads it from the layer's first call on
            a symbolic input (Sequential and Functional models).

    Returns:
        Python int.

    Raises:
        ValueError: for a layer type without a rule, or when the input
            shape is unknown or has undefined non-batch axes.
    """
    if isinstance(layer, keras.Model):
        return model_multiply_adds(layer)
    for layer_class, rule in _CUSTOM_RULES.items():
        if isinstance(layer, layer_class):
            return int(rule(layer, _input_shape(layer, input_shape)))
    if _zero_cost(layer):
        return 0
    for layer_class, rule in _RULES:
        if isinstance(layer, layer_class):
            return int(rule(layer, _input_shape(layer, input_shape)))
    raise ValueError(
        f"No multiply-add rule for layer {layer.name!r} of class "
        f"{type(layer).__name__}. Supported: MIDL, MIDLConv2D, Dense, "
        "convolutions and "
        "the parameter-free layers listed in keras_midl.flops; add one with "
        "`keras_midl.flops.register_multiply_adds`."
    )


def dense_equivalent_multiply_adds(layer, input_shape=None):
    """Multiply-adds per example of one layer with MIDL counted as a `Dense`.

    A MIDL layer counts `rows * d * n`, the cost of the `Dense(units)` it
    replaces, a MIDLConv2D layer the cost of the `Conv2D(filters)` it
    replaces; any other layer counts as in `layer_multiply_adds`. A nested
    model counts as the sum of its layers.

    Example:

    >>> layer = keras_midl.MIDL(512, k_ratio=0.45, rank=32)
    >>> keras_midl.flops.dense_equivalent_multiply_adds(
    ...     layer, input_shape=(None, 7, 784))   # 7 * 784 * 512
    2809856

    Args:
        layer: A `keras.layers.Layer` (or `keras.Model`).
        input_shape: As for `layer_multiply_adds`.

    Returns:
        Python int.
    """
    if isinstance(layer, keras.Model):
        return dense_multiply_adds(layer)
    if isinstance(layer, MIDL):
        return _dense(layer, _input_shape(layer, input_shape))
    if isinstance(layer, MIDLConv2D):
        return _conv(layer, _input_shape(layer, input_shape))
    return layer_multiply_adds(layer, input_shape)


def _counts(model, count):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a keras.Model for `model`. Received: model={model!r}"
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: call it on data or build "
            "it with a fixed input shape first."
        )
    counts = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            for name, inner, value in _counts(layer, count):
                counts.append((f"{layer.name}/{name}", inner, value))
        else:
            counts.append((layer.name, layer, count(layer)))
    return counts


def layer_counts(model, dense_equivalent=False):
    """Multiply-adds per example of each layer of a model, in order.

    Nested models are expanded: their layers appear in place, with names
    prefixed by the nested model's name and `/`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     keras_midl.MIDL(512, k_ratio=0.45, rank=32, name="hidden"),
    ...     keras.layers.Dense(10, name="head"),
    ... ])
    >>> [(name, count) for name, _, count in
    ...  keras_midl.flops.layer_counts(model)]
    [('hidden', 238176), ('head', 5120)]

    Args:
        model: A built Sequential or Functional `keras.Model`.
        dense_equivalent: Whether to count each MIDL layer as the `Dense`
            it replaces (`dense_equivalent_multiply_adds`).

    Returns:
        List of `(name, layer, multiply_adds)` tuples.
    """
    if dense_equivalent:
        return _counts(model, dense_equivalent_multiply_adds)
    return _counts(model, layer_multiply_adds)


def model_multiply_adds(model):
    """Inference multiply-adds per example of a model: the sum over layers.

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        Python int.
    """
    return sum(count for _, _, count in layer_counts(model))


def dense_multiply_adds(model):
    """Multiply-adds per example of `model` with every MIDL made a `Dense`.

    The sum of `dense_equivalent_multiply_adds` over the layers: each MIDL
    layer counts `rows * d * n` instead of `rows * (d*r + 2*r*n + k*d)`.

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        Python int.
    """
    return sum(
        count for _, _, count in layer_counts(model, dense_equivalent=True)
    )


def flops_fraction(model):
    """Inference cost of `model` relative to its all-Dense counterpart.

    `model_multiply_adds(model) / dense_multiply_adds(model)`: below 1 when
    the MIDL layers make the model cheaper (the gate and light path
    included, so `k_ratio=1` gives a fraction above 1). Depends on the
    architecture and `k_ratio` only, not on the weights.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     keras_midl.MIDL(512, k_ratio=0.45, rank=32)])
    >>> keras_midl.flops.flops_fraction(model)   # 238176 / (784 * 512)
    0.5933...

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        Python float.

    Raises:
        ValueError: when the Dense-equivalent count is zero.
    """
    return _divide(
        model_multiply_adds(model),
        dense_multiply_adds(model),
        model,
        "the FLOPs fraction",
    )


def _divide(count, denominator, model, what):
    if denominator == 0:
        raise ValueError(
            f"Model {model.name!r} has zero multiply-adds: {what} is undefined."
        )
    return count / denominator


def _midl_layers(model):
    for layer in model.layers:
        if isinstance(layer, (MIDL, MIDLConv2D)):
            yield layer
        elif isinstance(layer, keras.Model):
            yield from _midl_layers(layer)


def active_fraction(model):
    """Fraction of full-path neurons over all MIDL layers of a model.

    `sum(k) / sum(units)` over the MIDL layers (nested models included;
    `filters` for a MIDLConv2D layer), so wider layers weigh more; 1.0 for
    a model without MIDL layers (every neuron of a Dense layer is active).

    Args:
        model: A `keras.Model`.

    Returns:
        Python float in `(0, 1]`.
    """
    layers = list(_midl_layers(model))
    if not layers:
        return 1.0
    return sum(layer.k for layer in layers) / sum(
        layer.filters if isinstance(layer, MIDLConv2D) else layer.units
        for layer in layers
    )


def flops_ratio(baseline, candidate):
    """How many times cheaper `candidate` is than `baseline` at inference.

    `model_multiply_adds(baseline) / model_multiply_adds(candidate)`: above
    1 when the candidate is cheaper.

    Args:
        baseline: A built `keras.Model`.
        candidate: A built `keras.Model`.

    Returns:
        Python float.
    """
    return _divide(
        model_multiply_adds(baseline),
        model_multiply_adds(candidate),
        candidate,
        "the ratio",
    )


def summary(model, print_fn=None):
    """Prints (and returns) a table of multiply-adds per layer.

    One row per layer (nested models expanded, as in `layer_counts`): its
    inference multiply-adds and its Dense-equivalent count (MIDL counted as
    the `Dense` it replaces), then the totals, the FLOPs fraction and the
    MIDL active fraction (`active_fraction`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     keras_midl.MIDL(512, k_ratio=0.45, rank=32, name="hidden"),
    ...     keras.layers.Dense(10, name="head"),
    ... ])
    >>> _ = keras_midl.flops.summary(model)
    layer   class   multiply-adds   as Dense
    hidden  MIDL          238,176    401,408
    head    Dense           5,120      5,120
    total                 243,296    406,528
    FLOPs fraction: 0.598; MIDL active fraction: 0.449

    Args:
        model: A built Sequential or Functional `keras.Model`.
        print_fn: Callable receiving the table as one string; `print` by
            default. Pass `lambda text: None` to only get the string.

    Returns:
        The table as a string.
    """
    counts = layer_counts(model)
    dense = [count for _, _, count in layer_counts(model, True)]
    rows = [
        (name, type(layer).__name__, f"{count:,}", f"{dense_count:,}")
        for (name, layer, count), dense_count in zip(counts, dense)
    ]
    total = sum(count for _, _, count in counts)
    rows.append(("total", "", f"{total:,}", f"{sum(dense):,}"))
    header = ("layer", "class", "multiply-adds", "as Dense")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row):
        return (
            f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  "
            f"{row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}"
        ).rstrip()

    lines = [line(header), *(line(row) for row in rows)]
    fraction = f"{total / sum(dense):.3f}" if sum(dense) else "undefined"
    lines.append(
        f"FLOPs fraction: {fraction}; "
        f"MIDL active fraction: {active_fraction(model):.3f}"
    )
    text = "\n".join(lines)
    (print_fn or print)(text)
    return text


# Budgets: the cost of a stack of hidden layers, and the widths or k_ratio
# that meet a given cost.


def _check_stack(input_dim, units, output_units):
    if not is_integer(input_dim) or input_dim < 1:
        raise ValueError(
            "Received an invalid value for `input_dim`, expected a positive "
            f"integer. Received: input_dim={input_dim!r}"
        )
    if (
        isinstance(units, (str, bytes))
        or not hasattr(units, "__len__")
        or not units
        or any(not is_integer(u) or u < 1 for u in units)
    ):
        raise ValueError(
            "Received an invalid value for `units`, expected a non-empty "
            f"sequence of positive integers. Received: units={units!r}"
        )
    if output_units is not None and (
        not is_integer(output_units) or output_units < 1
    ):
        raise ValueError(
            "Received an invalid value for `output_units`, expected None or "
            f"a positive integer. Received: output_units={output_units!r}"
        )


def _check_budget(budget):
    if not is_number(budget) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(
            "Received an invalid value for `budget`, expected a positive "
            f"number of multiply-adds. Received: budget={budget!r}"
        )


def _output_cost(units, output_units):
    return 0 if output_units is None else units[-1] * output_units


def dense_stack_multiply_adds(input_dim, units, output_units=None):
    """Multiply-adds per row of a stack of `Dense` layers.

    `sum(d_i * n_i)` over `input_dim -> units[0] -> ... -> units[-1]`, plus
    `units[-1] * output_units` for an output layer whose cost depends on
    the last width.

    Example:

    >>> keras_midl.flops.dense_stack_multiply_adds(784, [512, 256])
    532480

    Args:
        input_dim: Size of the stack's input.
        units: Units of each hidden layer.
        output_units: Units of the layer after the stack (counted), or
            `None`.

    Returns:
        Python int.
    """
    _check_stack(input_dim, units, output_units)
    dims = [int(input_dim), *(int(u) for u in units)]
    return sum(d * n for d, n in zip(dims, dims[1:])) + _output_cost(
        dims[1:], output_units
    )


def midl_stack_multiply_adds(
    input_dim,
    units,
    k_ratio,
    rank=None,
    light_path="lowrank",
    output_units=None,
):
    """Multiply-adds per row of a stack of `MIDL` layers.

    Each layer costs `d*r + r*n + k*d` plus `r*n` for the low-rank light
    path (`MIDL.inference_multiply_adds`), with `k = max(1, round(k_ratio
    * n))` and `r = rank`, or the layer's `default_rank(d, n)` for `None`.

    Example:

    >>> keras_midl.flops.midl_stack_multiply_adds(784, [512, 256], 0.45)
    291264

    Args:
        input_dim: Size of the stack's input.
        units: Units of each hidden layer.
        k_ratio: `k_ratio` of every layer, in `(0, 1]`.
        rank: Rank of every layer, or `None` for each layer's default.
        light_path: `"lowrank"` or `"zero"`.
        output_units: Units of a Dense layer after the stack (counted), or
            `None`.

    Returns:
        Python int.
    """
    _check_stack(input_dim, units, output_units)
    if not is_number(k_ratio) or not 0 < k_ratio <= 1:
        raise ValueError(
            "Received an invalid value for `k_ratio`, expected a number in "
            f"(0, 1]. Received: k_ratio={k_ratio!r}"
        )
    if rank is not None and (not is_integer(rank) or rank < 1):
        raise ValueError(
            "Received an invalid value for `rank`, expected None or a "
            f"positive integer. Received: rank={rank!r}"
        )
    if light_path not in ("lowrank", "zero"):
        raise ValueError(
            "Received an invalid value for `light_path`, expected 'lowrank' "
            f"or 'zero'. Received: light_path={light_path!r}"
        )
    dims = [int(input_dim), *(int(u) for u in units)]
    total = 0
    for d, n in zip(dims, dims[1:]):
        r = rank or default_rank(d, n)
        light = r * n if light_path == "lowrank" else 0
        total += d * r + r * n + light + num_selected(k_ratio, n) * d
    return total + _output_cost(dims[1:], output_units)


def iso_cost_units(input_dim, units, budget, output_units=None):
    """Dense widths proportional to `units` that cost `budget` multiply-adds.

    The answer to "what plain Dense has the same inference cost as my MIDL
    model?": every width is scaled by one factor `s` (and rounded, at
    least 1), and `s` is the largest whose `dense_stack_multiply_adds`
    does not exceed `budget`. Rounding leaves the result at most a few
    multiply-adds per layer below the budget, never above it.

    Example:

    >>> budget = keras_midl.flops.midl_stack_multiply_adds(
    ...     784, [512, 256], k_ratio=0.45, output_units=10)
    >>> keras_midl.flops.iso_cost_units(784, [512, 256], budget,
    ...                                 output_units=10)
    (311, 155)

    Args:
        input_dim: Size of the stack's input.
        units: Widths to scale, one per hidden layer.
        budget: Multiply-adds per row, e.g. `midl_stack_multiply_adds(...)`
            or `model_multiply_adds(model)` less the layers that do not
            change.
        output_units: Units of the layer after the stack, whose cost
            depends on the last width (counted), or `None`.

    Returns:
        Tuple of ints, one width per hidden layer.

    Raises:
        ValueError: for invalid arguments, or a budget below the cost of
            widths of 1.
    """
    _check_stack(input_dim, units, output_units)
    _check_budget(budget)

    def widths(scale):
        return tuple(max(1, round(scale * u)) for u in units)

    def cost(scale):
        return dense_stack_multiply_adds(input_dim, widths(scale),
                                         output_units)

    if cost(0.0) > budget:
        raise ValueError(
            f"A budget of {budget} multiply-adds is below the cheapest Dense "
            f"stack (every width 1, {cost(0.0)} multiply-adds). Received: "
            f"budget={budget!r}"
        )
    low, high = 0.0, 1.0
    while cost(high) <= budget:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle
    return widths(low)


def k_ratio_for_budget(
    input_dim,
    units,
    budget,
    rank=None,
    light_path="lowrank",
    output_units=None,
    step=0.01,
):
    """The largest `k_ratio` of a MIDL stack within `budget` multiply-adds.

    Searched on the grid `step, 2*step, ..., 1` (rounded to the step's
    digits). Use it for a MIDL wider than a Dense at the Dense's cost.

    Example:

    >>> budget = keras_midl.flops.dense_stack_multiply_adds(784, [512, 256])
    >>> keras_midl.flops.k_ratio_for_budget(784, [1024, 512], budget)
    0.3

    Args:
        input_dim: Size of the stack's input.
        units: Units of each MIDL layer.
        budget: Multiply-adds per row.
        rank: As for `midl_stack_multiply_adds`.
        light_path: As for `midl_stack_multiply_adds`.
        output_units: As for `midl_stack_multiply_adds`.
        step: Grid spacing, in `(0, 1]`.

    Returns:
        Python float.

    Raises:
        ValueError: for invalid arguments, or a budget below the cost at
            `k_ratio = step`.
    """
    _check_budget(budget)
    if not is_number(step) or not 0 < step <= 1:
        raise ValueError(
            "Received an invalid value for `step`, expected a number in "
            f"(0, 1]. Received: step={step!r}"
        )
    digits = max(0, -math.floor(math.log10(step))) + 2
    grid = [round(i * step, digits) for i in range(1, int(1 / step + 1e-9)
                                                     + 1)]
    best = None
    for value in grid:
        cost = midl_stack_multiply_adds(input_dim, units, value, rank,
                                        light_path, output_units)
        if cost > budget:
            break
        best = value
    if best is None:
        raise ValueError(
            f"A budget of {budget} multiply-adds is below the cost of MIDL "
            f"layers {list(units)} at k_ratio={grid[0]}. Received: "
            f"budget={budget!r}"
        )
    return best
