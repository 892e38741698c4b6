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

  (`keras_midl.flops.flops_fraction`), where `dense_model` is the same
  model with each MIDL layer replaced by a `Dense` layer of the same units
  (`d*n` per row instead of MIDL's `d*r + 2*r*n + k*d`). KerasTuner sums
  multiple objectives, so the trade-off has to be one metric; use it as
  `objective=keras_tuner.Objective("val_efficiency", "max")`.
* `MIDLHyperModel` wraps a model-building function: it adds the callback to
  every `fit` and, for a function without an `hp` argument, tunes the
  `k_ratio` of every MIDL layer of the model it returns.

Choosing `lam`: a model whose FLOPs fraction is lower by `delta` wins when
its accuracy is lower by less than `lam * delta`. With `lam = 0.1`, halving
the cost (fraction 1.0 -> 0.5) is worth 5 points of accuracy; `lam = 0`
searches for accuracy alone.

Example:

>>> import tempfile
>>> import keras_tuner
>>> import keras_midl.tuning
>>> def build(hp):
...     model = keras.Sequential([
...         keras.Input((8,)),
...         keras_midl.MIDL(
...             32, activation="relu",
...             **keras_midl.tuning.midl_hyperparameters(
...                 hp, k_ratio=(0.25, 1.0), k_ratio_step=0.25)),
...         keras.layers.Dense(2, activation="softmax"),
...     ])
...     model.compile("adam", "sparse_categorical_crossentropy",
...                   metrics=["accuracy"])
...     return model
>>> hypermodel = keras_midl.tuning.MIDLHyperModel(build, lam=0.1)
>>> tuner = keras_tuner.GridSearch(
...     hypermodel, objective=hypermodel.objective, max_trials=2,
...     directory=tempfile.mkdtemp())
>>> x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
>>> y = (x[:, 0] > 0).astype("int32")
>>> tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
>>> [t.hyperparameters.get("k_ratio") for t in tuner.oracle.trials.values()]
[0.25, 0.5]
"""

import decimal
import inspect
import math
import warnings

import keras
import keras_tuner

from keras_midl import flops
from keras_midl._checks import is_finite_number
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
    if not is_finite_number(step) or step <= smallest:
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


def _decimals(value):
    exponent = decimal.Decimal(repr(float(value))).as_tuple().exponent
    return max(0, -exponent)


def k_ratio_grid(k_ratio=(0.1, 1.0), step=0.05, sampling="linear"):
    """The `k_ratio` values a stepped search proposes, rounded.

    Linear sampling gives `min_value + i * step`, rounded to the decimals
    of `min_value` and `step`; logarithmic sampling `min_value * step**i`
    (`"reverse_log"`: mirrored, denser near `max_value`), rounded to 10
    decimals. Values above `max_value` are dropped; `max_value` itself is
    kept when the steps reach it.

    Example:

    >>> keras_midl.tuning.k_ratio_grid((0.2, 1.0), 0.2)
    [0.2, 0.4, 0.6, 0.8, 1.0]
    >>> keras_midl.tuning.k_ratio_grid((0.125, 1.0), 2.0, sampling="log")
    [0.125, 0.25, 0.5, 1.0]

    Args:
        k_ratio: Pair `(min_value, max_value)` with
            `0 < min_value <= max_value <= 1`.
        step: Distance between two values, or a factor `> 1` with
            logarithmic sampling.
        sampling: `"linear"`, `"log"` or `"reverse_log"`.

    Returns:
        List of Python floats in increasing order.
    """
    _validate_k_ratio_range(k_ratio, step, sampling)
    if step is None:
        raise ValueError(
            "`k_ratio_grid` needs a step: a continuous range has no grid. "
            f"Received: step={step!r}"
        )
    low, high = float(k_ratio[0]), float(k_ratio[1])
    if sampling == "linear":
        # (1.0 - 0.1) // 0.1 == 8.0 in floating point: a tolerance far
        # below the step keeps `max_value` on the grid.
        count = int((high - low) / step + 1e-6) + 1
        digits = max(_decimals(low), _decimals(step))
        return [round(low + i * step, digits) for i in range(count)]
    count = int(math.log(high / low, step) + 1e-6) + 1
    if sampling == "log":
        values = [low * step**i for i in range(count)]
    else:
        values = [high + low - low * step**i for i in range(count)]
    return sorted(round(value, 10) for value in values)


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

    With a step, `k_ratio` is searched as a `Choice` among the values of
    `k_ratio_grid` (with the defaults `0.1, 0.15, ..., 1.0`, rounded: `0.6`,
    not `0.6000000000000001`); with `k_ratio_step=None`, as a continuous
    `Float` in `[min_value, max_value]`, a subset of `(0, 1]`. `rank` and
    `gate_noise` are searched only when given a list of candidate values.

    Example:

    >>> import keras_tuner
    >>> hp = keras_tuner.HyperParameters()
    >>> keras_midl.tuning.midl_hyperparameters(
    ...     hp, name="hidden", k_ratio=(0.2, 1.0), k_ratio_step=0.2,
    ...     k_ratio_default=0.6, rank=[8, 16, 32])
    {'k_ratio': 0.6, 'rank': 8}
    >>> hp.space[0].values
    [0.2, 0.4, 0.6, 0.8, 1.0]
    >>> layer = keras_midl.MIDL(
    ...     256, **keras_midl.tuning.midl_hyperparameters(hp, name="hidden"))

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
        k_ratio_sampling: `"linear"`, `"log"` or `"reverse_log"`: how the
            grid is spaced (see `k_ratio_grid`), or how a continuous range
            is sampled.
        k_ratio_default: Value used before the search proposes one (and
            when the hyperparameter is not tuned); one of the grid values
            when there is a step. `None` for `min_value`.
        rank: `None` (the layer's default rank, not searched) or a list of
            positive integers to choose from.
        gate_noise: `None` (no noise, not searched) or a list of
            non-negative floats to choose from.

    Returns:
        Dict of MIDL keyword arguments: `k_ratio`, plus `rank` and
        `gate_noise` when searched.

    Raises:
        ValueError: for a `k_ratio` range outside `(0, 1]`, a `min_value`
            above `max_value`, a step that does not advance, a default off
            the grid, or invalid `rank` / `gate_noise` candidates.
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
        lambda v: is_finite_number(v) and v >= 0,
        "non-negative numbers",
    )

    if low == high:
        value = hp.Fixed(_scoped(name, "k_ratio"), low)
    elif k_ratio_step is None:
        value = hp.Float(
            _scoped(name, "k_ratio"),
            min_value=low,
            max_value=high,
            sampling=k_ratio_sampling,
            default=k_ratio_default,
        )
    else:
        grid = k_ratio_grid(
            (low, high), k_ratio_step, sampling=k_ratio_sampling
        )
        default = grid[0] if k_ratio_default is None else k_ratio_default
        if default not in grid:
            raise ValueError(
                "Received an invalid value for `k_ratio_default`, expected "
                f"None or one of the grid values {grid}. "
                f"Received: k_ratio_default={k_ratio_default!r}"
            )
        # A Choice of rounded values rather than a stepped Float, whose
        # values KerasTuner builds as `min + i * step` and shows as
        # 0.6000000000000001.
        value = hp.Choice(_scoped(name, "k_ratio"), grid, default=default)
    # A continuous range gives arbitrary floats: keep them inside the
    # layer's valid interval, with no more digits than a config needs.
    arguments = {"k_ratio": min(1.0, max(round(float(value), 10), 1e-10))}
    if ranks is not None:
        arguments["rank"] = hp.Choice(_scoped(name, "rank"), ranks)
    if noises is not None:
        arguments["gate_noise"] = hp.Choice(
            _scoped(name, "gate_noise"), [float(v) for v in noises]
        )
    return arguments


class EfficiencyObjective(keras.callbacks.Callback):
    """Logs `accuracy - lam * flops_fraction` at the end of every epoch.

    ```
    logs[name] = logs[accuracy] - lam * keras_midl.flops.flops_fraction(model)
    logs[fraction_name] = keras_midl.flops.flops_fraction(model)
    ```

    Place it before the callbacks that read the objective (KerasTuner's
    checkpointing and trial tracking, `EarlyStopping`, ...);
    `MIDLHyperModel.fit` does. Use it with
    `objective=keras_tuner.Objective(name, "max")` (see `objective`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras_midl.MIDL(32, k_ratio=0.25, rank=2, activation="relu"),
    ...     keras.layers.Dense(2, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy",
    ...               metrics=["accuracy"])
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> efficiency = keras_midl.tuning.EfficiencyObjective(lam=0.1)
    >>> history = model.fit(x, y, validation_data=(x, y), epochs=2,
    ...                     callbacks=[efficiency], verbose=0)
    >>> history.history["flops_fraction"]   # (8*2 + 2*2*32 + 8*8 + 64) / 320
    [0.85, 0.85]
    >>> len(history.history["val_efficiency"])
    2

    Args:
        lam: Non-negative float, the accuracy given up per unit of FLOPs
            fraction saved (see the module docstring).
        accuracy: Name of the logged metric to reward, `"val_accuracy"` by
            default (the model must be compiled with `metrics=["accuracy"]`
            and fit with validation data).
        name: Name of the logged objective.
        fraction_name: Name under which the FLOPs fraction is logged, or
            `None` not to log it.

    Raises:
        ValueError: for a negative or non-finite `lam`, or a `name` or
            `fraction_name` that would overwrite another logged value:
            `accuracy`, each other, or (at the first epoch end) any metric
            the model logs.
    """

    def __init__(
        self,
        lam=0.1,
        accuracy="val_accuracy",
        name="val_efficiency",
        fraction_name="flops_fraction",
    ):
        super().__init__()
        if not is_finite_number(lam) or lam < 0:
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
        if fraction_name is not None and (
            not isinstance(fraction_name, str) or not fraction_name
        ):
            raise ValueError(
                "Received an invalid value for `fraction_name`, expected None "
                "or a non-empty string. "
                f"Received: fraction_name={fraction_name!r}"
            )
        if fraction_name in (accuracy, name):
            raise ValueError(
                "`fraction_name` must differ from `accuracy` and `name`, whose "
                "logged values it would overwrite. Received: "
                f"fraction_name={fraction_name!r}, accuracy={accuracy!r}, "
                f"name={name!r}"
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
        # Metric names are known only once the model has logged them.
        for argument, value in (
            ("name", self.name),
            ("fraction_name", self.fraction_name),
        ):
            if value in logs:
                raise ValueError(
                    f"EfficiencyObjective would overwrite the logged metric "
                    f"{value!r}: choose another `{argument}`. The epoch logs "
                    f"hold {sorted(logs)}. Received: {argument}={value!r}"
                )
        fraction = flops.flops_fraction(self.model)
        logs[self.name] = float(logs[self.accuracy]) - self.lam * fraction
        if self.fraction_name is not None:
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


_SEARCH_SPACE_ARGUMENTS = frozenset(
    inspect.signature(midl_hyperparameters).parameters
) - {"hp", "name"}


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

    >>> import keras_tuner
    >>> def build():   # no hp: the k_ratio of each MIDL layer is searched
    ...     model = keras.Sequential([
    ...         keras.Input((784,)),
    ...         keras_midl.MIDL(256, activation="relu"),
    ...         keras_midl.MIDL(128, activation="relu"),
    ...         keras.layers.Dense(10, activation="softmax"),
    ...     ])
    ...     model.compile("adam", "sparse_categorical_crossentropy",
    ...                   metrics=["accuracy"])
    ...     return model
    >>> hypermodel = keras_midl.tuning.MIDLHyperModel(
    ...     build, lam=0.1,
    ...     search_space={"k_ratio": (0.2, 1.0), "k_ratio_step": 0.2})
    >>> hp = keras_tuner.HyperParameters()
    >>> model = hypermodel.build(hp)
    >>> [(p.name, p.values) for p in hp.space]
    [('midl_0/k_ratio', [0.2, 0.4, 0.6, 0.8, 1.0]),
     ('midl_1/k_ratio', [0.2, 0.4, 0.6, 0.8, 1.0])]

    Pass `hypermodel` and `hypermodel.objective` to any KerasTuner tuner,
    e.g. `keras_tuner.BayesianOptimization(hypermodel,
    objective=hypermodel.objective, max_trials=10)`.

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
        self._takes_hp = _takes_hp(build_model)
        self._warned = False
        self.search_space = dict(search_space or {})
        if "name" in self.search_space:
            raise ValueError(
                "`search_space` cannot set `name`: it is derived from the "
                f"layer order. Received: search_space={search_space!r}"
            )
        unknown = set(self.search_space) - _SEARCH_SPACE_ARGUMENTS
        if unknown:
            raise ValueError(
                f"Unknown `search_space` keys {sorted(unknown)}: expected "
                "arguments of `midl_hyperparameters`, among "
                f"{sorted(_SEARCH_SPACE_ARGUMENTS)}. "
                f"Received: search_space={search_space!r}"
            )
        if self.search_space and self._takes_hp:
            raise ValueError(
                "`search_space` applies only to a `build_model()` without "
                "`hp`: a `build_model(hp)` declares its own search space. "
                f"Received: search_space={search_space!r}"
            )
        # Validates lam and the names now rather than in the first trial.
        self.efficiency = EfficiencyObjective(
            lam=lam, accuracy=accuracy, name=objective_name
        )

    @property
    def objective(self):
        """`keras_tuner.Objective(objective_name, "max")`."""
        return self.efficiency.objective

    def build(self, hp):
        if not self._takes_hp:
            return self._with_tuned_k_ratios(hp, self.build_model())
        model = self.build_model(hp)
        if not self._warned and not any(
            p.name == "k_ratio" or p.name.endswith("/k_ratio") for p in hp.space
        ):
            self._warned = True
            warnings.warn(
                "`build_model(hp)` declared no `k_ratio` hyperparameter "
                f"(declared: {sorted(p.name for p in hp.space)}): the search "
                "will not vary any MIDL layer's k_ratio. Declare it with "
                "`keras_midl.tuning.midl_hyperparameters(hp, ...)`, or pass "
                "a `build_model()` without `hp` to tune every MIDL layer's "
                "k_ratio.",
                stacklevel=2,
            )
        return model

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
