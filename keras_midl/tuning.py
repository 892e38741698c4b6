"""KerasTuner integration: search `k_ratio` (and `rank`, `gate_noise`).

Three pieces, usable together or alone:

* `midl_hyperparameters(hp, ...)` declares the search space of one MIDL
  layer on a `keras_tuner.HyperParameters` and returns the layer arguments.
* `EfficiencyObjective` is a callback that logs, every epoch, one scalar
  trading accuracy against inference cost:

  ```
  efficiency = accuracy - lam * flops_fraction
  flops_fraction = multiply_adds(model) / multiply_adds(dense_model)
  ```

  where `dense_model` is the same model with each MIDL layer replaced by a
  `Dense` layer of the same units (`d*n` per row instead of MIDL's
  `d*r + 2*r*n + k*d`). KerasTuner sums multiple objectives, so the
  trade-off has to be one metric; use it as
  `objective=keras_tuner.Objective("val_efficiency", "max")`.
* `MIDLHyperModel` wraps a model-building function: it adds the callback to
  every `fit` and, for a function without an `hp` argument, tunes the
  `k_ratio` of every MIDL layer of the model it returns.

Choosing `lam`: a model whose FLOPs fraction is lower by `delta` wins when
its accuracy is lower by less than `lam * delta`. With `lam = 0.1`, halving
the cost (fraction 1.0 -> 0.5) is worth 5 points of accuracy; `lam = 0`
searches for accuracy alone.

Example:

>>> def build(hp):
...     model = keras.Sequential([
...         keras.Input((784,)),
...         MIDL(256, activation="relu", **midl_hyperparameters(hp)),
...         keras.layers.Dense(10, activation="softmax"),
...     ])
...     model.compile("adam", "sparse_categorical_crossentropy",
...                   metrics=["accuracy"])
...     return model
>>> hypermodel = MIDLHyperModel(build, lam=0.1)
>>> tuner = keras_tuner.RandomSearch(
...     hypermodel, objective=hypermodel.objective, max_trials=10)
>>> tuner.search(x, y, validation_data=(x_val, y_val), epochs=2)
"""

import inspect
import math

import keras
import keras_tuner

from keras_midl import flops
from keras_midl._checks import is_integer
from keras_midl._checks import is_number
from keras_midl.midl import MIDL

_SAMPLINGS = ("linear", "log", "reverse_log")


def _scoped(name, argument):
    return argument if name is None else f"{name}/{argument}"


def _validate_k_ratio_range(k_ratio, step, sampling):
    if (
        not isinstance(k_ratio, (tuple, list))
        or len(k_ratio) != 2
        or not all(is_number(bound) for bound in k_ratio)
    ):
        raise ValueError(
            "Received an invalid value for `k_ratio`, expected a pair of "
            f"numbers (min_value, max_value). Received: k_ratio={k_ratio!r}"
        )
    low, high = k_ratio
    if not (0.0 < low <= 1.0 and 0.0 < high <= 1.0):
        raise ValueError(
            "Received an invalid value for `k_ratio`, expected both bounds in "
            f"the interval (0, 1]. Received: k_ratio={k_ratio!r}"
        )
    if low > high:
        raise ValueError(
            "Received an invalid value for `k_ratio`, expected min_value <= "
            f"max_value. Received: k_ratio={k_ratio!r}"
        )
    if sampling not in _SAMPLINGS:
        raise ValueError(
            "Received an invalid value for `k_ratio_sampling`, expected one "
            f"of {_SAMPLINGS}. Received: k_ratio_sampling={sampling!r}"
        )
    if step is None:
        return
    # A linear step adds, a log step multiplies: a step of 0 (or <= 1 on a
    # log scale) never advances, a non-finite one yields nothing usable.
    smallest = 1.0 if sampling != "linear" else 0.0
    if not is_number(step) or not math.isfinite(step) or step <= smallest:
        expected = "> 1 (a factor)" if smallest else "> 0"
        raise ValueError(
            f"Received an invalid value for `k_ratio_step`, expected None or "
            f"a finite number {expected} with k_ratio_sampling={sampling!r}. "
            f"Received: k_ratio_step={step!r}"
        )


def _validate_choices(argument, values, is_valid, expected):
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    values = list(values)
    if not values or not all(is_valid(value) for value in values):
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected None or a "
            f"non-empty list of {expected}. Received: {argument}={values!r}"
        )
    if len(set(values)) != len(values):
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected distinct "
            f"values. Received: {argument}={values!r}"
        )
    return values


def midl_hyperparameters(
    hp,
    name=None,
    k_ratio=(0.1, 1.0),
    k_ratio_step=0.05,
    k_ratio_sampling="linear",
    k_ratio_default=None,
    rank=None,
    gate_noise=None,
):
    """Declares the search space of one MIDL layer and returns its arguments.

    `k_ratio` is searched as a float in `[min_value, max_value]`, a subset
    of `(0, 1]`: with the defaults, `0.1, 0.15, ..., 1.0`. `rank` and
    `gate_noise` are searched only when given a list of candidate values.

    Example:

    >>> hp = keras_tuner.HyperParameters()
    >>> midl_hyperparameters(hp, name="hidden", rank=[8, 16, 32])
    {'k_ratio': 0.1, 'rank': 8}
    >>> MIDL(256, **midl_hyperparameters(hp, name="hidden", rank=[8, 16, 32]))

    Args:
        hp: A `keras_tuner.HyperParameters`.
        name: String prefixing the hyperparameter names (`"name/k_ratio"`),
            needed when several layers are tuned; `None` for plain
            `"k_ratio"`, `"rank"`, `"gate_noise"`.
        k_ratio: Pair `(min_value, max_value)` with
            `0 < min_value <= max_value <= 1`.
        k_ratio_step: Distance between two candidate values (a factor
            `> 1` with logarithmic sampling), or `None` for a continuous
            range. Values above `max_value` are never proposed.
        k_ratio_sampling: `"linear"`, `"log"` or `"reverse_log"`.
        k_ratio_default: Value used when the hyperparameter is not tuned;
            `None` for `min_value`.
        rank: `None` (the layer's default rank, not searched) or a list of
            positive integers to choose from.
        gate_noise: `None` (no noise, not searched) or a list of
            non-negative floats to choose from.

    Returns:
        Dict of MIDL keyword arguments: `k_ratio`, plus `rank` and
        `gate_noise` when searched.

    Raises:
        ValueError: for a `k_ratio` range outside `(0, 1]`, a `min_value`
            above `max_value`, a step that does not advance, or invalid
            `rank` / `gate_noise` candidates.
    """
    if not isinstance(hp, keras_tuner.HyperParameters):
        raise ValueError(
            "Expected a keras_tuner.HyperParameters for `hp`. "
            f"Received: hp={hp!r}"
        )
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(
            "Received an invalid value for `name`, expected None or a "
            f"non-empty string. Received: name={name!r}"
        )
    _validate_k_ratio_range(k_ratio, k_ratio_step, k_ratio_sampling)
    low, high = float(k_ratio[0]), float(k_ratio[1])
    if k_ratio_default is not None and (
        not is_number(k_ratio_default) or not low <= k_ratio_default <= high
    ):
        raise ValueError(
            "Received an invalid value for `k_ratio_default`, expected None "
            f"or a number in [{low}, {high}]. "
            f"Received: k_ratio_default={k_ratio_default!r}"
        )
    ranks = _validate_choices(
        "rank", rank, lambda v: is_integer(v) and v >= 1, "positive integers"
    )
    noises = _validate_choices(
        "gate_noise",
        gate_noise,
        lambda v: is_number(v) and math.isfinite(v) and v >= 0,
        "non-negative numbers",
    )

    if low == high:
        value = hp.Fixed(_scoped(name, "k_ratio"), low)
    else:
        # KerasTuner counts linear steps as `(max - min) // step + 1`, and
        # (1.0 - 0.1) // 0.1 == 8.0 in floating point: `max_value` would
        # never be proposed. A margin far below the step restores it.
        margin = k_ratio_step * 1e-6 if k_ratio_step is not None else 0.0
        if k_ratio_sampling != "linear":
            margin = 0.0
        value = hp.Float(
            _scoped(name, "k_ratio"),
            min_value=low,
            max_value=high + margin,
            step=k_ratio_step,
            sampling=k_ratio_sampling,
            default=k_ratio_default,
        )
    # Float steps accumulate rounding (0.1 + 2 * 0.05 = 0.20000000000000004):
    # round, and keep the value inside the layer's valid interval.
    arguments = {"k_ratio": min(1.0, max(round(float(value), 10), 1e-10))}
    if ranks is not None:
        arguments["rank"] = hp.Choice(_scoped(name, "rank"), ranks)
    if noises is not None:
        arguments["gate_noise"] = hp.Choice(
            _scoped(name, "gate_noise"), [float(v) for v in noises]
        )
    return arguments


def _midl_counts(model):
    return [
        (layer, count)
        for _, layer, count in flops.layer_counts(model)
        if isinstance(layer, MIDL)
    ]


def dense_multiply_adds(model):
    """Multiply-adds per example of `model` with every MIDL made a `Dense`.

    Each MIDL layer counts `rows * d * n` (the `Dense(units)` it replaces)
    instead of `rows * (d*r + 2*r*n + k*d)`; other layers count as in
    `keras_midl.flops.model_multiply_adds`.

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        Python int.
    """
    total = flops.model_multiply_adds(model)
    for layer, count in _midl_counts(model):
        per_row = layer.inference_multiply_adds()
        rows = count // per_row
        total += rows * layer.input_dim * layer.units - count
    return total


def flops_fraction(model):
    """Inference cost of `model` relative to its all-Dense counterpart.

    `model_multiply_adds(model) / dense_multiply_adds(model)`: below 1 when
    the MIDL layers make the model cheaper (the gate and light path
    included, so `k_ratio=1` gives a fraction above 1). Depends on the
    architecture and `k_ratio` only, not on the weights.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)), MIDL(512, k_ratio=0.45, rank=32)])
    >>> flops_fraction(model)   # 238176 / (784 * 512)
    0.5933...

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        Python float.
    """
    dense = dense_multiply_adds(model)
    if dense == 0:
        raise ValueError(
            f"Model {model.name!r} has zero multiply-adds: the FLOPs fraction "
            "is undefined."
        )
    return flops.model_multiply_adds(model) / dense


class EfficiencyObjective(keras.callbacks.Callback):
    """Logs `accuracy - lam * flops_fraction` at the end of every epoch.

    ```
    logs[name] = logs[accuracy] - lam * flops_fraction(model)
    logs[fraction_name] = flops_fraction(model)
    ```

    Place it before the callbacks that read the objective (KerasTuner's
    checkpointing and trial tracking, `EarlyStopping`, ...);
    `MIDLHyperModel.fit` does. Use it with
    `objective=keras_tuner.Objective(name, "max")` (see `objective`).

    Example:

    >>> efficiency = EfficiencyObjective(lam=0.1)
    >>> model.fit(x, y, validation_data=(x_val, y_val),
    ...           callbacks=[efficiency])
    >>> model.history.history["val_efficiency"]

    Args:
        lam: Non-negative float, the accuracy given up per unit of FLOPs
            fraction saved (see the module docstring).
        accuracy: Name of the logged metric to reward, `"val_accuracy"` by
            default (the model must be compiled with `metrics=["accuracy"]`
            and fit with validation data).
        name: Name of the logged objective.
        fraction_name: Name under which the FLOPs fraction is logged, or
            `None` not to log it.
    """

    def __init__(
        self,
        lam=0.1,
        accuracy="val_accuracy",
        name="val_efficiency",
        fraction_name="flops_fraction",
    ):
        super().__init__()
        if not is_number(lam) or not math.isfinite(lam) or lam < 0:
            raise ValueError(
                "Received an invalid value for `lam`, expected a finite "
                f"non-negative number. Received: lam={lam!r}"
            )
        for argument, value in (("accuracy", accuracy), ("name", name)):
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"Received an invalid value for `{argument}`, expected a "
                    f"non-empty string. Received: {argument}={value!r}"
                )
        if name == accuracy:
            raise ValueError(
                "`name` must differ from `accuracy`, whose logged value it "
                f"would overwrite. Received: name={name!r}"
            )
        self.lam = float(lam)
        self.accuracy = accuracy
        self.name = name
        self.fraction_name = fraction_name

    @property
    def objective(self):
        """`keras_tuner.Objective(name, "max")`."""
        return keras_tuner.Objective(self.name, "max")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.accuracy not in logs:
            raise ValueError(
                f"EfficiencyObjective needs the metric {self.accuracy!r} in "
                f"the epoch logs, which hold {sorted(logs)}. Compile the "
                "model with metrics=['accuracy'] and fit it with validation "
                "data, or pass the name of a logged metric as `accuracy`."
            )
        fraction = flops_fraction(self.model)
        logs[self.name] = float(logs[self.accuracy]) - self.lam * fraction
        if self.fraction_name:
            logs[self.fraction_name] = fraction


def _takes_hp(build_model):
    try:
        parameters = inspect.signature(build_model).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in parameters
        if p.kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        )
    ]
    return bool(positional)


class MIDLHyperModel(keras_tuner.HyperModel):
    """Makes a model-building function tunable with the efficiency objective.

    `build_model` is either

    * `build_model(hp)`, which declares its own search space (typically with
      `midl_hyperparameters`) and returns a compiled model; or
    * `build_model()`, an unchanged function returning a compiled
      Sequential or Functional model: the `k_ratio` of each of its top-level
      MIDL layers is then searched with `midl_hyperparameters(hp, name,
      **search_space)`, where `name` is `None` for a model with one MIDL
      layer and `"midl_0"`, `"midl_1"`, ... (in layer order) otherwise. The
      model is rebuilt with the chosen values and compiled with the
      original compile configuration (`model.get_compile_config()`).

    `fit` runs `model.fit` with an `EfficiencyObjective` placed first among
    the callbacks, so every epoch logs `objective.name`.

    Example:

    >>> def build():   # no hp: the k_ratio of each MIDL layer is searched
    ...     model = keras.Sequential([
    ...         keras.Input((784,)),
    ...         MIDL(256, activation="relu"),
    ...         keras.layers.Dense(10, activation="softmax"),
    ...     ])
    ...     model.compile("adam", "sparse_categorical_crossentropy",
    ...                   metrics=["accuracy"])
    ...     return model
    >>> hypermodel = MIDLHyperModel(build, lam=0.1)
    >>> tuner = keras_tuner.BayesianOptimization(
    ...     hypermodel, objective=hypermodel.objective, max_trials=10)

    Args:
        build_model: Callable, `build_model(hp)` or `build_model()`,
            returning a compiled `keras.Model`.
        lam: Weight of the FLOPs fraction in the objective; see
            `EfficiencyObjective`.
        accuracy: Name of the logged accuracy metric to reward.
        objective_name: Name of the logged objective.
        search_space: Dict of keyword arguments of `midl_hyperparameters`
            (e.g. `{"k_ratio": (0.2, 1.0), "k_ratio_step": 0.1}`), used only
            for a `build_model()` without `hp`.
        name: Name of the hypermodel.
        tunable: Whether the hyperparameters are tunable, as for
            `keras_tuner.HyperModel`.
    """

    def __init__(
        self,
        build_model,
        lam=0.1,
        accuracy="val_accuracy",
        objective_name="val_efficiency",
        search_space=None,
        name=None,
        tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if not callable(build_model):
            raise ValueError(
                "Expected a callable for `build_model`. "
                f"Received: build_model={build_model!r}"
            )
        self.build_model = build_model
        self.search_space = dict(search_space or {})
        if "name" in self.search_space:
            raise ValueError(
                "`search_space` cannot set `name`: it is derived from the "
                f"layer order. Received: search_space={search_space!r}"
            )
        # Validates lam and the names now rather than in the first trial.
        self.efficiency = EfficiencyObjective(
            lam=lam, accuracy=accuracy, name=objective_name
        )
        self._takes_hp = _takes_hp(build_model)

    @property
    def objective(self):
        """`keras_tuner.Objective(objective_name, "max")`."""
        return self.efficiency.objective

    def build(self, hp):
        if self._takes_hp:
            return self.build_model(hp)
        return self._with_tuned_k_ratios(hp, self.build_model())

    def _with_tuned_k_ratios(self, hp, model):
        layers = [layer for layer in model.layers if isinstance(layer, MIDL)]
        if not layers:
            raise ValueError(
                f"`build_model` returned model {model.name!r} without "
                "top-level MIDL layers: there is no k_ratio to tune. Declare "
                "the search space yourself with build_model(hp)."
            )
        names = {id(layer): f"midl_{i}" for i, layer in enumerate(layers)}
        if len(layers) == 1:
            names = {id(layers[0]): None}

        def clone_layer(layer):
            config = layer.get_config()
            if isinstance(layer, MIDL):
                config.update(
                    midl_hyperparameters(
                        hp, name=names[id(layer)], **self.search_space
                    )
                )
            return layer.__class__.from_config(config)

        tuned = keras.models.clone_model(model, clone_function=clone_layer)
        if model.compiled:
            tuned.compile_from_config(model.get_compile_config())
        return tuned

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        callbacks = [self.efficiency, *(callbacks or [])]
        return model.fit(*args, callbacks=callbacks, **kwargs)
