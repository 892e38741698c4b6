"""Tests of keras_midl.tuning: search space, objective and tiny searches."""

import re
import warnings

import keras
import keras_tuner
import numpy as np
import pytest
from backend_utils import run_layer_test

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl import flops
from keras_midl import tuning
from keras_midl.lowrank import default_rank

INPUT_DIM = 16
UNITS = 32
CLASSES = 2
LAM = 0.3


def _data(rng, rows):
    x = rng.normal(size=(rows, INPUT_DIM)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32")
    return x, y


def _model(k_ratio=0.5):
    model = keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            MIDL(UNITS, k_ratio=k_ratio, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    # Eager steps: tracing or compiling a fresh function per trial costs
    # more than the few steps each trial runs.
    model.compile(
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=True,
    )
    return model


def _expected_fraction(k_ratio):
    """The FLOPs fraction of `_model`, from the design's formula."""
    r = default_rank(INPUT_DIM, UNITS)
    k = max(1, round(k_ratio * UNITS))
    head = UNITS * CLASSES
    midl = INPUT_DIM * r + 2 * r * UNITS + k * INPUT_DIM
    return (midl + head) / (INPUT_DIM * UNITS + head)


class _Recorder(keras.callbacks.Callback):
    """Records every epoch's logs; shared (not copied) across trials."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __deepcopy__(self, memo):
        return self

    def on_epoch_end(self, epoch, logs=None):
        midl = [layer for layer in self.model.layers if isinstance(layer, MIDL)]
        self.records.append((midl[0].k_ratio, dict(logs)))


# --- search space -----------------------------------------------------------


def test_search_space_defaults():
    hp = keras_tuner.HyperParameters()
    arguments = tuning.midl_hyperparameters(hp)
    assert arguments == {"k_ratio": 0.1}
    (space,) = hp.space
    assert space.name == "k_ratio"
    # Every grid value, the maximum included (KerasTuner's float floor
    # division alone would stop at 0.95).
    np.testing.assert_allclose(
        list(space.values), np.linspace(0.1, 1.0, 19), atol=1e-9
    )


@pytest.mark.parametrize(
    "k_ratio, step, sampling, expected",
    [
        ((0.1, 1.0), 0.1, "linear", np.linspace(0.1, 1.0, 10)),
        ((0.25, 1.0), 0.25, "linear", [0.25, 0.5, 0.75, 1.0]),
        ((0.2, 0.9), 0.3, "linear", [0.2, 0.5, 0.8]),
        ((0.125, 1.0), 2.0, "log", [0.125, 0.25, 0.5, 1.0]),
    ],
)
def test_search_space_grid_values(k_ratio, step, sampling, expected):
    hp = keras_tuner.HyperParameters()
    tuning.midl_hyperparameters(
        hp, k_ratio=k_ratio, k_ratio_step=step, k_ratio_sampling=sampling
    )
    values = list(hp.space[0].values)
    np.testing.assert_allclose(values, expected, atol=1e-9)
    # Each value builds a valid layer.
    for value in values:
        hp.values["k_ratio"] = value
        arguments = tuning.midl_hyperparameters(
            hp, k_ratio=k_ratio, k_ratio_step=step, k_ratio_sampling=sampling
        )
        assert 0 < MIDL(8, **arguments).k_ratio <= 1


def test_search_space_rank_noise_and_names():
    hp = keras_tuner.HyperParameters()
    arguments = tuning.midl_hyperparameters(
        hp,
        name="hidden",
        k_ratio=(0.25, 0.75),
        k_ratio_step=0.25,
        k_ratio_default=0.5,
        rank=[4, 8],
        gate_noise=[0.0, 0.1],
    )
    assert arguments == {"k_ratio": 0.5, "rank": 4, "gate_noise": 0.0}
    assert sorted(p.name for p in hp.space) == [
        "hidden/gate_noise",
        "hidden/k_ratio",
        "hidden/rank",
    ]
    # The returned arguments build a layer.
    layer = MIDL(UNITS, **arguments)
    assert (layer.k_ratio, layer.rank, layer.k) == (0.5, 4, 16)


@pytest.mark.parametrize(
    "k_ratio, step, sampling, expected",
    [
        (
            (0.1, 1.0),
            0.1,
            "linear",
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        ),
        (
            (0.15, 0.95),
            0.1,
            "linear",
            [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95],
        ),
        ((0.1, 1.0), 1.5, "log", [0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375]),
        ((0.1, 1.0), 2.0, "reverse_log", [0.3, 0.7, 0.9, 1.0]),
    ],
)
def test_search_space_shows_clean_grid_values(
    k_ratio, step, sampling, expected
):
    # KerasTuner's stepped Float shows 0.30000000000000004 and, with the
    # margin that kept max_value on the grid, 1.0000001.
    assert tuning.k_ratio_grid(k_ratio, step, sampling) == expected
    hp = keras_tuner.HyperParameters()
    tuning.midl_hyperparameters(
        hp, k_ratio=k_ratio, k_ratio_step=step, k_ratio_sampling=sampling
    )
    values = list(hp.space[0].values)
    assert values == expected
    assert [repr(v) for v in values] == [repr(v) for v in expected]
    # What a tuner proposes is what the layer holds and the grid shows.
    for value in values:
        hp.values["k_ratio"] = value
        arguments = tuning.midl_hyperparameters(
            hp, k_ratio=k_ratio, k_ratio_step=step, k_ratio_sampling=sampling
        )
        assert arguments["k_ratio"] == value


def test_search_space_without_step_is_continuous():
    hp = keras_tuner.HyperParameters()
    arguments = tuning.midl_hyperparameters(
        hp, k_ratio=(0.2, 0.8), k_ratio_step=None, k_ratio_default=0.5
    )
    (space,) = hp.space
    assert isinstance(space, keras_tuner.engine.hyperparameters.Float)
    assert (space.min_value, space.max_value, space.step) == (0.2, 0.8, None)
    assert arguments == {"k_ratio": 0.5}
    with pytest.raises(ValueError, match="needs a step"):
        tuning.k_ratio_grid((0.2, 0.8), None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_ratio": (0.25, 0.75), "k_ratio_step": 0.25},
        {"k_ratio_default": 0.5, "rank": [3, 4], "gate_noise": [0.1]},
    ],
)
def test_search_space_arguments_pass_the_layer_test(kwargs):
    hp = keras_tuner.HyperParameters()
    arguments = tuning.midl_hyperparameters(hp, **kwargs)
    layer = run_layer_test(
        MIDL,
        {"units": UNITS, **arguments},
        input_shape=(3, INPUT_DIM),
        expected_output_shape=(3, UNITS),
        expected_num_trainable_weights=7,
    )
    assert layer.k_ratio == arguments["k_ratio"]


def test_search_space_rounds_float_steps():
    hp = keras_tuner.HyperParameters()
    hp.values["k_ratio"] = 0.1 + 2 * 0.05  # 0.20000000000000004
    assert tuning.midl_hyperparameters(hp)["k_ratio"] == 0.2


def test_search_space_single_value_is_fixed():
    hp = keras_tuner.HyperParameters()
    assert tuning.midl_hyperparameters(hp, k_ratio=(1.0, 1.0)) == {
        "k_ratio": 1.0
    }
    assert isinstance(hp.space[0], keras_tuner.engine.hyperparameters.Fixed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_ratio": (0.0, 0.5)}, r"`k_ratio`.*\(0, 1\].*k_ratio=\(0.0, 0.5\)"),
        ({"k_ratio": (0.5, 1.5)}, r"`k_ratio`.*\(0, 1\].*k_ratio=\(0.5, 1.5\)"),
        ({"k_ratio": (-0.2, 0.5)}, r"`k_ratio`.*k_ratio=\(-0.2, 0.5\)"),
        ({"k_ratio": (0.8, 0.2)}, r"min_value <= max_value.*\(0.8, 0.2\)"),
        ({"k_ratio": 0.5}, r"pair of numbers.*k_ratio=0.5"),
        ({"k_ratio": (0.1, 0.5, 0.9)}, r"pair.*k_ratio=\(0.1, 0.5, 0.9\)"),
        ({"k_ratio_step": 0}, r"`k_ratio_step`.*> 0.*k_ratio_step=0"),
        ({"k_ratio_step": -0.1}, r"`k_ratio_step`.*k_ratio_step=-0.1"),
        ({"k_ratio_step": float("nan")}, r"`k_ratio_step`.*k_ratio_step=nan"),
        (
            {"k_ratio_sampling": "log", "k_ratio_step": 1.0},
            r"`k_ratio_step`.*> 1.*k_ratio_step=1.0",
        ),
        ({"k_ratio_sampling": "cubic"}, r"`k_ratio_sampling`.*'cubic'"),
        ({"k_ratio_default": 0.05}, r"`k_ratio_default`.*=0.05"),
        (
            {"k_ratio_default": 0.42},
            r"`k_ratio_default`.*grid values \[0.1, 0.15.*=0.42",
        ),
        ({"rank": [0, 8]}, r"`rank`.*positive integers.*rank=\[0, 8\]"),
        ({"rank": []}, r"`rank`.*non-empty.*rank=\[\]"),
        ({"rank": [8, 8]}, r"`rank`.*distinct.*rank=\[8, 8\]"),
        ({"gate_noise": [-0.1]}, r"`gate_noise`.*gate_noise=\[-0.1\]"),
        ({"name": ""}, r"`name`.*name=''"),
    ],
)
def test_search_space_rejects_invalid_arguments(kwargs, message):
    hp = keras_tuner.HyperParameters()
    with pytest.raises(ValueError, match=message):
        tuning.midl_hyperparameters(hp, **kwargs)
    assert not hp.space


def test_search_space_rejects_non_hyperparameters():
    with pytest.raises(ValueError, match="HyperParameters.*hp=3"):
        tuning.midl_hyperparameters(3)


# --- objective ----------------------------------------------------------------


def test_efficiency_objective_logs_every_epoch(rng):
    x, y = _data(rng, 64)
    model = _model(0.25)
    efficiency = tuning.EfficiencyObjective(lam=LAM)
    history = model.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=2,
        batch_size=32,
        callbacks=[efficiency],
        verbose=0,
    )
    logged = history.history
    assert len(logged["val_efficiency"]) == 2
    fraction = _expected_fraction(0.25)
    np.testing.assert_allclose(logged["flops_fraction"], [fraction] * 2)
    np.testing.assert_allclose(
        logged["val_efficiency"],
        np.array(logged["val_accuracy"]) - LAM * fraction,
        rtol=1e-6,
    )
    assert efficiency.objective.name == "val_efficiency"
    assert efficiency.objective.direction == "max"


def test_efficiency_objective_needs_its_metric(rng):
    x, y = _data(rng, 32)
    with pytest.raises(ValueError, match="'val_accuracy'.*validation data"):
        _model().fit(
            x,
            y,
            epochs=1,
            callbacks=[tuning.EfficiencyObjective()],
            verbose=0,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": -0.1}, r"`lam`.*lam=-0.1"),
        ({"lam": float("inf")}, r"`lam`.*lam=inf"),
        ({"lam": "0.1"}, r"`lam`.*lam='0.1'"),
        ({"accuracy": ""}, r"`accuracy`.*accuracy=''"),
        ({"name": "val_accuracy"}, r"`name` must differ.*'val_accuracy'"),
        # Would make the tuner maximise the FLOPs fraction.
        (
            {"fraction_name": "val_efficiency"},
            r"`fraction_name` must differ.*fraction_name='val_efficiency'",
        ),
        # Would overwrite the accuracy the objective rewards.
        (
            {"fraction_name": "val_accuracy"},
            r"`fraction_name` must differ.*fraction_name='val_accuracy'",
        ),
        (
            {"name": "score", "fraction_name": "score"},
            r"`fraction_name` must differ.*name='score'",
        ),
        ({"fraction_name": ""}, r"`fraction_name`.*fraction_name=''"),
        ({"fraction_name": 3}, r"`fraction_name`.*fraction_name=3"),
    ],
)
def test_efficiency_objective_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tuning.EfficiencyObjective(**kwargs)


@pytest.mark.parametrize(
    "kwargs, overwritten",
    [
        ({"fraction_name": "val_loss"}, "val_loss"),
        ({"fraction_name": "accuracy"}, "accuracy"),
        ({"name": "loss"}, "loss"),
    ],
)
def test_efficiency_objective_rejects_a_logged_metric_name(
    kwargs, overwritten, rng
):
    x, y = _data(rng, 32)
    argument = next(iter(kwargs))
    with pytest.raises(
        ValueError,
        match=f"overwrite the logged metric '{overwritten}'.*`{argument}`",
    ):
        _model().fit(
            x,
            y,
            validation_data=(x, y),
            epochs=1,
            callbacks=[tuning.EfficiencyObjective(**kwargs)],
            verbose=0,
        )


def test_efficiency_objective_without_fraction_logs_only_objective(rng):
    x, y = _data(rng, 32)
    history = _model().fit(
        x,
        y,
        validation_data=(x, y),
        epochs=1,
        callbacks=[tuning.EfficiencyObjective(fraction_name=None)],
        verbose=0,
    )
    assert "val_efficiency" in history.history
    assert "flops_fraction" not in history.history


# --- hypermodel --------------------------------------------------------------


def test_hypermodel_tunes_an_unchanged_build_function():
    def build():
        inputs = keras.Input((INPUT_DIM,))
        hidden = MIDL(UNITS, k_ratio=0.5, activation="relu")(inputs)
        hidden = MIDL(UNITS, k_ratio=0.5, rank=4)(hidden)
        outputs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
        model = keras.Model(inputs, outputs)
        model.compile(
            keras.optimizers.SGD(0.05),
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    hypermodel = tuning.MIDLHyperModel(
        build, search_space={"k_ratio": (0.25, 1.0), "k_ratio_step": 0.25}
    )
    hp = keras_tuner.HyperParameters()
    hp.values.update({"midl_0/k_ratio": 0.75, "midl_1/k_ratio": 0.25})
    model = hypermodel.build(hp)
    assert sorted(p.name for p in hp.space) == [
        "midl_0/k_ratio",
        "midl_1/k_ratio",
    ]
    midl = [layer for layer in model.layers if isinstance(layer, MIDL)]
    assert [layer.k_ratio for layer in midl] == [0.75, 0.25]
    assert [layer.k for layer in midl] == [24, 8]
    assert midl[1].rank == 4  # Other arguments are kept.
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.05)


def test_hypermodel_rejects_a_model_without_midl():
    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    hypermodel = tuning.MIDLHyperModel(build)
    with pytest.raises(ValueError, match="without top-level MIDL layers"):
        hypermodel.build(keras_tuner.HyperParameters())


def test_hypermodel_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="build_model=3"):
        tuning.MIDLHyperModel(3)
    with pytest.raises(ValueError, match=r"`lam`.*lam=-1"):
        tuning.MIDLHyperModel(_model, lam=-1)
    with pytest.raises(ValueError, match="cannot set `name`"):
        tuning.MIDLHyperModel(lambda: _model(), search_space={"name": "a"})
    with pytest.raises(ValueError, match=r"Unknown `search_space` keys.*'k'"):
        tuning.MIDLHyperModel(lambda: _model(), search_space={"k": 0.5})
    # A build_model(hp) declares its own space: search_space would be
    # silently ignored.
    with pytest.raises(ValueError, match="only to a `build_model\\(\\)`"):
        tuning.MIDLHyperModel(
            _build_with_hp, search_space={"k_ratio": (0.5, 1.0)}
        )


def test_hypermodel_warns_when_build_declares_no_k_ratio():
    def build(hp):  # tunes the learning rate, never k_ratio
        model = _model()
        model.optimizer.learning_rate = hp.Choice("lr", [1e-3, 1e-2])
        return model

    hypermodel = tuning.MIDLHyperModel(build)
    with pytest.warns(UserWarning, match=r"no `k_ratio` hyperparameter.*'lr'"):
        hypermodel.build(keras_tuner.HyperParameters())


@pytest.mark.parametrize("name", [None, "hidden"])
def test_hypermodel_does_not_warn_when_build_declares_k_ratio(name):
    def build(hp):
        return _model(**tuning.midl_hyperparameters(hp, name=name))

    hypermodel = tuning.MIDLHyperModel(build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hypermodel.build(keras_tuner.HyperParameters())


def _build_with_hp(hp):
    arguments = tuning.midl_hyperparameters(
        hp, k_ratio=(0.25, 1.0), k_ratio_step=0.25
    )
    return _model(**arguments)


def _tuner(kind, hypermodel, directory):
    common = {
        "objective": hypermodel.objective,
        "directory": str(directory),
        "project_name": kind,
        "overwrite": True,
        "seed": 3,
    }
    if kind == "random":
        return keras_tuner.RandomSearch(hypermodel, max_trials=2, **common)
    if kind == "bayesian":
        return keras_tuner.BayesianOptimization(
            hypermodel, max_trials=3, num_initial_points=2, **common
        )
    # max_epochs=2, factor=2: two 1-epoch trials, the best continued to epoch
    # 2, and one 2-epoch trial.
    return keras_tuner.Hyperband(
        hypermodel, max_epochs=2, factor=2, hyperband_iterations=1, **common
    )


# get_best_models() loads weights into an unbuilt optimizer: harmless.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_search_finds_and_reloads_the_logged_best(kind, rng, tmp_path):
    x, y = _data(rng, 96)
    x_val, y_val = _data(rng, 64)
    hypermodel = tuning.MIDLHyperModel(_build_with_hp, lam=LAM)
    tuner = _tuner(kind, hypermodel, tmp_path)
    recorder = _Recorder()
    tuner.search(
        x,
        y,
        validation_data=(x_val, y_val),
        epochs=1,
        batch_size=32,
        callbacks=[recorder],
        verbose=0,
    )
    trials = [t for t in tuner.oracle.trials.values() if t.score is not None]
    assert len(trials) >= 2
    assert len(recorder.records) >= len(trials)

    # Every logged objective is val_accuracy - lam * fraction(k_ratio).
    for k_ratio, logs in recorder.records:
        assert logs["flops_fraction"] == pytest.approx(
            _expected_fraction(k_ratio)
        )
        assert logs["val_efficiency"] == pytest.approx(
            logs["val_accuracy"] - LAM * _expected_fraction(k_ratio)
        )
    # Every trial's score is one of the values logged for its k_ratio.
    for trial in trials:
        k_ratio = trial.hyperparameters.get("k_ratio")
        logged = [
            logs["val_efficiency"]
            for value, logs in recorder.records
            if value == k_ratio
        ]
        assert any(trial.score == pytest.approx(v) for v in logged)

    # The best trial holds the best logged objective and its k_ratio.
    best_logged = max(logs["val_efficiency"] for _, logs in recorder.records)
    best_ratios = {
        value
        for value, logs in recorder.records
        if logs["val_efficiency"] == pytest.approx(best_logged)
    }
    (best_trial,) = tuner.oracle.get_best_trials(1)
    assert best_trial.score == pytest.approx(best_logged)
    assert best_trial.hyperparameters.get("k_ratio") in best_ratios
    best_hp = tuner.get_best_hyperparameters(1)[0]
    assert best_hp.values == best_trial.hyperparameters.values

    # The best model reloads with the checkpointed weights: it reproduces
    # the best objective, and a .keras round trip its predictions.
    (best_model,) = tuner.get_best_models(1)
    (midl,) = [layer for layer in best_model.layers if isinstance(layer, MIDL)]
    assert midl.k_ratio == best_hp.get("k_ratio")
    metrics = best_model.evaluate(
        x_val, y_val, batch_size=32, return_dict=True, verbose=0
    )
    fraction = flops.flops_fraction(best_model)
    assert metrics["accuracy"] - LAM * fraction == pytest.approx(
        best_trial.score
    )
    path = tmp_path / "best.keras"
    best_model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x_val, verbose=0),
        best_model.predict(x_val, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )


# --- budgeted search ---------------------------------------------------------

# The Dense model 16-32-2 that the budgeted searches replace.
DENSE_BUDGET = flops.dense_stack_multiply_adds(INPUT_DIM, [UNITS], CLASSES)


def _space_pairs(hp, name=None):
    """Every (multiplier, k_ratio name, k_ratio) the declared space holds."""
    parent = "width_multiplier" if name is None else f"{name}/width_multiplier"
    (multiplier,) = [p for p in hp.space if p.name == parent]
    pairs = []
    for value in multiplier.values:
        (child,) = [
            p
            for p in hp.space
            if [(c.name, list(c.values)) for c in p.conditions]
            == [(parent, [value])]
        ]
        pairs += [(value, child.name, k_ratio) for k_ratio in child.values]
    # Nothing else: one multiplier Choice, one k_ratio Choice per value.
    assert len(hp.space) == 1 + len(multiplier.values)
    return parent, pairs


def _midl_stack(input_dim, config, output_units):
    config = dict(config)
    units = config.pop("units")
    layers = [keras.Input((input_dim,))]
    layers += [MIDL(n, activation="relu", **config) for n in units]
    if output_units is not None:
        layers.append(keras.layers.Dense(output_units, activation="softmax"))
    return keras.Sequential(layers)


@pytest.mark.parametrize(
    "input_dim, units, budget_fraction, kwargs",
    [
        (INPUT_DIM, (UNITS,), 1.0, {"output_units": CLASSES}),
        (64, (128, 64), 1.0, {"output_units": 10, "rank": 4}),
        (
            64,
            (128,),
            0.8,
            {"light_path": "zero", "k_ratio": (0.1, 1.0), "k_ratio_step": 0.1},
        ),
        (
            32,
            (64, 32),
            0.5,
            {
                "k_ratio": (0.03125, 1.0),
                "k_ratio_step": 2.0,
                "k_ratio_sampling": "log",
                "width_multipliers": (0.5, 1.0, 2.0, 4.0),
                "name": "hidden",
            },
        ),
    ],
)
def test_budgeted_space_holds_exactly_the_configurations_within_budget(
    input_dim, units, budget_fraction, kwargs
):
    output_units = kwargs.get("output_units")
    budget = budget_fraction * flops.dense_stack_multiply_adds(
        input_dim, units, output_units
    )
    hp = keras_tuner.HyperParameters()
    tuning.budgeted_hyperparameters(hp, input_dim, units, budget, **kwargs)
    parent, pairs = _space_pairs(hp, kwargs.get("name"))

    # Brute force over the multipliers and the grid: the space holds the
    # pairs within budget, and only those; some pairs are over budget, so
    # a space that ignored the budget would differ.
    grid = tuning.k_ratio_grid(
        kwargs.get("k_ratio", (0.05, 1.0)),
        kwargs.get("k_ratio_step", 0.05),
        kwargs.get("k_ratio_sampling", "linear"),
    )
    rank = kwargs.get("rank")
    light_path = kwargs.get("light_path", "lowrank")

    def cost(multiplier, k_ratio):
        widths = tuple(max(1, round(multiplier * u)) for u in units)
        return flops.midl_stack_multiply_adds(
            input_dim, widths, k_ratio, rank, light_path, output_units
        )

    multipliers = kwargs.get("width_multipliers", (1.0, 1.5, 2.0, 3.0))
    within = {
        (float(m), k) for m in multipliers for k in grid if cost(m, k) <= budget
    }
    over = {(m, k) for m in multipliers for k in grid} - within
    assert within and over
    assert {(m, k) for m, _, k in pairs} == within
    assert len(pairs) == len(within)

    # Each configuration, proposed by a tuner, returns the arguments of
    # layers within budget by the layers' own rule
    # (`MIDL.inference_multiply_adds`; the search tests count built models).
    for multiplier, child, k_ratio in pairs:
        proposed = keras_tuner.HyperParameters()
        proposed.values.update({parent: multiplier, child: k_ratio})
        config = tuning.budgeted_hyperparameters(
            proposed, input_dim, units, budget, **kwargs
        )
        widths = tuple(max(1, round(multiplier * u)) for u in units)
        expected = {"units": widths, "k_ratio": k_ratio}
        if rank is not None:
            expected["rank"] = rank
        if light_path != "lowrank":
            expected["light_path"] = light_path
        assert config == expected
        layer_arguments = dict(config)
        dims = [input_dim, *layer_arguments.pop("units")]
        layers_cost = sum(
            MIDL(n, **layer_arguments).inference_multiply_adds(d)
            for d, n in zip(dims, dims[1:])
        ) + dims[-1] * (output_units or 0)
        assert layers_cost == cost(multiplier, k_ratio) <= budget


def test_budgeted_space_leaves_out_infeasible_multipliers():
    # Dense 16-32-2 costs 576: at 3x width even k_ratio 0.2 costs 704.
    hp = keras_tuner.HyperParameters()
    config = tuning.budgeted_hyperparameters(
        hp,
        INPUT_DIM,
        [UNITS],
        DENSE_BUDGET,
        width_multipliers=(1.0, 2.0, 3.0),
        k_ratio=(0.2, 1.0),
        k_ratio_step=0.2,
        output_units=CLASSES,
    )
    assert config == {"units": (UNITS,), "k_ratio": 0.2}
    assert [(p.name, list(p.values)) for p in hp.space] == [
        ("width_multiplier", [1.0, 2.0]),
        ("width_x1.0/k_ratio", [0.2, 0.4, 0.6, 0.8]),  # 1.0 costs 656
        ("width_x2.0/k_ratio", [0.2]),  # 0.4 costs 688
    ]


def test_budgeted_space_drops_multipliers_giving_the_same_widths():
    # round(1.5 * 1) == round(2.0 * 1) == 2: one configuration, not two.
    hp = keras_tuner.HyperParameters()
    tuning.budgeted_hyperparameters(
        hp, 8, [1], 1e6, width_multipliers=(1.0, 1.5, 2), k_ratio=(1.0, 1.0)
    )
    assert list(hp.space[0].values) == [1.0, 1.5]
    # None searches the given widths only.
    hp = keras_tuner.HyperParameters()
    tuning.budgeted_hyperparameters(hp, 8, [4], 1e6, width_multipliers=None)
    assert list(hp.space[0].values) == [1.0]


def test_budgeted_space_rejects_a_budget_nothing_fits():
    # The cheapest configuration, 16-32-2 at k_ratio 0.05 (k = 2), costs
    # 16*1 + 2*1*32 + 2*16 + 32*2 = 176.
    hp = keras_tuner.HyperParameters()
    with pytest.raises(
        ValueError,
        match=r"No configuration fits a budget of 175 .*costs 176.*budget=175",
    ):
        tuning.budgeted_hyperparameters(
            hp, INPUT_DIM, [UNITS], 175, output_units=CLASSES
        )
    assert not hp.space
    assert tuning.budgeted_hyperparameters(
        hp, INPUT_DIM, [UNITS], 176, output_units=CLASSES
    ) == {"units": (UNITS,), "k_ratio": 0.05}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, r"`budget`.*positive finite.*budget=0"),
        ({"budget": -5}, r"`budget`.*budget=-5"),
        ({"budget": float("inf")}, r"`budget`.*budget=inf"),
        ({"budget": float("nan")}, r"`budget`.*budget=nan"),
        ({"budget": "576"}, r"`budget`.*budget='576'"),
        ({"budget": True}, r"`budget`.*budget=True"),
        ({"budget": None}, r"`budget`.*budget=None"),
        ({"width_multipliers": []}, r"`width_multipliers`.*=\[\]"),
        ({"width_multipliers": [1.0, 0]}, r"`width_multipliers`.*\[1.0, 0\]"),
        ({"width_multipliers": [-1.0]}, r"`width_multipliers`.*\[-1.0\]"),
        ({"width_multipliers": [2, 2]}, r"`width_multipliers`.*distinct"),
        ({"width_multipliers": ["x2"]}, r"`width_multipliers`.*\['x2'\]"),
        ({"k_ratio": (0.0, 1.0)}, r"`k_ratio`.*k_ratio=\(0.0, 1.0\)"),
        ({"k_ratio": (0.8, 0.2)}, r"`k_ratio`.*min_value <= max_value"),
        ({"k_ratio_step": None}, r"`k_ratio_step`.*k_ratio_step=None"),
        ({"k_ratio_step": 0}, r"`k_ratio_step`.*k_ratio_step=0"),
        ({"k_ratio_sampling": "cubic"}, r"`k_ratio_sampling`.*'cubic'"),
        ({"input_dim": 0}, r"`input_dim`.*input_dim=0"),
        ({"units": []}, r"`units`.*units=\[\]"),
        ({"units": [32, 0]}, r"`units`.*units=\[32, 0\]"),
        ({"rank": 0}, r"`rank`.*rank=0"),
        ({"light_path": "full"}, r"`light_path`.*light_path='full'"),
        ({"output_units": 0}, r"`output_units`.*output_units=0"),
        ({"name": ""}, r"`name`.*name=''"),
        ({"hp": 3}, r"HyperParameters.*hp=3"),
    ],
)
def test_budgeted_space_rejects_invalid_arguments(kwargs, message):
    hp = keras_tuner.HyperParameters()
    arguments = {
        "hp": hp,
        "input_dim": INPUT_DIM,
        "units": [UNITS],
        "budget": DENSE_BUDGET,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        tuning.budgeted_hyperparameters(**arguments)
    assert not hp.space


class _Trained(keras.callbacks.Callback):
    """Records every model trained: its widths, k_ratio and cost."""

    def __init__(self):
        super().__init__()
        self.models = []

    def __deepcopy__(self, memo):  # shared, not copied, across trials
        return self

    def on_train_begin(self, logs=None):
        midl = [layer for layer in self.model.layers if isinstance(layer, MIDL)]
        self.models.append(
            (
                tuple(layer.units for layer in midl),
                midl[0].k_ratio,
                flops.model_multiply_adds(self.model),
            )
        )


def _budgeted_build(budget):
    def build(hp):
        config = tuning.budgeted_hyperparameters(
            hp,
            INPUT_DIM,
            [UNITS],
            budget,
            width_multipliers=(1.0, 2.0, 3.0),
            k_ratio=(0.2, 1.0),
            k_ratio_step=0.4,
            output_units=CLASSES,
        )
        model = _midl_stack(INPUT_DIM, config, CLASSES)
        model.compile(
            "adam",
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
            run_eagerly=True,
        )
        return model

    return build


# get_best_models() loads weights into an unbuilt optimizer: harmless.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.parametrize("kind", ["grid", "random"])
def test_budgeted_search_finds_a_midl_within_a_dense_models_cost(
    kind, rng, tmp_path
):
    dense = keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            keras.layers.Dense(UNITS, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    budget = flops.model_multiply_adds(dense)
    assert budget == DENSE_BUDGET == 576
    # Within 576: (32,) at k_ratio 0.2 (240) and 0.6 (448), (64,) at 0.2
    # (480); over: (32,) at 1.0 (656), (64,) at 0.6 (880), (96,) at 0.2
    # (704).
    within = {((32,), 0.2), ((32,), 0.6), ((64,), 0.2)}
    hypermodel = tuning.MIDLHyperModel(
        _budgeted_build(budget), lam=0, budget=budget
    )
    common = {
        "objective": hypermodel.objective,
        "directory": str(tmp_path),
        "project_name": kind,
        "seed": 3,
    }
    if kind == "grid":  # runs the whole space
        tuner = keras_tuner.GridSearch(hypermodel, **common)
    else:
        tuner = keras_tuner.RandomSearch(hypermodel, max_trials=3, **common)
    trained = _Trained()
    x, y = _data(rng, 32)
    tuner.search(
        x,
        y,
        validation_data=(x, y),
        epochs=1,
        batch_size=32,
        callbacks=[trained],
        verbose=0,
    )
    trials = list(tuner.oracle.trials.values())
    # No trial failed the hypermodel's budget check: the space holds only
    # configurations within budget.
    assert [t.status for t in trials] == ["COMPLETED"] * len(trials)
    assert len(trained.models) == len(trials) >= 2
    assert {(units, k) for units, k, _ in trained.models} <= within
    assert all(cost <= budget for _, _, cost in trained.models)
    if kind == "grid":
        assert len(trials) == len(within)
        assert {(units, k) for units, k, _ in trained.models} == within

    (best_hp,) = tuner.get_best_hyperparameters(1)
    (best_model,) = tuner.get_best_models(1)
    midl = [layer for layer in best_model.layers if isinstance(layer, MIDL)]
    multiplier = best_hp.get("width_multiplier")
    assert [layer.units for layer in midl] == [round(multiplier * UNITS)]
    assert midl[0].k_ratio == best_hp.get(f"width_x{multiplier!r}/k_ratio")
    assert flops.model_multiply_adds(best_model) <= budget


# k_ratio -> multiply-adds of `_model`: 272, 400, 528, 656.
SAFETY_BUDGET = 450


def _over_budget_first_build(hp):
    # The default (first) value is over budget: the tuner builds it when
    # it is created, before any trial, which must not stop it.
    return _model(hp.Choice("k_ratio", [1.0, 0.75, 0.5, 0.25]))


@pytest.mark.parametrize("form", ["hp", "no_hp"])
def test_hypermodel_budget_fails_trials_over_budget_untrained(
    form, rng, tmp_path
):
    if form == "no_hp":  # the k_ratio of an unchanged build() is searched
        hypermodel = tuning.MIDLHyperModel(
            lambda: _model(),
            lam=0,
            budget=SAFETY_BUDGET,
            search_space={"k_ratio": (0.25, 1.0), "k_ratio_step": 0.25},
        )
    else:
        hypermodel = tuning.MIDLHyperModel(
            _over_budget_first_build, lam=0, budget=SAFETY_BUDGET
        )
    costs = [flops.model_multiply_adds(_model(k)) for k in (0.25, 0.5, 0.75, 1)]
    assert costs == [272, 400, 528, 656]
    tuner = keras_tuner.GridSearch(
        hypermodel,
        objective=hypermodel.objective,
        directory=str(tmp_path),
        project_name=form,
    )
    trained = _Trained()
    x, y = _data(rng, 32)
    tuner.search(
        x,
        y,
        validation_data=(x, y),
        epochs=1,
        batch_size=32,
        callbacks=[trained],
        verbose=0,
    )
    status = {
        t.hyperparameters.get("k_ratio"): t
        for t in tuner.oracle.trials.values()
    }
    assert sorted(status) == [0.25, 0.5, 0.75, 1.0]
    assert {k: t.status for k, t in status.items()} == {
        0.25: "COMPLETED",
        0.5: "COMPLETED",
        0.75: "FAILED",
        1.0: "FAILED",
    }
    for k_ratio, cost in ((0.75, 528), (1.0, 656)):
        assert (
            f"costs {cost} multiply-adds per example, above the budget of "
            f"{SAFETY_BUDGET}" in status[k_ratio].message
        )
    # Only the models within budget were trained.
    assert sorted(k for _, k, _ in trained.models) == [0.25, 0.5]
    best = tuner.get_best_hyperparameters(1)[0]
    assert best.get("k_ratio") in (0.25, 0.5)


@pytest.mark.parametrize("budget, trains", [(656, True), (655, False)])
def test_hypermodel_budget_check_in_fit(budget, trains, rng):
    x, y = _data(rng, 32)
    hypermodel = tuning.MIDLHyperModel(_build_with_hp, budget=budget)
    hp = keras_tuner.HyperParameters()
    hp.values["k_ratio"] = 1.0
    model = hypermodel.build(hp)  # builds: a tuner builds at creation
    assert flops.model_multiply_adds(model) == 656
    if trains:  # a budget is a maximum: equal is within it
        history = hypermodel.fit(
            hp, model, x, y, validation_data=(x, y), epochs=1, verbose=0
        )
        assert "val_efficiency" in history.history
        assert int(model.optimizer.iterations) == 1
        return
    with pytest.raises(
        keras_tuner.errors.FailedTrialError,
        match=r"costs 656 multiply-adds per example, above the budget of 655",
    ):
        hypermodel.fit(
            hp, model, x, y, validation_data=(x, y), epochs=1, verbose=0
        )
    assert int(model.optimizer.iterations) == 0


@pytest.mark.parametrize(
    "budget", [0, -1, float("inf"), float("nan"), "576", True]
)
def test_hypermodel_rejects_an_invalid_budget(budget):
    with pytest.raises(
        ValueError, match=r"`budget`.*" + re.escape(f"budget={budget!r}")
    ):
        tuning.MIDLHyperModel(_build_with_hp, budget=budget)


def test_midl_conv2d_k_ratio_is_searched_with_or_without_hp(rng):
    def layers(conv_kwargs, dense_kwargs):
        return [
            keras.Input((6, 6, 3)),
            MIDLConv2D(8, 3, activation="relu", **conv_kwargs),
            keras.layers.GlobalAveragePooling2D(),
            MIDL(UNITS, **dense_kwargs),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]

    def compiled(model):
        model.compile("adam", "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    def build_with_hp(hp):
        return compiled(
            keras.Sequential(
                layers(
                    tuning.midl_hyperparameters(hp, name="conv"),
                    tuning.midl_hyperparameters(hp, name="dense"),
                )
            )
        )

    def build():
        return compiled(keras.Sequential(layers({}, {})))

    hp = keras_tuner.HyperParameters()
    hp.values.update({"conv/k_ratio": 0.25, "dense/k_ratio": 0.5})
    model = build_with_hp(hp)
    assert (model.layers[0].k, model.layers[2].k) == (2, 16)
    assert 0 < flops.flops_fraction(model) < 1

    hypermodel = tuning.MIDLHyperModel(
        build, search_space={"k_ratio": (0.25, 1.0), "k_ratio_step": 0.25}
    )
    hp = keras_tuner.HyperParameters()
    hp.values.update({"midl_0/k_ratio": 0.75, "midl_1/k_ratio": 0.25})
    tuned = hypermodel.build(hp)
    assert isinstance(tuned.layers[0], MIDLConv2D)
    assert [tuned.layers[i].k for i in (0, 2)] == [6, 8]
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 2, size=(8,))
    history = hypermodel.fit(hp, tuned, x, y, validation_data=(x, y),
                             epochs=1, verbose=0)
    assert hypermodel.efficiency.name in history.history
