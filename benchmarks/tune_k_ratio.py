"""Search MIDL's k_ratio on MNIST with KerasTuner: accuracy against FLOPs.

Model: 784 -> MIDL(units, k_ratio, relu) -> Dense(10, softmax). KerasTuner
searches `k_ratio` to maximize, on a validation split held out of the MNIST
training set,

    val_efficiency = val_accuracy - lam * flops_fraction

where `flops_fraction` is the model's inference multiply-adds (MIDL's gate
and light path included) over those of the same model with a Dense hidden
layer. Two Dense baselines are trained the same way: the model of the
same width, and for each MIDL trial cheaper than it, a narrower Dense of
the trial's inference cost (`iso_cost_units`: what a user would train
instead). Prints one row per trial and writes `tune_k_ratio.json`, a
Markdown table (`.md`) and a plot of accuracy against FLOPs (`.png`) to
`--output` (default: a folder outside the repository; `--output
benchmarks/results/tune_k_ratio` updates the committed results). The
short version a user copies is `examples/tune_k_ratio.py`.

MNIST comes from `--data-dir` (default: `../shared/datasets` beside the
project when it exists, else `$KERAS_MIDL_DATA_DIR`, else TensorFlow
Datasets, which downloads it).

    KERAS_BACKEND=torch python -m benchmarks.tune_k_ratio \
        --train-size 10000 --val-size 5000 --epochs 2 --executions 3
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time

import keras
import keras_tuner
import numpy as np

from benchmarks import common
from benchmarks import datasets
from keras_midl import MIDL
from keras_midl import flops
from keras_midl import tuning

SHARED_DATA = os.path.join(os.path.dirname(common.ROOT), "shared", "datasets")
NAME = "tune_k_ratio"
TUNERS = ("grid", "random", "bayesian", "hyperband")
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "XLA_FLAGS",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        default=SHARED_DATA if os.path.isdir(SHARED_DATA) else None,
        help="Folder holding mnist/mnist.npz (default: %(default)s; "
        "TFDS when none).",
    )
    parser.add_argument("--tuner", choices=TUNERS, default="grid")
    parser.add_argument(
        "--max-trials",
        type=int,
        default=10,
        help="Trials of the grid, random and Bayesian searches.",
    )
    parser.add_argument("--k-min", type=float, default=0.1)
    parser.add_argument("--k-max", type=float, default=1.0)
    parser.add_argument("--k-step", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="Epochs per trial (Hyperband: the maximum).",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument(
        "--executions",
        type=int,
        default=3,
        help="Trainings per trial (and of the baseline), averaged.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--directory",
        default=None,
        help="KerasTuner's working folder (default: a temporary one).",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="Only redraw the plot from the JSON file in --output.",
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def load_mnist(data_dir, train_size, val_size, seed):
    """Disjoint random train and validation subsets of MNIST's train split,
    flattened to 784 float32 features in [0, 1], and the test split."""
    data = datasets.load("mnist", data_dir=data_dir)
    if train_size + val_size > len(data.x_train):
        raise ValueError(
            f"train_size + val_size must be at most {len(data.x_train)}. "
            f"Received: {train_size} + {val_size}"
        )
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    train, val = order[:train_size], order[train_size : train_size + val_size]
    x = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    return (
        (x[train], data.y_train[train]),
        (x[val], data.y_train[val]),
        (x_test, data.y_test),
        data.source,
    )


def make_model(hidden_layer):
    model = keras.Sequential(
        [
            keras.Input((784,)),
            hidden_layer,
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


class RunRecorder(keras.callbacks.Callback):
    """Keeps each training's per-epoch logs, in order, across trials.

    KerasTuner deep-copies the search callbacks for every execution; this
    one returns itself instead, so that one list collects every run.
    """

    def __init__(self):
        super().__init__()
        self.runs = []

    def __deepcopy__(self, memo):
        return self

    def on_train_begin(self, logs=None):
        (midl,) = [
            layer for layer in self.model.layers if isinstance(layer, MIDL)
        ]
        self.runs.append(
            {"k_ratio": midl.k_ratio, "units": midl.units, "epochs": []}
        )

    def on_epoch_end(self, epoch, logs=None):
        self.runs[-1]["epochs"].append(dict(logs or {}))


def make_tuner(args, hypermodel, directory):
    common = {
        "objective": hypermodel.objective,
        "directory": directory,
        "project_name": f"tune_k_ratio_{args.tuner}",
        "overwrite": True,
        "seed": args.seed,
        "executions_per_trial": args.executions,
    }
    if args.tuner == "grid":
        return keras_tuner.GridSearch(
            hypermodel, max_trials=args.max_trials, **common
        )
    if args.tuner == "random":
        return keras_tuner.RandomSearch(
            hypermodel, max_trials=args.max_trials, **common
        )
    if args.tuner == "bayesian":
        return keras_tuner.BayesianOptimization(
            hypermodel, max_trials=args.max_trials, **common
        )
    return keras_tuner.Hyperband(
        hypermodel, max_epochs=args.epochs, factor=3, **common
    )


def mean_std(values):
    """Mean and sample standard deviation (`None` for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def best_accuracy(run):
    """Validation accuracy at the epoch KerasTuner keeps: the best one."""
    return max(epoch["val_accuracy"] for epoch in run["epochs"])


def train_dense(args, data, units):
    """Best-epoch validation accuracies of the Dense model of `units`
    hidden units, one per run."""
    (x, y), validation, _, _ = data
    accuracies = []
    for _ in range(args.executions):
        model = make_model(keras.layers.Dense(units, activation="relu"))
        history = model.fit(
            x,
            y,
            validation_data=validation,
            epochs=args.epochs,
            batch_size=args.batch_size,
            verbose=0,
        )
        accuracies.append(max(history.history["val_accuracy"]))
    return accuracies


def trial_rows(tuner, recorder, executions):
    """One row per completed trial, with per-execution accuracy spread.

    Trials run one after the other, `executions` trainings each, so the
    recorder's runs split into consecutive groups, one per trial.
    """
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    completed = [t for t in trials if t.score is not None]
    if len(recorder.runs) != executions * len(completed):
        raise RuntimeError(
            f"Recorded {len(recorder.runs)} trainings for {len(completed)} "
            f"trials of {executions} executions."
        )
    (best,) = tuner.oracle.get_best_trials(1)
    rows = []
    for index, trial in enumerate(completed):
        runs = recorder.runs[index * executions : (index + 1) * executions]
        # Float steps give 0.30000000000000004; the layer holds 0.3.
        k_ratio = round(trial.hyperparameters.get("k_ratio"), 10)
        if any(run["k_ratio"] != k_ratio for run in runs):
            raise RuntimeError(f"Runs out of order at trial {trial.trial_id}")
        accuracy, accuracy_std = mean_std([best_accuracy(r) for r in runs])
        fraction = runs[0]["epochs"][-1]["flops_fraction"]
        rows.append(
            {
                "model": "MIDL",
                "trial": trial.trial_id,
                "k_ratio": k_ratio,
                "units": runs[0]["units"],
                "epochs": len(runs[0]["epochs"]),
                "val_accuracy": accuracy,
                "val_accuracy_std": accuracy_std,
                "val_accuracies": [best_accuracy(r) for r in runs],
                "flops_fraction": fraction,
                "flops_saving": 1.0 / fraction,
                "objective": trial.score,
                "best": trial.trial_id == best.trial_id,
            }
        )
    return rows


def dense_row(args, data, units, k_ratio=None):
    """The row of a Dense model of `units` hidden units (`k_ratio`: the
    MIDL trial whose cost it matches, or `None`)."""
    accuracies = train_dense(args, data, units)
    accuracy, accuracy_std = mean_std(accuracies)
    fraction = dense_model_cost(units) / dense_model_cost(args.units)
    return {
        "model": "Dense" if k_ratio is None else "Dense, same cost",
        "trial": None,
        "k_ratio": k_ratio,
        "units": units,
        "epochs": args.epochs,
        "val_accuracy": accuracy,
        "val_accuracy_std": accuracy_std,
        "val_accuracies": accuracies,
        "flops_fraction": fraction,
        "flops_saving": 1.0 / fraction,
        "objective": accuracy - args.lam * fraction,
        "best": False,
    }


def dense_model_cost(units):
    """Inference multiply-adds of 784 -> Dense(units) -> Dense(10)."""
    return flops.dense_stack_multiply_adds(784, [units], output_units=10)


def iso_cost_dense_units(units, flops_fraction):
    """Hidden units of the Dense model that costs `flops_fraction` of the
    Dense model of `units` (at most that, `keras_midl.flops.iso_cost_units`).
    """
    budget = flops_fraction * dense_model_cost(units)
    (iso,) = flops.iso_cost_units(784, [units], budget, output_units=10)
    return iso


def iso_cost_rows(args, data, midl_rows):
    """For each MIDL trial cheaper than the Dense model, the row of the
    narrower Dense of the trial's cost, right after it."""
    rows = []
    for row in midl_rows:
        rows.append(row)
        if row["flops_fraction"] < 1.0:
            units = iso_cost_dense_units(args.units, row["flops_fraction"])
            rows.append(dense_row(args, data, units, row["k_ratio"]))
    return rows


def iso_cost_comparison(rows):
    """One sentence comparing the best MIDL trial with the narrower Dense
    of its cost, and the best objectives of MIDL and of those Dense."""
    midl = [r for r in rows if r["model"] == "MIDL"]
    iso = [r for r in rows if r["model"] == "Dense, same cost"]
    best = [r for r in midl if r["best"]]
    if not best or not iso:
        return "No MIDL trial cheaper than the Dense model: no same-cost Dense."
    (best,) = best
    paired = [r for r in iso if r["k_ratio"] == best["k_ratio"]]
    best_iso = max(iso, key=lambda r: r["objective"])
    text = []
    if paired:
        (paired,) = paired
        delta = 100 * (best["val_accuracy"] - paired["val_accuracy"])
        text.append(
            f"The best trial (k_ratio {best['k_ratio']:.2f}) is "
            f"{delta:+.2f} points of validation accuracy against the Dense "
            f"of its cost ({paired['units']} hidden units)."
        )
    text.append(
        f"Best objective: MIDL {best['objective']:.4f} (k_ratio "
        f"{best['k_ratio']:.2f}), narrower Dense {best_iso['objective']:.4f} "
        f"({best_iso['units']} hidden units, the cost of k_ratio "
        f"{best_iso['k_ratio']:.2f})."
    )
    return " ".join(text)


def format_table(rows):
    header = (
        "| model | k_ratio | hidden units | val accuracy (mean ± std) "
        "| FLOPs vs Dense | saving | objective |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        k_ratio = "—" if row["k_ratio"] is None else f"{row['k_ratio']:.2f}"
        mark = " (best)" if row.get("best") else ""
        std = row["val_accuracy_std"]
        spread = "" if std is None else f" ± {std:.4f}"
        lines.append(
            f"| {row['model']}{mark} | {k_ratio} | {row['units']} "
            f"| {row['val_accuracy']:.4f}{spread} "
            f"| {row['flops_fraction']:.3f} | {row['flops_saving']:.2f}x "
            f"| {row['objective']:.4f} |"
        )
    return "\n".join(lines)


def plot(rows, lam, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    midl = sorted(
        (r for r in rows if r["model"] == "MIDL"),
        key=lambda r: r["flops_fraction"],
    )
    dense = [r for r in rows if r["model"] == "Dense"]
    iso = sorted(
        (r for r in rows if r["model"] == "Dense, same cost"),
        key=lambda r: r["flops_fraction"],
    )
    figure, axis = plt.subplots(figsize=(6.0, 4.2))
    if iso:
        axis.errorbar(
            [r["flops_fraction"] for r in iso],
            [r["val_accuracy"] for r in iso],
            yerr=[r["val_accuracy_std"] or 0.0 for r in iso],
            fmt="s--",
            color="tab:gray",
            capsize=3,
            label="narrower Dense of each trial's cost",
        )
    axis.errorbar(
        [r["flops_fraction"] for r in midl],
        [r["val_accuracy"] for r in midl],
        yerr=[r["val_accuracy_std"] or 0.0 for r in midl],
        fmt="o-",
        capsize=3,
        label="MIDL trials",
    )
    for row in midl:
        axis.annotate(
            f"{row['k_ratio']:.2f}",
            (row["flops_fraction"], row["val_accuracy"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
        )
    for row in dense:
        axis.errorbar(
            [row["flops_fraction"]],
            [row["val_accuracy"]],
            yerr=[row["val_accuracy_std"] or 0.0],
            fmt="s",
            color="black",
            capsize=3,
            label="Dense baseline",
        )
    best = [r for r in midl if r["best"]]
    if best:
        (best,) = best
        axis.plot(
            best["flops_fraction"],
            best["val_accuracy"],
            "*",
            markersize=15,
            color="tab:red",
            label=f"best objective (k_ratio {best['k_ratio']:.2f})",
        )
        # Points of equal objective: accuracy = objective + lam * fraction.
        fractions = [r["flops_fraction"] for r in rows]
        low, high = min(fractions), max(fractions)
        axis.plot(
            [low, high],
            [best["objective"] + lam * low, best["objective"] + lam * high],
            ":",
            color="tab:red",
            label=f"equal objective, lam = {lam:g}",
        )
    # Frame the measured points; the equal-objective line may leave it.
    bottom = min(r["val_accuracy"] - (r["val_accuracy_std"] or 0) for r in rows)
    top = max(r["val_accuracy"] + (r["val_accuracy_std"] or 0) for r in rows)
    padding = 0.15 * (top - bottom) + 1e-3
    axis.set_ylim(bottom - padding, top + padding)
    axis.set_xlabel("inference multiply-adds / Dense model's")
    axis.set_ylabel("validation accuracy")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def environment(seconds, load_before):
    """`common.environment()`, with the thread settings in the command
    (they change timings a lot on a shared machine) and the run's time."""
    metadata = common.environment()
    threads = "".join(
        f"{name}={shlex.quote(os.environ[name])} "
        for name in THREAD_VARIABLES
        if name in os.environ
    )
    metadata["command"] = threads + metadata["command"]
    metadata["load_average"] = load_before
    metadata["load_average_after"] = common.load_average()
    metadata["seconds"] = seconds
    return metadata


def plot_title(settings, backend):
    return (
        f"MNIST 784-{settings['units']}-10, {settings['tuner']} search, "
        f"{backend}, {settings['epochs']} epochs x "
        f"{settings['executions']} runs"
    )


def main(argv=None):
    args = parse_args(argv)
    base = common.output_path(args.output, NAME)
    if args.replot:
        with open(base + ".json") as file:
            results = json.load(file)
        settings = results["settings"]
        title = plot_title(settings, results["metadata"]["backend"])
        plot(results["rows"], settings["lam"], base + ".png", title)
        print(f"Wrote {base}.png")
        return
    start = time.perf_counter()
    load_before = common.load_average()

    keras.utils.set_random_seed(args.seed)
    data = load_mnist(args.data_dir, args.train_size, args.val_size, args.seed)
    (x, y), validation, (x_test, y_test), source = data
    print(f"MNIST from {source}: {len(x)} train, {len(validation[0])} val")

    def build(hp):
        arguments = tuning.midl_hyperparameters(
            hp,
            k_ratio=(args.k_min, args.k_max),
            k_ratio_step=args.k_step,
        )
        return make_model(MIDL(args.units, activation="relu", **arguments))

    hypermodel = tuning.MIDLHyperModel(build, lam=args.lam)
    directory = args.directory or tempfile.mkdtemp(prefix="tune_k_ratio_")
    tuner = make_tuner(args, hypermodel, directory)
    recorder = RunRecorder()
    search_start = time.perf_counter()
    tuner.search(
        x,
        y,
        validation_data=validation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[recorder],
        verbose=0,
    )
    search_seconds = time.perf_counter() - search_start
    rows = iso_cost_rows(
        args, data, trial_rows(tuner, recorder, args.executions)
    )
    rows.append(dense_row(args, data, args.units))
    comparison = iso_cost_comparison(rows)

    (best_model,) = tuner.get_best_models(1)
    best_hp = tuner.get_best_hyperparameters(1)[0]
    test = best_model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    if args.directory is None:
        shutil.rmtree(directory, ignore_errors=True)
    seconds = time.perf_counter() - start

    table = format_table(rows)
    print(table)
    print(comparison)
    print(
        f"Best k_ratio {best_hp.get('k_ratio'):.2f}: test accuracy "
        f"{test['accuracy']:.4f}. Search {search_seconds:.0f} s, "
        f"total {seconds:.0f} s ({keras.backend.backend()})."
    )

    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("directory", "output", "replot")
    }
    metadata = environment(seconds, load_before)
    summary = {
        "best_k_ratio": round(best_hp.get("k_ratio"), 10),
        "best_test_accuracy": test["accuracy"],
        "search_seconds": search_seconds,
        "total_seconds": seconds,
        "data_source": source,
        "iso_cost_comparison": comparison,
    }
    with open(base + ".json", "w") as file:
        json.dump(
            {
                "metadata": metadata,
                "settings": settings,
                "summary": summary,
                "rows": rows,
            },
            file,
            indent=2,
        )
        file.write("\n")
    with open(base + ".md", "w") as file:
        file.write(
            f"# k_ratio search on MNIST ({args.tuner}, "
            f"{metadata['backend']})\n\n"
            f"{common.metadata_markdown(metadata)}\n\n"
            f"784 -> {args.units} -> 10, {len(x)} training / "
            f"{len(validation[0])} validation images (MNIST train split), "
            f"{args.epochs} epochs, {args.executions} runs per point "
            f"(validation accuracy at each run's best epoch), objective = "
            f"val_accuracy - {args.lam:g} * FLOPs fraction.\n\n"
            f"{table}\n\n"
            "Dense, same cost: a Dense hidden layer narrowed to the MIDL "
            "trial's inference multiply-adds (gate and light path "
            "included; at most that cost), trained the same way.\n\n"
            f"{comparison}\n\n"
            f"Best k_ratio {best_hp.get('k_ratio'):.2f}: MNIST test accuracy "
            f"{test['accuracy']:.4f} (one model). Search {search_seconds:.0f} "
            f"s, whole script {seconds:.0f} s.\n"
        )
    title = plot_title(settings, metadata["backend"])
    plot(rows, args.lam, base + ".png", title)
    print(f"Wrote {base}.json, {base}.md and {base}.png")


if __name__ == "__main__":
    main()
