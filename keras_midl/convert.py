"""From a trained Dense model to a MIDL one: `convert` and its helpers.

Each chosen Dense layer becomes `MIDL.from_dense` of it: the Dense layer
as the full path, its truncated SVD as the light path and the gate's start
(`keras_midl.lowrank`). Conv2D layers, when asked for (`layer_types` or
`layers`), become `MIDLConv2D.from_conv2d` of them in the same way.
`benchmarks/convert.py` compares that gate with a random one.

With `k_ratio=1` every neuron takes the full path and the converted model
predicts what the original does, up to float rounding.
"""

import keras

from keras_midl.lowrank import check_conv2d
from keras_midl.lowrank import check_dense
from keras_midl.midl import MIDL
from keras_midl.midl_conv2d import MIDLConv2D

TRAINABLE = ("all", "gate_and_light")
# The layer types `convert` turns into MID-L layers (exact classes).
LAYER_TYPES = {"Dense": keras.layers.Dense, "Conv2D": keras.layers.Conv2D}


def _submodels(model):
    """Yields `model` and every Sequential or Functional model inside it."""
    yield model
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _clonable(layer):
            yield from _submodels(layer)


def _clonable(model):
    return isinstance(model, keras.Sequential) or (
        model.__class__.__name__ == "Functional"
    )


def _output_layers(model):
    """The layers whose outputs are `model`'s outputs, through nested
    models."""
    found = []
    for tensor in model.outputs:
        history = tensor._keras_history
        operation = history.operation
        while isinstance(operation, keras.Model) and _clonable(operation):
            history = operation.outputs[history.tensor_index]._keras_history
            operation = history.operation
        found.append(operation)
    return found


def set_calibration_trainable(model, trainable="gate_and_light"):
    """Chooses what a calibration `fit` of a converted model trains.

    `"gate_and_light"`: only the MIDL (and MIDLConv2D) layers' gate (`G`,
    `c`), projection (`V`) and light path (`U`, `b_lite`, and `W_r` of a
    MIDLConv2D); the full path (`W`, `b`, the original Dense or Conv2D
    weights) and every other layer are frozen. `"all"`:
    everything trainable (undoes `"gate_and_light"`). Call it before
    `compile`. It sets `trainable` on layers and variables, which is not
    saved with the model.

    Example:

    >>> from keras_midl.convert import set_calibration_trainable
    >>> dense = keras.Sequential([keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
    >>> midl = keras_midl.convert(dense, k_ratio=0.5)
    >>> set_calibration_trainable(midl)
    >>> sorted(v.name for v in midl.trainable_variables)
    ['gate_bias', 'gate_kernel', 'light_bias', 'light_kernel', 'projection']

    Args:
        model: A model containing MIDL layers.
        trainable: `"gate_and_light"` or `"all"`.
    """
    if trainable not in TRAINABLE:
        raise ValueError(
            "Received an invalid value for `trainable`, expected one of "
            f"{TRAINABLE}. Received: trainable={trainable!r}"
        )
    everything = trainable == "all"
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (MIDL, MIDLConv2D)):
            layer.trainable = True
            for variable in (layer.kernel, layer.bias):
                if variable is not None and variable.dtype != "int8":
                    variable.trainable = everything
        elif not list(layer._flatten_layers(include_self=False)):
            layer.trainable = everything


def convert(
    model,
    k_ratio=0.5,
    layers=None,
    rank=None,
    gate_init="lowrank",
    trainable="all",
    layer_types=None,
    conv_kwargs=None,
    **kwargs,
):
    """Returns a copy of a trained model with Dense layers turned into MIDL.

    Each chosen `Dense` layer becomes `MIDL.from_dense(layer, ...)`: same
    `W` and `b` for the full path, the truncated SVD of `W` as the light
    path, and a gate that starts by picking the neurons whose approximate
    pre-activation is largest. Conv2D layers (`groups=1`) become
    `MIDLConv2D.from_conv2d(layer, ...)` where asked for: named in
    `layers`, or with `"Conv2D"` in `layer_types`. Every other layer is
    cloned with its weights; `model` and its weights are left untouched.
    With `k_ratio=1` the copy predicts what `model` does (up to float
    rounding).

    The copy is not compiled. A short `fit` on the training data
    ("calibration", one epoch is usually enough) recovers most of the
    accuracy lost at small `k_ratio`; `trainable="gate_and_light"` trains
    only the gate and the light path (see `set_calibration_trainable`).

    Example:

    >>> dense = keras.Sequential([keras.Input((20,)),
    ...     keras.layers.Dense(64, activation="relu", name="hidden"),
    ...     keras.layers.Dense(3, activation="softmax", name="output")])
    >>> midl = keras_midl.convert(dense, k_ratio=0.5)
    >>> [type(layer).__name__ for layer in midl.layers]
    ['MIDL', 'Dense']
    >>> x = np.random.rand(4, 20).astype("float32")
    >>> same = keras_midl.convert(dense, k_ratio=1.0)
    >>> bool(np.allclose(same.predict(x, verbose=0),
    ...                  dense.predict(x, verbose=0), atol=1e-6))
    True

    Args:
        model: A built Sequential or Functional model (nested Sequential
            and Functional models are searched and converted too).
        k_ratio: `k_ratio` of every MIDL layer.
        layers: Names of the Dense (or Conv2D) layers to convert. `None`:
            every layer of `layer_types` except those that produce the
            model's outputs.
        rank: Rank of every MIDL layer; `None` uses `default_rank(d, n)`
            for each.
        gate_init: `"lowrank"` (`G = U`, `c = b`) or `"random"` (the MIDL
            layer's own initializers).
        trainable: `"all"` or `"gate_and_light"`, passed to
            `set_calibration_trainable`.
        layer_types: The layer types to convert, a tuple of `"Dense"`
            and `"Conv2D"`. `None`: `("Dense",)` where `layers` is `None`
            (Conv2D layers are converted only when asked for), else both:
            the named layers may be of either type.
        conv_kwargs: Optional dict of arguments for the MIDLConv2D layers
            only (`k_multiple`, ...), over `kwargs`.
        **kwargs: Other arguments of the MIDL and MIDLConv2D layers
            (`light_path`, `temperature`, `gate_noise`, `selection`,
            `inference_path`, `seed`).

    Returns:
        A new, uncompiled `keras.Model`.
    """
    if not isinstance(model, keras.Model) or not _clonable(model):
        raise ValueError(
            "`convert` supports Sequential and Functional models. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"The model '{model.name}' is not built: give it an `Input` or "
            "call it on data before converting it."
        )
    if trainable not in TRAINABLE:
        raise ValueError(
            "Received an invalid value for `trainable`, expected one of "
            f"{TRAINABLE}. Received: trainable={trainable!r}"
        )
    if layer_types is None:
        layer_types = ("Dense",) if layers is None else tuple(LAYER_TYPES)
    if isinstance(layer_types, str):
        layer_types = (layer_types,)
    if (
        not isinstance(layer_types, (list, tuple))
        or not layer_types
        or any(name not in LAYER_TYPES for name in layer_types)
    ):
        raise ValueError(
            "Received an invalid value for `layer_types`, expected None or a "
            f"non-empty tuple of {tuple(LAYER_TYPES)}. "
            f"Received: layer_types={layer_types!r}"
        )
    classes = tuple(LAYER_TYPES[name] for name in layer_types)
    type_names = " or ".join(layer_types)
    every_layer = [layer for sub in _submodels(model) for layer in sub.layers]
    candidates = [layer for layer in every_layer if type(layer) in classes]
    if layers is None:
        outputs = {id(layer) for layer in _output_layers(model)}
        chosen = [
            layer
            for layer in candidates
            if id(layer) not in outputs
            and getattr(layer, "groups", 1) == 1
        ]
        if not chosen:
            raise ValueError(
                f"The model '{model.name}' has no {type_names} layer to "
                "convert besides its output layers; name the layers to "
                "convert with `layers=`."
            )
    else:
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(
                "Received an invalid value for `layers`, expected None or a "
                f"non-empty list of layer names. Received: layers={layers!r}"
            )
        by_name = {}
        for layer in every_layer:
            by_name.setdefault(layer.name, []).append(layer)
        candidate_names = sorted({layer.name for layer in candidates})
        missing = [name for name in layers if name not in by_name]
        if missing:
            raise ValueError(
                f"Layers {missing} not found in model '{model.name}'. Its "
                f"{type_names} layers are {candidate_names}. "
                f"Received: layers={layers!r}"
            )
        chosen = []
        for name in layers:
            for layer in by_name[name]:
                if type(layer) not in classes:
                    raise ValueError(
                        f"Layer '{name}' is a {type(layer).__name__}; "
                        f"`convert` turns `keras.layers.{type_names}` layers "
                        "(not subclasses) into MID-L layers. Its "
                        f"{type_names} layers are {candidate_names}. "
                        f"Received: layers={layers!r}"
                    )
                chosen.append(layer)
    chosen_ids = {id(layer) for layer in chosen}
    for layer in chosen:
        if type(layer) is keras.layers.Conv2D:
            check_conv2d(layer)
        else:
            check_dense(layer)
    conv_kwargs = {**kwargs, **(conv_kwargs or {})}

    copied = []

    def clone(layer):
        if id(layer) in chosen_ids and type(layer) is keras.layers.Conv2D:
            return MIDLConv2D.from_conv2d(
                layer,
                k_ratio=k_ratio,
                rank=rank,
                gate_init=gate_init,
                name=layer.name,
                **conv_kwargs,
            )
        if id(layer) in chosen_ids:
            return MIDL.from_dense(
                layer,
                k_ratio=k_ratio,
                rank=rank,
                gate_init=gate_init,
                name=layer.name,
                **kwargs,
            )
        new = layer.__class__.from_config(layer.get_config())
        copied.append((layer, new))
        return new

    converted = keras.models.clone_model(
        model, clone_function=clone, recursive=True
    )
    for old, new in copied:
        # Functional models also hold operations that are not layers (the
        # `not_equal` of an `Embedding(mask_zero=True)`'s mask): no weights.
        if getattr(old, "weights", None):
            new.set_weights(old.get_weights())
    set_calibration_trainable(converted, trainable)
    return converted
