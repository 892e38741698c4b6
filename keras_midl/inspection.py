"""Inspecting MIDL gates: masks, logits and selection frequencies."""

import dataclasses

import keras
import numpy as np

from keras_midl.midl import MIDL
from keras_midl.midl_conv2d import MIDLConv2D

# The layers whose gates are reported.
GATED_LAYERS = (MIDL, MIDLConv2D)


@dataclasses.dataclass(frozen=True)
class GateStatistics:
    """What the gate of one MIDL (or MIDLConv2D) layer did on a batch.

    For a MIDLConv2D layer the rows are the examples and the units its
    filters: one selection per example.

    Attributes:
        layer_name: Name of the MIDL layer.
        logits: Gate logits `s`, NumPy float32 array of shape
            `(..., units)` (`(batch, filters)` for MIDLConv2D).
        mask: The top-k selection `m`, 0/1 float32 array of the same shape.
        selection_frequency: Float array of shape `(units,)`: the fraction
            of rows for which each neuron took the full path.
        active_fraction: `k / units`, the fraction of full-path neurons per
            row.
    """

    layer_name: str
    logits: np.ndarray
    mask: np.ndarray
    selection_frequency: np.ndarray
    active_fraction: float

    @property
    def dead_neurons(self):
        """Indices of neurons never selected on this batch."""
        return np.flatnonzero(self.selection_frequency == 0)

    @property
    def always_on_neurons(self):
        """Indices of neurons selected for every row of this batch."""
        return np.flatnonzero(self.selection_frequency == 1)


def _empty_batch_error(shape):
    return ValueError(
        "gate_statistics needs at least one input row: selection "
        "frequencies are undefined on an empty batch. Received inputs of "
        f"shape {shape}"
    )


def _check_not_empty(inputs):
    """Rejects array inputs (or nested structures of them) with no rows."""
    for value in keras.tree.flatten(inputs):
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0 and shape[0] == 0:
            raise _empty_batch_error(tuple(shape))


def _layer_statistics(layer, layer_inputs):
    gate = layer.gate(layer_inputs, training=False)
    mask = keras.ops.convert_to_numpy(
        keras.ops.cast(gate["mask"], "float32")
    )
    if isinstance(layer, MIDLConv2D):
        units = layer.filters
        if mask.size == 0:
            raise _empty_batch_error(tuple(layer_inputs.shape))
    else:
        units = layer.units
        if mask.size == 0:
            raise _empty_batch_error((*mask.shape[:-1], layer.input_dim))
    return GateStatistics(
        layer_name=layer.name,
        logits=keras.ops.convert_to_numpy(gate["logits"]),
        mask=mask,
        selection_frequency=mask.reshape(-1, units).mean(axis=0),
        active_fraction=layer.k / units,
    )


def gate_statistics(model_or_layer, inputs, batch_size=None):
    """Runs a batch through a model once and reports every MIDL gate
    (MIDL and MIDLConv2D layers).

    For a Sequential or Functional model, one forward pass computes the
    inputs of all its MIDL layers (the layers after the last MIDL layer are
    not run), then each layer's gate is evaluated on them. For a single
    `MIDL` layer, `inputs` are that layer's own inputs.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras_midl.MIDL(16, k_ratio=0.25, name="midl"),
    ...     keras.layers.Dense(2),
    ... ])
    >>> x = np.random.default_rng(0).normal(size=(32, 8))
    >>> stats = keras_midl.gate_statistics(model, x)
    >>> stats["midl"].selection_frequency.shape
    (16,)
    >>> float(stats["midl"].selection_frequency.sum())  # k = 4 per row
    4.0

    Args:
        model_or_layer: A built Sequential or Functional `keras.Model`, or a
            `MIDL` layer.
        inputs: Model (or layer) inputs for the batch, as accepted by
            `model.predict`.
        batch_size: Passed to `predict` for the forward pass.

    Returns:
        A dict mapping each MIDL layer's name to its `GateStatistics`.

    Raises:
        ValueError: If `model_or_layer` is neither a Sequential or
            Functional model with a MIDL layer nor a built MIDL layer, or
            if `inputs` has no rows (an empty batch).
    """
    _check_not_empty(inputs)
    if isinstance(model_or_layer, GATED_LAYERS):
        stats = _layer_statistics(model_or_layer, inputs)
        return {stats.layer_name: stats}
    model = model_or_layer
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a keras.Model or a MIDL layer for `model_or_layer`. "
            f"Received: model_or_layer={model!r}"
        )
    layers = [
        layer for layer in model.layers if isinstance(layer, GATED_LAYERS)
    ]
    if not layers:
        raise ValueError(
            f"Model {model.name} has no MIDL layer at its top level. "
            "Pass a MIDL layer directly to inspect a nested one."
        )
    try:
        model_inputs = model.inputs
        layer_inputs = [layer.input for layer in layers]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "gate_statistics needs a built Sequential or Functional model, "
            f"whose layers' inputs are known. Model {model.name} is not one "
            "(a subclassed model?): call it on data first, or use "
            "`gate_statistics(layer, layer_inputs)` on each MIDL layer."
        ) from error
    probe = keras.Model(model_inputs, layer_inputs)
    outputs = probe.predict(inputs, batch_size=batch_size, verbose=0)
    if len(layers) == 1:
        outputs = [outputs]
    return {
        layer.name: _layer_statistics(layer, layer_input)
        for layer, layer_input in zip(layers, outputs)
    }
