"""Layouts for sharding MIDL weights with `keras.distribution`."""

MIDL_WEIGHT_AXES = {
    "kernel": ("model", None),
    "bias": ("model",),
    "projection": (None, None),
    "gate_kernel": (None, "model"),
    "gate_bias": ("model",),
    "light_kernel": (None, "model"),
    "light_bias": ("model",),
}


def midl_layouts(layer_name="midl[^/]*", model_axis="model"):
    """Layout entries that shard MIDL layers along their units axis.

    The full-path kernel `W^T` has shape `(units, input_dim)`, so it is
    split along axis 0; the gate and light kernels, of shape
    `(rank, units)`, along axis 1; the biases along their only axis. The
    projection `V`, of shape `(input_dim, rank)`, is small and has no units
    axis: it is replicated. Each device then holds the weights of
    `units / model_axis_size` neurons, as for a column-sharded `Dense`. The
    top-k selection needs whole rows of gate logits; XLA gathers them
    across the model axis by itself.

    The keys are regular expressions matched against `variable.path`
    (e.g. `"sequential/midl/kernel"`), as `keras.distribution.LayoutMap`
    expects; the values are axis-name tuples, which `LayoutMap` turns into
    `TensorLayout`s.

    Example:

    >>> layouts = keras_midl.distribution.midl_layouts()
    >>> layouts["(.*/)?midl[^/]*/kernel"]
    ('model', None)
    >>> layouts["(.*/)?midl[^/]*/gate_kernel"]
    (None, 'model')

    On a backend with `keras.distribution` (JAX, TensorFlow), with 8
    devices:

    ```python
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map.update(keras_midl.distribution.midl_layouts())
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    ```

    Args:
        layer_name: Regular expression matching the names of the MIDL
            layers to shard (the last path component before the weight
            name). The default matches Keras's automatic names `midl`,
            `midl_1`, ...
        model_axis: Name of the device-mesh axis to shard the units over.

    Returns:
        Dict mapping a regular expression per MIDL weight to its axis
        names.
    """
    if not isinstance(layer_name, str) or not layer_name:
        raise ValueError(
            "Received an invalid value for `layer_name`, expected a "
            f"non-empty regular expression. Received: layer_name={layer_name!r}"
        )
    if not isinstance(model_axis, str) or not model_axis:
        raise ValueError(
            "Received an invalid value for `model_axis`, expected the name "
            f"of a device-mesh axis. Received: model_axis={model_axis!r}"
        )
    return {
        f"(.*/)?{layer_name}/{weight}": tuple(
            model_axis if axis == "model" else None for axis in axes
        )
        for weight, axes in MIDL_WEIGHT_AXES.items()
    }
