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
  `k_ratio` of every MIDL layer of the model it returns. With a `budget`
  of multiply-adds, a trial whose model costs more fails without being
  trained.
* `budgeted_hyperparameters(hp, input_dim, units, budget, ...)` declares
  a search over the widths (`units` times a multiplier) and the `k_ratio`
  of a MIDL stack that holds only configurations within a budget of
  inference multiply-adds, e.g. the cost of the Dense model to replace
  (`keras_midl.flops.model_multiply_adds(dense_model)`): "the most
  accurate MIDL within my Dense model's cost", searched by any tuner.

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
from keras_midl.midl_conv2d import MIDLConv2D

_SAMPLINGS = ("linear", "log", "reverse_log")


def _check_hp_and_name(hp, name):
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
    _check_hp_and_name(hp, name)
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


def _validate_budget(budget, none_allowed=False):
    if budget is None and none_allowed:
        return
    if not is_finite_number(budget) or budget <= 0:
        expected = "None or a" if none_allowed else "a"
        raise ValueError(
            f"Received an invalid value for `budget`, expected {expected} "
            "positive finite number of multiply-adds per example. "
            f"Received: budget={budget!r}"
        )


def _scaled_units(units, multiplier):
    return tuple(max(1, round(multiplier * u)) for u in units)


def budgeted_hyperparameters(
    hp,
    input_dim,
    units,
    budget,
    width_multipliers=(1.0, 1.5, 2.0, 3.0),
    k_ratio=(0.05, 1.0),
    k_ratio_step=0.05,
    k_ratio_sampling="linear",
    rank=None,
    light_path="lowrank",
    output_units=None,
    name=None,
):
    """Declares a search of MIDL widths and `k_ratio` within a cost budget.

    For a stack of MIDL layers `input_dim -> units[0] -> ... -> units[-1]`
    (and an optional Dense output layer of `output_units`), declares

    * `"width_multiplier"`, a `Choice` among the `width_multipliers` `m`
      for which some `k_ratio` of the grid fits the budget: the layers get
      `max(1, round(m * u))` units (a multiplier giving the same widths as
      an earlier one is left out);
    * for each of them, in a conditional scope active only for that
      multiplier, `"width_x{m}/k_ratio"` (e.g. `"width_x1.5/k_ratio"`), a
      `Choice` of the values of `k_ratio_grid(k_ratio, k_ratio_step,
      k_ratio_sampling)` whose
      `keras_midl.flops.midl_stack_multiply_adds(input_dim, widths,
      k_ratio, rank, light_path, output_units)` is at most `budget`.

    Every configuration of the space is therefore within budget, whichever
    tuner walks it (`GridSearch` runs each one once, `RandomSearch`,
    `BayesianOptimization` and `Hyperband` sample among them), and no
    trial is spent on a model over budget. The budget counts the same
    layers as this function, the stack and (with `output_units`) the
    output layer: `keras_midl.flops.model_multiply_adds(dense_model)` of
    the Dense model `input_dim -> units -> output_units` to replace, less
    the cost of any other layer of the model (preprocessing, layers before
    the stack). Wrap the model-building function in
    `MIDLHyperModel(..., budget=budget)` to check the built models too.

    Example:

    >>> import keras_tuner
    >>> budget = keras_midl.flops.dense_stack_multiply_adds(   # 64-128-10
    ...     64, [128], output_units=10)
    >>> hp = keras_tuner.HyperParameters()
    >>> config = keras_midl.tuning.budgeted_hyperparameters(
    ...     hp, 64, [128], budget, width_multipliers=(1.0, 2.0, 4.0),
    ...     k_ratio=(0.1, 1.0), k_ratio_step=0.1, output_units=10)
    >>> config
    {'units': (128,), 'k_ratio': 0.1}
    >>> [(p.name, p.values) for p in hp.space]   # 4x fits at no k_ratio
    [('width_multiplier', [1.0, 2.0]),
     ('width_x1.0/k_ratio', [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
     ('width_x2.0/k_ratio', [0.1, 0.2, 0.3])]
    >>> units = config.pop("units")
    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     *[keras_midl.MIDL(n, activation="relu", **config) for n in units],
    ...     keras.layers.Dense(10, activation="softmax"),
    ... ])
    >>> keras_midl.flops.model_multiply_adds(model) <= budget
    True

    Args:
        hp: A `keras_tuner.HyperParameters`.
        input_dim: Size of the stack's input.
        units: Units of each MIDL layer at multiplier 1, e.g. those of the
            Dense layers the MIDL layers replace.
        budget: Positive number, the most multiply-adds per example a
            configuration may cost.
        width_multipliers: Positive numbers scaling every width, or `None`
            for `units` alone (`(1.0,)`). Those at which no `k_ratio` fits
            are left out of the search.
        k_ratio: Pair `(min_value, max_value)` with
            `0 < min_value <= max_value <= 1`: the range of the grid.
        k_ratio_step: Distance between two grid values (a factor `> 1`
            with logarithmic sampling); a grid is needed, not `None`.
        k_ratio_sampling: `"linear"`, `"log"` or `"reverse_log"`, as for
            `k_ratio_grid`.
        rank: Rank of every layer, or `None` for each layer's default
            (`keras_midl.lowrank.default_rank`). Not searched.
        light_path: `"lowrank"` or `"zero"`, the layers' light path.
        output_units: Units of a Dense layer after the stack, whose cost
            depends on the last width (counted in the cost), or `None`.
        name: String prefixing the hyperparameter names
            (`"name/width_multiplier"`, `"name/width_x1.0/k_ratio"`), needed
            when several stacks are tuned; `None` for no prefix.

    Returns:
        Dict with `units`, a tuple of the chosen widths, and `k_ratio`, plus
        `rank` when `rank` is given and `light_path` when it is not
        `"lowrank"`: every entry but `units` is a keyword argument of each
        MIDL layer (`MIDL(n, **config)` for `n` in `config.pop("units")`).

    Raises:
        ValueError: for an invalid argument (naming it and its value), or
            a budget below the cost of every configuration.
    """
    _check_hp_and_name(hp, name)
    _validate_budget(budget)
    multipliers = _validate_choices(
        "width_multipliers",
        width_multipliers,
        lambda v: is_finite_number(v) and v > 0,
        "positive numbers",
    )
    if k_ratio_step is None:
        raise ValueError(
            "Received an invalid value for `k_ratio_step`, expected a step: "
            "a budgeted search holds the grid values within budget, and a "
            "continuous range has no grid. Received: k_ratio_step=None"
        )
    grid = k_ratio_grid(k_ratio, k_ratio_step, sampling=k_ratio_sampling)
    # Checks input_dim, units, rank, light_path and output_units, each
    # error naming its argument.
    flops.midl_stack_multiply_adds(
        input_dim, units, 1.0, rank, light_path, output_units
    )

    candidates = [float(m) for m in multipliers or [1.0]]
    feasible = {}  # multiplier -> (widths, k_ratio values within budget)
    seen = set()
    for multiplier in candidates:
        widths = _scaled_units(units, multiplier)
        if widths in seen:
            continue
        seen.add(widths)
        values = [
            value
            for value in grid
            if flops.midl_stack_multiply_adds(
                input_dim, widths, value, rank, light_path, output_units
            )
            <= budget
        ]
        if values:
            feasible[multiplier] = (widths, values)
    if not feasible:
        cheapest = min(
            flops.midl_stack_multiply_adds(
                input_dim,
                _scaled_units(units, multiplier),
                grid[0],
                rank,
                light_path,
                output_units,
            )
            for multiplier in candidates
        )
        raise ValueError(
            f"No configuration fits a budget of {budget} multiply-adds: the "
            f"cheapest, at k_ratio={grid[0]}, costs {cheapest}. Raise the "
            "budget, or add smaller `width_multipliers` or a smaller "
            f"`k_ratio` minimum. Received: budget={budget!r}, "
            f"units={units!r}, width_multipliers={width_multipliers!r}, "
            f"k_ratio={k_ratio!r}"
        )

    parent = _scoped(name, "width_multiplier")
    chosen = hp.Choice(parent, list(feasible))
    config = None
    for multiplier, (widths, values) in feasible.items():
        # KerasTuner declares every scope's hyperparameter (GridSearch and
        # the other oracles walk each one when its multiplier is chosen) and
        # returns None for those of the inactive scopes.
        with hp.conditional_scope(parent, [multiplier]):
            value = hp.Choice(
                _scoped(name, f"width_x{multiplier!r}/k_ratio"), values
            )
        if multiplier == chosen:
            config = {"units": widths, "k_ratio": value}
    if config is None:  # a value set on `hp` by hand, off the Choice
        raise ValueError(
            f"`hp` holds {parent}={chosen!r}, not one of the multipliers "
            f"within budget, {list(feasible)}."
        )
    if rank is not None:
        config["rank"] = rank
    if light_path != "lowrank":
        config["light_path"] = light_path
    return config


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
      Sequential or Functional model: the `k_ratio` of each of its
      top-level MIDL (and MIDLConv2D) layers is then searched with
      `midl_hyperparameters(hp, name, **search_space)`, where `name` is
      `None` for a model with one MIDL layer and `"midl_0"`, `"midl_1"`,
      ... (in layer order) otherwise. The model is rebuilt with the chosen
      values and compiled with the original compile configuration
      (`model.get_compile_config()`).

    `fit` runs `model.fit` with an `EfficiencyObjective` placed first among
    the callbacks, so every epoch logs `objective.name`.

    With a `budget`, `fit` first counts the model's inference cost,
    `keras_midl.flops.model_multiply_adds(model)`, and raises
    `keras_tuner.errors.FailedTrialError` (giving the cost and the budget)
    when it is above: the tuner marks the trial `FAILED` and moves on, and
    the model is never trained. The check is in `fit`, before any
    training, rather than in `build`: a tuner builds the model of the
    default hyperparameter values (and of each conditional scope) when it
    is created, outside any trial, and an error there would stop it. It is
    a safety net, for a `build_model(hp)` that declares its own space or
    for the `k_ratio`s searched in a `build_model()`; KerasTuner stops a
    search with a `RuntimeError` after `max_consecutive_failed_trials`
    (default 3) failed trials in a row, and a failed trial still counts
    towards `max_trials`. Declare the space with `budgeted_hyperparameters`
    so that every trial is within budget.

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

    With a budget, a model over it is not trained:

    >>> hypermodel = keras_midl.tuning.MIDLHyperModel(
    ...     build, lam=0, budget=234_752)   # the cost of the Dense MLP
    >>> hp = keras_tuner.HyperParameters()
    >>> hp.values.update({"midl_0/k_ratio": 1.0, "midl_1/k_ratio": 1.0})
    >>> x = np.zeros((8, 784), "float32")
    >>> hypermodel.fit(hp, hypermodel.build(hp), x, np.zeros(8))
    Traceback (most recent call last):
    FailedTrialError: Model 'sequential...' costs 257264 multiply-adds per
    example, above the budget of 234752 ...

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
        budget: `None`, or a positive number: the most inference
            multiply-adds per example (`keras_midl.flops.model_multiply_adds`)
            of a model that may be trained, e.g. the cost of the Dense model
            to replace.
        name: Name of the hypermodel.
        tunable: Whether the hyperparameters are tunable, as for
            `keras_tuner.HyperModel`.

    Raises:
        ValueError: for a `build_model` that is not callable, an invalid
            `search_space`, `lam`, `accuracy` or `objective_name`, or a
            `budget` that is not a positive finite number.
    """

    def __init__(
        self,
        build_model,
        lam=0.1,
        accuracy="val_accuracy",
        objective_name="val_efficiency",
        search_space=None,
        budget=None,
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
        _validate_budget(budget, none_allowed=True)
        self.budget = budget
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
        layers = [
            layer
            for layer in model.layers
            if isinstance(layer, (MIDL, MIDLConv2D))
        ]
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
            if isinstance(layer, (MIDL, MIDLConv2D)):
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
        if self.budget is not None:
            cost = flops.model_multiply_adds(model)
            if cost > self.budget:
                raise keras_tuner.errors.FailedTrialError(
                    f"Model {model.name!r} costs {cost} multiply-adds per "
                    f"example, above the budget of {self.budget} "
                    "(MIDLHyperModel(budget=...)): the trial is failed "
                    "without training. Declare the search space with "
                    "keras_midl.tuning.budgeted_hyperparameters to keep "
                    "every trial within budget."
                )
        callbacks = [self.efficiency, *(callbacks or [])]
        return model.fit(*args, callbacks=callbacks, **kwargs)
