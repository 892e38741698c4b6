"""Reproduces the MID-L paper's benchmark table: Dense baseline vs MIDL.

For each dataset, trains the baseline (Dense hidden layers) and the MIDL
model (the same hidden layers as MIDL) with the same seeds, epochs, batch
size, optimizer and training examples, interleaved seed by seed, then
evaluates both after the last epoch (no early stopping, no model selection
on the evaluation split). For every MIDL model it also reports the health
of each MIDL layer's gate on the whole evaluation split
(`keras_midl.gate_statistics` and `keras_midl.analysis.summarize_gates`):
dead neurons (never selected), always-on neurons (selected for every
example) and the gate entropy.

Evaluation split: the test split, or with `--validation-fraction F` a
stratified fraction `F` of the training split held out from training (for
choosing recipes without looking at the test split).

Writes `<output>/<name>.json` and `<output>/<name>.md`. `--output`
defaults to a folder outside the repository; pass
`--output benchmarks/results/paper_table` to update the committed
results. Rows are keyed by (dataset, backend, recipe): rows of other keys
already in the file are kept, so datasets and backends can be run in
separate processes:

    KERAS_BACKEND=jax python -m benchmarks.paper_table \\
        --data-dir ../shared/datasets --datasets mnist adult imdb \\
        --output benchmarks/results/paper_table
    KERAS_BACKEND=torch python -m benchmarks.paper_table \\
        --data-dir ../shared/datasets --datasets mnist adult \\
        --output benchmarks/results/paper_table

A dataset absent from `--data-dir` is listed as "not run here" unless
`--tfds` allows TensorFlow Datasets to download it.

Epoch times are wall-clock times; the 1-minute load average is sampled
before training and after every epoch, and the MIDL/Dense epoch-time ratio
is reported only when every sample of the dataset's runs was below 1
("machine busy" otherwise).
"""

import argparse
import fcntl
import hashlib
import inspect
import json
import os
import statistics
import tempfile
import time

if os.environ.get("KERAS_BACKEND") == "jax":
    # Same HLO for every seed: reuse compilations across the runs.
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", "/tmp/keras_midl_jax_cache"
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_midl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import datasets  # noqa: E402
from benchmarks import models  # noqa: E402
from keras_midl import flops  # noqa: E402
from keras_midl import gate_statistics  # noqa: E402
from keras_midl.analysis import summarize_gates  # noqa: E402

DEFAULT_EPOCHS = {
    "digits": 40,
    "mnist": 5,
    "adult": 10,
    "imdb": 4,
    "cifar10": 6,
    "cifar100": 10,
    "svhn_cropped": 6,
}
DEFAULT_BATCH_SIZE = {"digits": 32}
ORDER = ("mnist", "cifar10", "cifar100", "svhn_cropped", "adult", "imdb",
         "digits")
BACKENDS = ("jax", "tensorflow", "torch")
TARGET_POINTS = 0.3
TARGET_FLOPS = 1.7
TARGET_DEAD = 0.05
BUSY_LOAD = 1.0
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_results")


def load_average():
    """The 1-minute load average, or `None` where it cannot be read."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class EpochTimer(keras.callbacks.Callback):
    """Records each training epoch's wall-clock time and the load average
    after it."""

    def __init__(self):
        super().__init__()
        self.times = []
        self.loads = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.loads.append(load_average())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get(
        datasets.DATA_DIR_VARIABLE))
    parser.add_argument("--datasets", nargs="+", default=list(ORDER),
                        choices=ORDER)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--rank", type=int, default=None,
                        help="MIDL rank (default: MIDL's default_rank)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="MIDL gate temperature")
    parser.add_argument("--gate-noise", type=float, default=0.0,
                        help="MIDL gate noise (std, training only)")
    parser.add_argument("--balance-weight", type=float,
                        default=layer_default("balance_weight"),
                        help="MIDL load-balancing loss weight (default: "
                        "the layer's)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every dataset (default: per dataset)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size for every dataset (default: 32 "
                        "for digits, 128 otherwise)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on a fixed, stratified random subset of "
                        "N training examples (the same for every model)")
    parser.add_argument("--validation-fraction", type=float, default=None,
                        help="hold out this stratified fraction of the "
                        "training split and evaluate on it instead of the "
                        "test split")
    parser.add_argument("--recipe", default="default",
                        help="label of this configuration in the table")
    parser.add_argument("--recipes", nargs="+", default=None,
                        metavar="NAME[:KEY=VALUE,...]",
                        help="several MIDL configurations trained against "
                        "the same Dense runs, e.g. 'default' "
                        "'t2:temperature=2' 'noise:gate_noise=0.5'; keys: "
                        f"{', '.join(RECIPE_KEYS)} (default: the single "
                        "recipe given by --recipe, --k-ratio, --rank, "
                        "--temperature and --gate-noise)")
    parser.add_argument("--vocabulary-size", type=int, default=20000)
    parser.add_argument("--sequence-length", type=int, default=200)
    parser.add_argument("--tfds", action="store_true",
                        help="let TFDS download datasets missing locally")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="folder for the result files (default: "
                        f"{DEFAULT_OUTPUT}; the committed results are in "
                        "benchmarks/results/paper_table)")
    parser.add_argument("--name", default="paper_table",
                        help="stem of the result files")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only rewrite the .md file from the .json file")
    args = parser.parse_args(argv)
    if args.validation_fraction is not None and not (
        0.0 < args.validation_fraction < 1.0
    ):
        parser.error("--validation-fraction must be in (0, 1)")
    if args.train_limit is not None and args.train_limit < 1:
        parser.error("--train-limit must be a positive integer")
    try:
        args.recipe_list = recipes(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def layer_default(argument):
    """The default of a `keras_midl.MIDL` constructor argument."""
    return inspect.signature(keras_midl.MIDL).parameters[argument].default


def _k_ratio(value):
    return value if value == AT_DENSE_COST else float(value)


# `k_ratio=dense`: the largest k_ratio at which the (possibly wider) MIDL
# model costs no more than the same-width Dense model.
AT_DENSE_COST = "dense"
RECIPE_KEYS = {"k_ratio": _k_ratio, "rank": int, "temperature": float,
               "gate_noise": float, "balance_weight": float, "width": float,
               "convert_epochs": int, "warmup_epochs": int}


def recipes(args):
    """The MIDL configurations to run: a list of `(name, settings)`."""
    base = {"k_ratio": args.k_ratio, "rank": args.rank,
            "temperature": args.temperature, "gate_noise": args.gate_noise,
            "balance_weight": args.balance_weight, "width": 1.0,
            "convert_epochs": 0, "warmup_epochs": 0}
    if not args.recipes:
        return [(args.recipe, base)]
    result = []
    for spec in args.recipes:
        name, _, assignments = spec.partition(":")
        settings = dict(base)
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            if key not in RECIPE_KEYS or not value:
                raise ValueError(
                    f"Invalid recipe {spec!r}: expected NAME[:KEY=VALUE,...] "
                    f"with KEY in {sorted(RECIPE_KEYS)}."
                )
            settings[key] = RECIPE_KEYS[key](value)
        if settings["width"] <= 0 or min(settings["convert_epochs"],
                                         settings["warmup_epochs"]) < 0:
            raise ValueError(f"Recipe {spec!r}: width must be positive, "
                             "convert_epochs and warmup_epochs non-negative")
        if settings["convert_epochs"] and settings["warmup_epochs"]:
            raise ValueError(f"Recipe {spec!r}: convert_epochs and "
                             "warmup_epochs exclude each other")
        if not name or name in [n for n, _ in result]:
            raise ValueError(f"Recipe names must be unique and non-empty: "
                             f"{spec!r}")
        result.append((name, settings))
    return result


def load_digits():
    """scikit-learn's 8x8 digits with the quickstart's split (1,347 train,
    450 test, stratified, `random_state=0`), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype("int32"), test_size=0.25, random_state=0, stratify=y
    )
    return datasets.Dataset("digits", x_train, y_train, x_test, y_test, 10,
                            "sklearn.datasets.load_digits")


def load(name, args):
    if name == "digits":
        return load_digits(), None
    kwargs = {}
    if name == "imdb":
        kwargs = {"vocabulary_size": args.vocabulary_size,
                  "sequence_length": args.sequence_length}
    try:
        return datasets.load(name, data_dir=args.data_dir, **kwargs), None
    except FileNotFoundError as error:
        if not args.tfds:
            return None, f"not run here: {error}"
    try:
        return datasets.load(name, source="tfds", **kwargs), None
    except Exception as error:  # TFDS download failures vary widely.
        return None, f"not run here: TFDS failed ({type(error).__name__})"


def splits(data, args):
    """`{"train": (x, y), "test": (x, y)[, "validation": (x, y)]}`.

    With `--validation-fraction`, a stratified fraction of the training
    split is held out: every model is evaluated on it (to choose recipes)
    and on the test split (to report them).
    """
    x_train, y_train = data.x_train, data.y_train
    result = {"test": (data.x_test, data.y_test)}
    if args.validation_fraction:
        held = datasets.stratified_indices(
            y_train, int(round(args.validation_fraction * len(y_train))),
            seed=1234,
        )
        keep = np.setdiff1d(np.arange(len(y_train)), held)
        result["validation"] = (x_train[held], y_train[held])
        x_train, y_train = x_train[keep], y_train[keep]
    if args.train_limit and args.train_limit < len(y_train):
        index = datasets.stratified_indices(y_train, args.train_limit,
                                            seed=4321)
        x_train, y_train = x_train[index], y_train[index]
    result["train"] = (x_train, y_train)
    return result


def base_units(name):
    return models.ARCHITECTURES[name][1]


def scaled_units(name, width):
    return tuple(max(1, round(width * units)) for units in base_units(name))


def build_model(name, data, variant, settings, args, hidden_units=None):
    kwargs = {}
    if variant == "midl":
        kwargs = {"k_ratio": settings["k_ratio"], "rank": settings["rank"],
                  "midl_kwargs": midl_kwargs(settings)}
    if hidden_units is not None:
        kwargs["hidden_units"] = tuple(hidden_units)
    if name == "imdb":
        kwargs["vocabulary_size"] = args.vocabulary_size
    return models.build(name, variant, data.x_train.shape[1:],
                        data.num_classes, **kwargs)


def midl_kwargs(settings):
    return {"temperature": settings["temperature"],
            "gate_noise": settings["gate_noise"],
            "balance_weight": settings["balance_weight"]}


def head_input_dim(name, data, args):
    """Input size of the first hidden layer (flattened features)."""
    model = build_model(name, data, "baseline", None, args)
    return int(models.hidden_layers(model)[0].kernel.shape[0])


def head_multiply_adds(input_dim, num_classes, hidden_units, settings=None):
    """Multiply-adds of the hidden layers and the output layer, the part
    of the model that the baselines and recipes change: Dense layers, or
    MIDL layers with the recipe's `settings`."""
    if settings is None:
        return flops.dense_stack_multiply_adds(input_dim, hidden_units,
                                               num_classes)
    return flops.midl_stack_multiply_adds(
        input_dim, hidden_units, settings["k_ratio"], settings["rank"],
        output_units=num_classes,
    )


def resolve(name, settings, input_dim, num_classes):
    """A recipe's settings with `k_ratio=dense` made a number, and its
    hidden units."""
    settings = dict(settings)
    units = scaled_units(name, settings["width"])
    if settings["k_ratio"] == AT_DENSE_COST:
        budget = head_multiply_adds(input_dim, num_classes, base_units(name))
        settings["k_ratio"] = flops.k_ratio_for_budget(
            input_dim, units, budget, rank=settings["rank"],
            output_units=num_classes,
        )
    return settings, units


def iso_cost_units(name, settings, units, input_dim, num_classes):
    """Dense widths, proportional to the benchmark's, of the MIDL recipe's
    inference cost (`keras_midl.flops.iso_cost_units`)."""
    budget = head_multiply_adds(input_dim, num_classes, units, settings)
    return flops.iso_cost_units(input_dim, base_units(name), budget,
                                output_units=num_classes)


def batch_size(name, args):
    return args.batch_size or DEFAULT_BATCH_SIZE.get(name, 128)


def compile_model(model, args):
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def train_one(name, data, split, run, seed, epochs, args):
    """Trains one run; returns the model, its accuracy on each evaluation
    split, its epoch times and the load averages.

    A recipe with `convert_epochs = c > 0` spends the same `epochs`
    differently: a Dense model of the recipe's width trains for
    `epochs - c` epochs, `keras_midl.convert` turns its hidden layers into
    MIDL at the recipe's k_ratio, and the MIDL model trains for `c` more.
    """
    x_train, y_train = split["train"]
    keras.utils.set_random_seed(seed)
    settings = run["settings"]
    convert_epochs = settings["convert_epochs"] if settings else 0
    if convert_epochs >= epochs:
        raise ValueError(f"convert_epochs={convert_epochs} leaves no Dense "
                         f"epochs of {epochs}")
    variant = "baseline" if convert_epochs else run["variant"]
    model = build_model(name, data, variant, settings, args, run["units"])
    compile_model(model, args)
    timer = EpochTimer()
    load_before = load_average()
    fit = {"batch_size": batch_size(name, args), "callbacks": [timer],
           "verbose": 0}
    if settings and settings["warmup_epochs"]:
        fit["callbacks"].append(keras_midl.callbacks.KRatioWarmup(
            settings["warmup_epochs"]))
    if convert_epochs:
        model.fit(x_train, y_train, epochs=epochs - convert_epochs, **fit)
        model = keras_midl.convert(
            model, k_ratio=settings["k_ratio"], rank=settings["rank"],
            **midl_kwargs(settings),
        )
        compile_model(model, args)
        model.fit(x_train, y_train, epochs=convert_epochs, **fit)
    else:
        model.fit(x_train, y_train, epochs=epochs, **fit)
    accuracy = {}
    for where, (x_eval, y_eval) in split.items():
        if where != "train":
            accuracy[where] = float(
                model.evaluate(x_eval, y_eval, batch_size=1024, verbose=0)[1]
            )
    return model, accuracy, timer.times, [load_before] + timer.loads


def steady_epoch_time(times):
    """Median epoch time, leaving out the first epoch (compilation)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def hidden_multiply_adds(model):
    return sum(
        flops.layer_multiply_adds(layer)
        for layer in models.hidden_layers(model)
    )


def gate_health(model, x_eval, y_eval):
    """Per MIDL layer: units, k, dead, always-on, gate entropy (bits)."""
    stats = gate_statistics(model, x_eval, batch_size=1024)
    summaries = summarize_gates(stats)
    health = []
    for layer in models.hidden_layers(model):
        summary = summaries[layer.name]
        health.append({
            "layer": layer.name,
            "units": summary.units,
            "k": int(layer.k),
            "examples": summary.num_rows,
            "dead": summary.num_dead,
            "always_on": summary.num_always_on,
            "gate_entropy_bits": summary.gate_entropy_bits,
            "max_gate_entropy_bits": summary.max_gate_entropy_bits,
            "effective_neurons": summary.effective_neurons,
        })
    return health


def aggregate_health(per_seed):
    """Worst and mean over seeds of each layer's gate health."""
    layers = []
    for index, first in enumerate(per_seed[0]):
        seeds = [health[index] for health in per_seed]
        dead = [h["dead"] for h in seeds]
        always = [h["always_on"] for h in seeds]
        entropy = [h["gate_entropy_bits"] for h in seeds]
        layers.append({
            "layer": first["layer"],
            "units": first["units"],
            "k": first["k"],
            "dead_mean": statistics.fmean(dead),
            "dead_max": max(dead),
            "dead_fraction_max": max(dead) / first["units"],
            "always_on_mean": statistics.fmean(always),
            "always_on_max": max(always),
            "gate_entropy_bits_mean": statistics.fmean(entropy),
            "max_gate_entropy_bits": first["max_gate_entropy_bits"],
            "effective_neurons_mean": statistics.fmean(
                h["effective_neurons"] for h in seeds
            ),
        })
    return layers


def plan_runs(name, data, args):
    """The runs of one seed: the same-width Dense, every MIDL recipe, and
    a Dense of each recipe's inference cost (`iso:<widths>`, shared by
    recipes of the same cost), in training order."""
    runs = {"baseline": {"variant": "baseline", "settings": None,
                         "units": base_units(name)}}
    recipes_resolved = []
    input_dim = head_input_dim(name, data, args)
    for recipe, settings in args.recipe_list:
        settings, units = resolve(name, settings, input_dim, data.num_classes)
        iso = iso_cost_units(name, settings, units, input_dim,
                             data.num_classes)
        iso_key = "iso:" + "-".join(map(str, iso))
        runs.setdefault(iso_key, {"variant": "baseline", "settings": None,
                                  "units": iso})
        runs[recipe] = {"variant": "midl", "settings": settings,
                        "units": units, "iso": iso_key}
        recipes_resolved.append(recipe)
    return runs, recipes_resolved


def run_dataset(name, data, args, progress, on_seed=None):
    """Trains the baselines and every MIDL recipe on each seed; one row per
    recipe.

    `on_seed(rows)`, if given, receives the rows of the seeds done so far
    after each seed (so that a long run leaves partial results).
    """
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    split = splits(data, args)
    runs, recipe_names = plan_runs(name, data, args)
    accuracies = {key: {} for key in runs}
    epoch_times = {key: [] for key in runs}
    health = {key: [] for key in runs}
    loads = []
    built = {}
    x_health, y_health = split.get("validation", split["test"])
    for seed in args.seeds:
        for key, run in runs.items():
            model, accuracy, times, run_loads = train_one(
                name, data, split, run, seed, epochs, args
            )
            built[key] = model
            for where, value in accuracy.items():
                accuracies[key].setdefault(where, []).append(value)
            epoch_times[key].append(steady_epoch_time(times))
            loads += [load for load in run_loads if load is not None]
            detail = ""
            if run["variant"] == "midl":
                health[key].append(gate_health(model, x_health, y_health))
                detail = ", dead " + ",".join(
                    str(h["dead"]) for h in health[key][-1]
                )
            scores = ", ".join(f"{where} acc {value:.4f}"
                               for where, value in accuracy.items())
            progress.step(f"{name} seed {seed} {key}",
                          f"{scores}, epoch {epoch_times[key][-1]:.1f}s"
                          f"{detail}")
        rows = [
            make_row(name, args, epochs, split, recipe, runs, built,
                     accuracies, epoch_times, health[recipe], loads)
            for recipe in recipe_names
        ]
        if on_seed is not None and seed != args.seeds[-1]:
            on_seed(rows)
    return rows


def _scores(prefix, values):
    """`<prefix>_acc`, `_mean`, `_std` (test) and `<prefix>_val_acc`,
    `_mean` (validation, when held out)."""
    mean, std = common.mean_std(values["test"])
    result = {f"{prefix}_acc": values["test"],
              f"{prefix}_acc_mean": mean, f"{prefix}_acc_std": std}
    if "validation" in values:
        mean, std = common.mean_std(values["validation"])
        result.update({f"{prefix}_val_acc": values["validation"],
                       f"{prefix}_val_acc_mean": mean,
                       f"{prefix}_val_acc_std": std})
    return result


def make_row(name, args, epochs, split, recipe, runs, built, accuracies,
             epoch_times, health, loads):
    x_train, _ = split["train"]
    run = runs[recipe]
    settings = run["settings"]
    busy = not loads or max(loads) >= BUSY_LOAD
    baseline, midl, iso = built["baseline"], built[recipe], built[run["iso"]]
    scores = {**_scores("baseline", accuracies["baseline"]),
              **_scores("iso", accuracies[run["iso"]]),
              **_scores("midl", accuracies[recipe])}
    layers_ratio = hidden_multiply_adds(baseline) / hidden_multiply_adds(midl)
    delta = 100 * (scores["midl_acc_mean"] - scores["baseline_acc_mean"])
    layers_health = aggregate_health(health)
    dead_ok = all(h["dead_fraction_max"] < TARGET_DEAD for h in layers_health)
    ratio = common.median_ratio(epoch_times[recipe], epoch_times["baseline"])

    def per_seed(first, second, where="test"):
        return [100 * (a - b) for a, b in zip(accuracies[first][where],
                                               accuracies[second][where])]

    row = {
        "dataset": name,
        "status": "run",
        "backend": keras.backend.backend(),
        "recipe": recipe,
        "evaluated_on": "test",
        "validation_examples": (int(len(split["validation"][1]))
                                if "validation" in split else None),
        "seeds": list(args.seeds[: len(accuracies["baseline"]["test"])]),
        "epochs": epochs,
        "batch_size": batch_size(name, args),
        "learning_rate": args.learning_rate,
        "train_examples": int(len(x_train)),
        "eval_examples": int(len(split["test"][1])),
        "k_ratio": settings["k_ratio"],
        "temperature": settings["temperature"],
        "gate_noise": settings["gate_noise"],
        "balance_weight": settings["balance_weight"],
        "width": settings["width"],
        "convert_epochs": settings["convert_epochs"],
        "warmup_epochs": settings["warmup_epochs"],
        "midl_ranks": [layer.effective_rank
                       for layer in models.hidden_layers(midl)],
        "hidden_units": [layer.units for layer in models.hidden_layers(midl)],
        "baseline_units": list(runs["baseline"]["units"]),
        "iso_units": list(runs[run["iso"]]["units"]),
        **scores,
        "delta_points": delta,
        "delta_points_per_seed": per_seed(recipe, "baseline"),
        "delta_iso_points": 100 * (scores["midl_acc_mean"]
                                   - scores["iso_acc_mean"]),
        "delta_iso_points_per_seed": per_seed(recipe, run["iso"]),
        "capacity_gain_points": 100 * (scores["baseline_acc_mean"]
                                       - scores["iso_acc_mean"]),
        "capacity_gain_points_per_seed": per_seed("baseline", run["iso"]),
        "active_fraction": flops.active_fraction(midl),
        "baseline_multiply_adds": flops.model_multiply_adds(baseline),
        "iso_multiply_adds": flops.model_multiply_adds(iso),
        "midl_multiply_adds": flops.model_multiply_adds(midl),
        "flops_ratio_layers": layers_ratio,
        "flops_ratio_model": flops.flops_ratio(baseline, midl),
        "gate_health": layers_health,
        "gate_health_per_seed": health,
        "baseline_epoch_s": epoch_times["baseline"],
        "midl_epoch_s": epoch_times[recipe],
        "load_average_min": min(loads) if loads else None,
        "load_average_max": max(loads) if loads else None,
        "machine_busy": busy,
        "epoch_time_ratio": None if busy else ratio,
        "target_met": bool(delta >= -TARGET_POINTS
                           and layers_ratio >= TARGET_FLOPS
                           and settings["k_ratio"] <= 0.45 and dead_ok),
    }
    if "validation" in split:
        row["delta_iso_val_points"] = 100 * (
            scores["midl_val_acc_mean"] - scores["iso_val_acc_mean"]
        )
    return row


def _accuracy(prefix):
    def cell(row):
        if row.get(f"{prefix}_acc_mean") is None:
            return "—"
        return (f"{100 * row[f'{prefix}_acc_mean']:.2f} ± "
                f"{100 * row[f'{prefix}_acc_std']:.2f}")
    return cell


def _target(row):
    if row.get("status") != "run":
        return row.get("status", "—").split(":")[0]
    return "yes" if row["target_met"] else "no"


def _epoch_ratio(row):
    if row.get("status") != "run":
        return "—"
    if row.get("epoch_time_ratio") is None:
        return "machine busy"
    return f"{row['epoch_time_ratio']:.2f}"


def _dead(row):
    if row.get("status") != "run":
        return "—"
    return " / ".join(
        f"{h['dead_max']}/{h['units']}" for h in row["gate_health"]
    )


def _backend(row):
    return row.get("backend") or "—"


def _units(key):
    def cell(row):
        units = row.get(key)
        return "-".join(map(str, units)) if units else "—"
    return cell


def _delta(key):
    """`+x.xx (± s)`: a mean difference and the std of its per-seed
    values."""
    def cell(row):
        if row.get(key) is None:
            return "—"
        per_seed = row.get(f"{key}_per_seed") or []
        spread = ""
        if len(per_seed) > 1:
            spread = f" ± {statistics.stdev(per_seed):.2f}"
        return f"{row[key]:+.2f}{spread}"
    return cell


COLUMNS = [
    ("dataset", "Dataset", None),
    (_backend, "Backend", None),
    (lambda r: str(len(r["seeds"])) if r.get("seeds") else "—", "Seeds",
     None),
    (lambda r: r.get("recipe", "default"), "Recipe", None),
    ("epochs", "Epochs", None),
    ("train_examples", "Train examples", None),
    (_units("hidden_units"), "MIDL units", None),
    ("k_ratio", "k_ratio", ".2f"),
    (_accuracy("baseline"), "Dense acc % (same width)", None),
    (_units("iso_units"), "Iso-cost Dense units", None),
    (_accuracy("iso"), "Iso-cost Dense acc %", None),
    (_accuracy("midl"), "MIDL acc %", None),
    (_delta("delta_points"), "Δ vs same-width Dense", None),
    (_delta("delta_iso_points"), "Δ vs iso-cost Dense", None),
    (_delta("capacity_gain_points"), "Same-width − iso-cost Dense", None),
    (lambda r: ("—" if r.get("delta_iso_val_points") is None
                else f"{r['delta_iso_val_points']:+.2f}"),
     "Δ vs iso-cost, validation", None),
    ("flops_ratio_layers", "FLOPs ratio (hidden layers)", ".2f"),
    ("flops_ratio_model", "FLOPs ratio (model)", ".2f"),
    (_dead, "Dead neurons per layer (worst seed)", None),
    (_epoch_ratio, "Epoch time ratio (MIDL/Dense)", None),
    (_target, "Target met", None),
]

HEALTH_COLUMNS = [
    ("dataset", "Dataset", None),
    ("backend", "Backend", None),
    ("recipe", "Recipe", None),
    ("layer", "MIDL layer", None),
    (lambda r: f"{r['k']}/{r['units']}", "k / units", None),
    (lambda r: f"{r['dead_mean']:.1f} ({r['dead_max']})",
     "Dead: mean (worst)", None),
    (lambda r: f"{r['always_on_mean']:.1f} ({r['always_on_max']})",
     "Always on: mean (worst)", None),
    (lambda r: f"{r['gate_entropy_bits_mean']:.3f} / "
     f"{r['max_gate_entropy_bits']:.3f}", "Gate entropy / max (bits)", None),
    ("effective_neurons_mean", "Effective neurons", ".0f"),
]


def row_key(row):
    return (row["dataset"], row.get("backend"), row.get("recipe", "default"))


def sort_key(row):
    backend = row.get("backend")
    return (
        row.get("recipe", "default") != "default",
        row.get("recipe", "default"),
        BACKENDS.index(backend) if backend in BACKENDS else -1,
        ORDER.index(row["dataset"]),
    )


def paths(args):
    return (os.path.join(args.output, f"{args.name}.json"),
            os.path.join(args.output, f"{args.name}.md"))


def read_rows(args):
    json_path, _ = paths(args)
    if not os.path.exists(json_path):
        return []
    with open(json_path) as file:
        return json.load(file).get("rows", [])


def recipe_summary(rows):
    """Markdown lines: per backend, Δ vs the iso-cost Dense of every
    recipe on every dataset (test, with validation in brackets), and the
    recipe whose mean validation Δ over the datasets is highest among
    those run on all of them."""
    lines = []
    done = [r for r in rows if r.get("status") == "run"
            and r.get("delta_iso_points") is not None]
    for backend in BACKENDS:
        chosen = [r for r in done if r["backend"] == backend]
        if not chosen:
            continue
        names = [n for n in ORDER if any(r["dataset"] == n for r in chosen)]
        recipes = list(dict.fromkeys(
            r["recipe"] for r in sorted(chosen, key=sort_key)))
        cells = {(r["recipe"], r["dataset"]): r for r in chosen}
        lines += [f"### {backend}: MIDL − iso-cost Dense, test (validation)",
                  "",
                  "| Recipe | " + " | ".join(names) + " | mean, test |",
                  "|---|" + "---|" * (len(names) + 1)]
        scores = {}
        for recipe in recipes:
            row_cells, tests, validations = [], [], []
            for name in names:
                row = cells.get((recipe, name))
                if row is None:
                    row_cells.append("—")
                    continue
                tests.append(row["delta_iso_points"])
                text = f"{row['delta_iso_points']:+.2f}"
                if row.get("delta_iso_val_points") is not None:
                    validations.append(row["delta_iso_val_points"])
                    text += f" ({row['delta_iso_val_points']:+.2f})"
                row_cells.append(text)
            mean = f"{statistics.fmean(tests):+.2f}" if tests else "—"
            lines.append(f"| {recipe} | " + " | ".join(row_cells)
                         + f" | {mean} |")
            if len(validations) == len(names):
                scores[recipe] = statistics.fmean(validations)
        capacity = [
            f"{name} {cells[(recipes[0], name)]['capacity_gain_points']:+.2f}"
            for name in names if (recipes[0], name) in cells
        ]
        lines += ["", "Same-width − iso-cost Dense (what capacity buys, "
                  f"test): {', '.join(capacity)}."]
        if scores:
            best = max(scores, key=scores.get)
            lines.append(
                f"Highest mean validation Δ over {', '.join(names)}: "
                f"`{best}` ({scores[best]:+.2f}; "
                + ", ".join(f"{r} {v:+.2f}" for r, v in scores.items())
                + ")."
            )
        lines.append("")
    return lines


def write_markdown(rows, metadata, args):
    _, markdown_path = paths(args)
    health_rows = [
        {"dataset": row["dataset"], "backend": row["backend"],
         "recipe": row.get("recipe", "default"), **layer}
        for row in rows if row.get("status") == "run"
        for layer in row["gate_health"]
    ]
    notes = [
        f"Target: at k_ratio <= 0.45, MIDL mean accuracy >= Dense mean - "
        f"{TARGET_POINTS} points, FLOPs ratio (hidden layers, gate and light "
        f"path included) >= {TARGET_FLOPS}, and fewer than "
        f"{TARGET_DEAD:.0%} dead neurons in every MIDL layer (worst seed).",
        "Accuracy: test split after the last epoch (no early stopping), "
        "mean ± sample std over the seeds; every model sees the same "
        "training examples, epochs, batch size and optimizer. With "
        "`--validation-fraction` a stratified part of the training split "
        "is held out, and recipes are chosen on it (the 'validation' "
        "column), not on the test split. Baselines: the Dense model of the "
        "same widths, and the iso-cost Dense, whose widths are scaled "
        "(keras_midl.flops.iso_cost_units) until its hidden and output "
        "layers cost what the recipe's MIDL layers and output layer cost "
        "(never more). Δ columns: mean of the per-seed differences ± their "
        "std. 'Same-width − iso-cost Dense' is what capacity buys: where it "
        "is not above its spread, no method can show a gain from capacity, "
        "and the iso-cost comparison tests only that MIDL costs nothing. "
        "Recipes: `width=w` scales the units, `k_ratio=dense` takes the "
        "largest k_ratio within the same-width Dense's cost, "
        "`convert_epochs=c` trains a Dense of the recipe's width for "
        "epochs - c epochs, converts it (keras_midl.convert) and trains "
        "the MIDL model for c more; `warmup_epochs=w` trains MIDL with "
        "keras_midl.callbacks.KRatioWarmup(w): k_ratio falls linearly from "
        "1 to the recipe's over the first w epochs. "
        "FLOPs: analytic inference multiply-adds (keras_midl.flops). "
        "Dead neurons: never selected by the gate on the whole evaluation "
        "split. Epoch time ratio: median over seeds of the median epoch "
        "time after the first (compiling) epoch, shown only when the "
        f"1-minute load average stayed below {BUSY_LOAD:g} during the "
        "dataset's runs.",
        "",
        "## Accuracy per cost, by recipe",
        "",
        *recipe_summary(rows),
        "## Gate health (MIDL, validation split where held out, else "
        "test, over the seeds)",
        "",
        common.markdown_table(health_rows, HEALTH_COLUMNS),
        "",
        "Dead: neurons never selected; always on: selected for every "
        "example; gate entropy: mean binary entropy of the neurons' "
        "selection frequencies (max = H_b(k/n), every neuron equally "
        "often); effective neurons: exp of the entropy of the selection "
        "shares, between k and units.",
        "",
        "Rows were produced by (load average: min-max over the samples):",
        "",
    ]
    for command in dict.fromkeys(
        row["command"] for row in rows if "command" in row
    ):
        same = [r for r in rows if r.get("command") == command]
        names = [f"{r['dataset']} ({r.get('backend')})" for r in same]
        dates = sorted(r["date"] for r in same)
        loads = [r for r in same if r.get("load_average_max") is not None]
        load_text = ""
        if loads:
            load_text = "; load average " + ", ".join(
                f"{r['dataset']} {r['load_average_min']:.2f}-"
                f"{r['load_average_max']:.2f}" for r in loads
            )
        notes.append(f"* `{command}` ({', '.join(names)}; {dates[0]}"
                     f"{load_text})")
    notes.append("")
    common.write_markdown(markdown_path, rows, metadata, COLUMNS,
                          title="MID-L paper table: Dense vs MIDL",
                          notes=notes)


def write(rows, metadata, args):
    """Merges `rows` into the result files, under a lock, so that runs of
    other datasets or backends in parallel processes keep their rows."""
    os.makedirs(args.output, exist_ok=True)
    json_path, _ = paths(args)
    # The lock file lives outside the results folder (nothing to commit).
    digest = hashlib.sha1(os.path.abspath(json_path).encode()).hexdigest()
    lock_name = f"keras_midl_paper_table_{digest[:12]}.lock"
    with open(os.path.join(tempfile.gettempdir(), lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _write_locked(rows, metadata, args)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_locked(rows, metadata, args):
    json_path, _ = paths(args)
    old_rows = read_rows(args)
    # Rows without gate health were measured before the gate fix (issue
    # 11, defect 1); they are not comparable and are dropped.
    old_rows = [row for row in old_rows if row.get("status") != "run"
                or "gate_health" in row]
    new = {row_key(row) for row in rows}
    kept = [row for row in old_rows if row_key(row) not in new]
    # A dataset that was not run does not replace a row that was.
    for row in rows:
        if row["status"] != "run":
            previous = [r for r in old_rows if row_key(r) == row_key(row)
                        and r.get("status") == "run"]
            if previous:
                kept.append(previous[0])
                continue
        kept.append(row)
    rows = sorted(kept, key=sort_key)
    common.write_json(json_path, rows, metadata,
                      target={"points": TARGET_POINTS, "flops": TARGET_FLOPS,
                              "dead_fraction": TARGET_DEAD})
    write_markdown(rows, metadata, args)


def main(argv=None):
    args = parse_args(argv)
    metadata = common.environment()
    if args.markdown_only:
        with open(paths(args)[0]) as file:
            payload = json.load(file)
        write_markdown(payload["rows"], payload["metadata"], args)
        return
    loaded = {}
    rows = []
    for name in args.datasets:
        data, reason = load(name, args)
        if data is None:
            print(f"[paper_table] {name}: {reason}", flush=True)
            rows.append({"dataset": name, "status": reason,
                         "backend": keras.backend.backend(),
                         "recipe": args.recipe_list[0][0],
                         "command": metadata["command"],
                         "date": metadata["date"]})
        else:
            loaded[name] = data
    progress = common.Progress(
        total=(1 + 2 * len(args.recipe_list)) * len(args.seeds) * len(loaded),
        label="paper_table",
    )
    for name, data in loaded.items():
        progress.note(f"{name}: train {data.x_train.shape}, "
                      f"test {data.x_test.shape}")
        def partial(seed_rows):
            for row in seed_rows:
                row["command"] = metadata["command"]
                row["date"] = metadata["date"]
            write(rows + seed_rows, metadata, args)

        for row in run_dataset(name, data, args, progress, on_seed=partial):
            row["command"] = metadata["command"]
            row["date"] = metadata["date"]
            rows.append(row)
            progress.note(
                f"{name} {row['recipe']}: Dense "
                f"{100 * row['baseline_acc_mean']:.2f}, iso-cost Dense "
                f"{100 * row['iso_acc_mean']:.2f}, MIDL "
                f"{100 * row['midl_acc_mean']:.2f} "
                f"({row['delta_points']:+.2f} vs Dense, "
                f"{row['delta_iso_points']:+.2f} vs iso-cost), FLOPs ratio "
                f"{row['flops_ratio_layers']:.2f}, dead {_dead(row)}"
            )
        write(rows, metadata, args)  # partial results survive a crash
    write(rows, metadata, args)


if __name__ == "__main__":
    main()
