"""The per-example top-k gate that `MIDL` and `MIDLConv2D` share.

`GatedLayer` holds what the two layers do alike: `k_ratio` and the
selection methods, the gate's dtype and probabilities, the selection (with
the gate noise in training), the creation of their weights and the check
of their shared arguments. Each layer adds its own gate inputs (`x V`, or
the image's mean per channel), its full and light paths, `k` and its
config.
"""

import itertools
import math

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_midl import backend
from keras_midl._checks import is_finite_number
from keras_midl._checks import is_integer
from keras_midl._checks import is_number
from keras_midl.ops import dispatch
from keras_midl.ops.selection import SELECTION_METHODS

LIGHT_PATHS = ("lowrank", "zero")
# Outside training on TensorFlow, `top_k` selects up to this many rows
# (and in traces of an unknown batch size), the bisection above it.
TOP_K_MAX_ROWS = 16
INFERENCE_PATHS = ("auto", "masked", "gathered")


def num_selected(k_ratio, units):
    """`k = max(1, round(k_ratio * units))`, rounding halves up.

    Example:

    >>> keras_midl.gating.num_selected(0.45, 512)
    230
    >>> keras_midl.gating.num_selected(0.5, 5)    # 2.5 rounds up
    3
    """
    return int(min(units, max(1, math.floor(k_ratio * units + 0.5))))


def initializer_for(initializer, index):
    """A copy of `initializer` that gives the weight number `index` its own
    draw.

    Keras initializers are stateless: one instance returns the same values
    on every call, so sharing it between weights of the same shape makes
    them identical (and those of other shapes correlated). An unseeded
    initializer is cloned from its config, which draws a fresh seed; a
    seeded one gets a seed derived from its own and `index`, so the layer
    stays reproducible with distinct weights. An initializer seeded with a
    `keras.random.SeedGenerator` is shared as it is: its generator advances
    at every draw. A plain function is called as it is.
    """
    if not isinstance(initializer, initializers.Initializer):
        return initializer
    if isinstance(
        getattr(initializer, "seed", None), keras.random.SeedGenerator
    ):
        return initializer
    config = initializer.get_config()
    seed = config.get("seed")
    if is_integer(seed):
        config["seed"] = (seed * 1_000_003 + index) % (2**31 - 1)
    return initializer.__class__.from_config(config)


def check_k_ratio(k_ratio):
    if not is_number(k_ratio) or not 0.0 < k_ratio <= 1.0:
        raise ValueError(
            "Received an invalid value for `k_ratio`, expected a float "
            f"in the interval (0, 1]. Received: k_ratio={k_ratio!r}"
        )


def check_gate_arguments(
    k_ratio,
    rank,
    light_path,
    temperature,
    gate_noise,
    balance_weight,
    selection,
    inference_path,
):
    """Validates the arguments that `MIDL` and `MIDLConv2D` share: a
    `ValueError` naming the argument and the value received."""
    check_k_ratio(k_ratio)
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
    if not is_finite_number(temperature) or not temperature > 0:
        raise ValueError(
            "Received an invalid value for `temperature`, expected a "
            f"positive finite float. Received: temperature={temperature!r}"
        )
    if not is_finite_number(gate_noise) or not gate_noise >= 0:
        raise ValueError(
            "Received an invalid value for `gate_noise`, expected a "
            "non-negative finite float. "
            f"Received: gate_noise={gate_noise!r}"
        )
    if not is_finite_number(balance_weight) or not balance_weight >= 0:
        raise ValueError(
            "Received an invalid value for `balance_weight`, expected a "
            "non-negative finite float. "
            f"Received: balance_weight={balance_weight!r}"
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


# The faster `keras.ops` selection per backend for a training step, as
# measured by benchmarks/selection.py; where the native selection runs
# (keras_midl/ops/dispatch.py: training_topk_mask) it takes its place.
# Bisection is 20-32 fused passes under XLA but hundreds of separate
# kernels in PyTorch's eager mode.
FASTEST_SELECTION = {
    "jax": "bisection",
    "tensorflow": "bisection",
    "torch": "top_k",
}



class GatedLayer(keras.layers.Layer):
    """Base of the layers with a learned per-example top-k gate.

    For gate logits `s` (one row per example, one logit per unit or
    filter), the mask is `m = topk_mask(s + noise, k)`, exactly `k` ones
    per row, with `k = num_selected(k_ratio, units)` (`MIDLConv2D` may
    round it up) and the Gaussian `noise` in training only; its
    straight-through gradient comes from `sigmoid(s / temperature)`.

    A subclass passes the shared constructor arguments to
    `_set_gate_arguments` and defines `k`; its weights are made by
    `_weight_makers` in `build`.

    Example:

    >>> layer = keras_midl.MIDL(10, k_ratio=0.5)
    >>> isinstance(layer, keras_midl.gating.GatedLayer), layer.k
    (True, 5)
    >>> layer.k_ratio = 0.2
    >>> layer.k
    2
    """

    # The masked path's selection outside training: `topk_mask`'s
    # signature `(scores, k, method, check_ties_first)`.
    _inference_topk_mask = staticmethod(dispatch.inference_topk_mask)

    def _set_gate_arguments(
        self,
        *,
        k_ratio,
        rank,
        light_path,
        temperature,
        gate_noise,
        balance_weight,
        activation,
        use_bias,
        kernel_initializer,
        bias_initializer,
        kernel_regularizer,
        bias_regularizer,
        kernel_constraint,
        bias_constraint,
        selection,
        inference_path,
        seed,
    ):
        """Validates the constructor arguments the gated layers share
        (`check_gate_arguments`: a `ValueError` naming the argument and
        the value), then sets them, the gate noise's seed generator and
        the cache of compiled calls."""
        check_gate_arguments(
            k_ratio,
            rank,
            light_path,
            temperature,
            gate_noise,
            balance_weight,
            selection,
            inference_path,
        )
        self.k_ratio = k_ratio  # also sets `k` (see the property)
        self.rank = rank
        self.light_path = light_path
        self.temperature = float(temperature)
        self.gate_noise = float(gate_noise)
        self.balance_weight = float(balance_weight)
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
        if self.gate_noise > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self._compiled_calls = dispatch.CompiledCalls()

    @property
    def compiled_calls(self):
        """The compiled inference calls of this layer's eager calls
        (`keras_midl.ops.dispatch`), keyed on what their traces depend on;
        cleared by `quantize` (and `MIDL.enable_lora`)."""
        return self._compiled_calls

    @property
    def k_ratio(self):
        """Fraction of the units (filters) on the full path; settable at
        any time.

        Setting it validates the value as the constructor does and updates
        `k` and `get_config()` together (no weight depends on `k`). Code
        already traced keeps the `k` it was traced with: after changing
        `k_ratio` between `fit` calls, call `model.compile(...)` again so
        that compiled training and prediction functions are rebuilt.
        """
        return self._k_ratio

    @k_ratio.setter
    def k_ratio(self, value):
        check_k_ratio(value)
        self._k_ratio = float(value)

    @property
    def selection_method(self):
        """The training selection method (`selection`, or the backend's
        fastest)."""
        if self.selection is not None:
            return self.selection
        return FASTEST_SELECTION.get(keras.backend.backend(), "top_k")

    def inference_selection_method(self, rows=None):
        """The selection method outside training, for `rows` input rows
        (`None`: not known statically).

        `selection` if set, else the backend's, except on TensorFlow for
        an unknown batch size (an export's traces) or at most
        `TOP_K_MAX_ROWS` rows: `"top_k"` there, which ONNX converters
        accept (they reject the bisection's bitcasts) and which costs no
        more at small batches; the bisection for larger static batches
        (at 256 rows of 4096 logits it took 25 ms against `top_k`'s 48 ms
        here). Both give the same masks.
        """
        if self.selection is not None:
            return self.selection
        if keras.backend.backend() == "tensorflow" and (
            rows is None or rows <= TOP_K_MAX_ROWS
        ):
            return "top_k"
        return self.selection_method

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"Layer {self.name} is not built yet, so `{method}` has no "
                "weights to use. Call the layer on inputs, or call "
                "`layer.build(input_shape)`, first."
            )

    def _weight_makers(self, units):
        """`(kernel, bias)`: functions that add this layer's weights, each
        with its own draw of the initializer (`initializer_for`), in the
        order they are called.

        `kernel(name, shape, autocast=True)` uses the kernel initializer,
        regularizer and constraint; `bias(name, regularized=True,
        autocast=True)` adds a `(units,)` weight with the bias ones (no
        regularizer or constraint where `regularized` is false).
        """
        weight_index = itertools.count()

        def kernel(name, shape, autocast=True):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer_for(
                    self.kernel_initializer, next(weight_index)
                ),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
                autocast=autocast,
            )

        def bias(name, regularized=True, autocast=True):
            return self.add_weight(
                name=name,
                shape=(units,),
                initializer=initializer_for(
                    self.bias_initializer, next(weight_index)
                ),
                regularizer=self.bias_regularizer if regularized else None,
                constraint=self.bias_constraint if regularized else None,
                autocast=autocast,
            )

        return kernel, bias

    @property
    def gate_dtype(self):
        """dtype of the gate: `"float64"` for a float64 layer, else
        `"float32"` (also under 16-bit and mixed policies)."""
        dtype = keras.backend.standardize_dtype(self.variable_dtype)
        return "float64" if dtype == "float64" else "float32"

    def _gate_probabilities(self, logits):
        """`sigmoid(s / temperature)`, whose gradient the mask takes."""
        if self.temperature == 1.0:  # the same values, one pass fewer
            return ops.sigmoid(logits)
        return ops.sigmoid(logits / self.temperature)

    def _select(self, logits, training):
        """The 0/1 mask of the `k` largest logits of each row (with the
        gate noise added in training), float32."""
        scores = logits
        if training and self.gate_noise > 0:
            scores = scores + self.gate_noise * keras.random.normal(
                ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator
            )
        if training:
            # XLA-compiled on TensorFlow (keras_midl/backend/tensorflow.py).
            return dispatch.training_topk_mask(
                scores, self.k, self.selection_method
            )
        return self._inference_topk_mask(
            scores,
            self.k,
            method=self.inference_selection_method(
                dispatch.static_rows(logits)
            ),
            # Not while torch traces: `torch.jit.trace` would freeze the
            # branch it sees.
            check_ties_first=not backend.current().exporting(),
        )
