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
    "mnist": 5,
    "adult": 10,
    "imdb": 4,
    "cifar10": 6,
    "cifar100": 10,
    "svhn_cropped": 6,
}
ORDER = ("mnist", "cifar10", "cifar100", "svhn_cropped", "adult", "imdb")
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
    parser.add_argument("--batch-size", type=int, default=128)
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


RECIPE_KEYS = {"k_ratio": float, "rank": int, "temperature": float,
               "gate_noise": float, "balance_weight": float}


def recipes(args):
    """The MIDL configurations to run: a list of `(name, settings)`."""
    base = {"k_ratio": args.k_ratio, "rank": args.rank,
            "temperature": args.temperature, "gate_noise": args.gate_noise,
            "balance_weight": args.balance_weight}
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
        if not name or name in [n for n, _ in result]:
            raise ValueError(f"Recipe names must be unique and non-empty: "
                             f"{spec!r}")
        result.append((name, settings))
    return result


def load(name, args):
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
    """`(x_train, y_train, x_eval, y_eval, evaluated_on)`."""
    x_train, y_train = data.x_train, data.y_train
    x_eval, y_eval, evaluated_on = data.x_test, data.y_test, "test"
    if args.validation_fraction:
        held = datasets.stratified_indices(
            y_train, int(round(args.validation_fraction * len(y_train))),
            seed=1234,
        )
        keep = np.setdiff1d(np.arange(len(y_train)), held)
        x_eval, y_eval = x_train[held], y_train[held]
        x_train, y_train = x_train[keep], y_train[keep]
        evaluated_on = "validation"
    if args.train_limit and args.train_limit < len(y_train):
        index = datasets.stratified_indices(y_train, args.train_limit,
                                            seed=4321)
        x_train, y_train = x_train[index], y_train[index]
    return x_train, y_train, x_eval, y_eval, evaluated_on


def build_model(name, data, variant, settings, args):
    kwargs = {}
    if variant == "midl":
        kwargs = {"k_ratio": settings["k_ratio"], "rank": settings["rank"],
                  "midl_kwargs": {"temperature": settings["temperature"],
                                  "gate_noise": settings["gate_noise"],
                                  "balance_weight": settings["balance_weight"],
                                  }}
    if name == "imdb":
        kwargs["vocabulary_size"] = args.vocabulary_size
    return models.build(name, variant, data.x_train.shape[1:],
                        data.num_classes, **kwargs)


def train_one(name, data, split, variant, settings, seed, epochs, args):
    x_train, y_train, x_eval, y_eval = split
    keras.utils.set_random_seed(seed)
    model = build_model(name, data, variant, settings, args)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    load_before = load_average()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs,
              callbacks=[timer], verbose=0)
    _, accuracy = model.evaluate(x_eval, y_eval, batch_size=1024, verbose=0)
    return model, float(accuracy), timer.times, [load_before] + timer.loads


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


def run_dataset(name, data, args, progress, on_seed=None):
    """Trains Dense and every MIDL recipe on each seed; one row per recipe.

    `on_seed(rows)`, if given, receives the rows of the seeds done so far
    after each seed (so that a long run leaves partial results).
    """
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    x_train, y_train, x_eval, y_eval, evaluated_on = splits(data, args)
    split = (x_train, y_train, x_eval, y_eval)
    runs = [("baseline", "baseline", None)] + [
        (recipe, "midl", settings) for recipe, settings in args.recipe_list
    ]
    accuracies = {key: [] for key, _, _ in runs}
    epoch_times = {key: [] for key, _, _ in runs}
    health = {key: [] for key, _, _ in runs}
    loads = []
    built = {}
    for seed in args.seeds:
        for key, variant, settings in runs:
            model, accuracy, times, run_loads = train_one(
                name, data, split, variant, settings, seed, epochs, args
            )
            built[key] = model
            accuracies[key].append(accuracy)
            epoch_times[key].append(steady_epoch_time(times))
            loads += [load for load in run_loads if load is not None]
            detail = ""
            if variant == "midl":
                health[key].append(gate_health(model, x_eval, y_eval))
                detail = ", dead " + ",".join(
                    str(h["dead"]) for h in health[key][-1]
                )
            label = variant if len(runs) == 2 else key
            progress.step(f"{name} seed {seed} {label}",
                          f"{evaluated_on} acc {accuracy:.4f}, "
                          f"epoch {epoch_times[key][-1]:.1f}s{detail}")
        rows = [
            make_row(name, args, epochs, evaluated_on, split, recipe,
                     settings, built, accuracies, epoch_times,
                     health[recipe], loads)
            for recipe, settings in args.recipe_list
        ]
        if on_seed is not None and seed != args.seeds[-1]:
            on_seed(rows)
    return rows


def make_row(name, args, epochs, evaluated_on, split, recipe, settings,
             built, accuracies, epoch_times, health, loads):
    x_train, _, x_eval, _ = split
    busy = not loads or max(loads) >= BUSY_LOAD
    baseline, midl = built["baseline"], built[recipe]
    base_mean, base_std = common.mean_std(accuracies["baseline"])
    midl_mean, midl_std = common.mean_std(accuracies[recipe])
    layers_ratio = hidden_multiply_adds(baseline) / hidden_multiply_adds(midl)
    delta = 100 * (midl_mean - base_mean)
    layers_health = aggregate_health(health)
    dead_ok = all(h["dead_fraction_max"] < TARGET_DEAD for h in layers_health)
    ratio = common.median_ratio(epoch_times[recipe], epoch_times["baseline"])
    return {
        "dataset": name,
        "status": "run",
        "backend": keras.backend.backend(),
        "recipe": recipe,
        "evaluated_on": evaluated_on,
        "seeds": list(args.seeds[: len(accuracies["baseline"])]),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_examples": int(len(x_train)),
        "eval_examples": int(len(x_eval)),
        "k_ratio": settings["k_ratio"],
        "temperature": settings["temperature"],
        "gate_noise": settings["gate_noise"],
        "balance_weight": settings["balance_weight"],
        "midl_ranks": [layer.effective_rank
                       for layer in models.hidden_layers(midl)],
        "hidden_units": [layer.units for layer in models.hidden_layers(midl)],
        "baseline_acc": accuracies["baseline"],
        "midl_acc": accuracies[recipe],
        "baseline_acc_mean": base_mean,
        "baseline_acc_std": base_std,
        "midl_acc_mean": midl_mean,
        "midl_acc_std": midl_std,
        "delta_points": delta,
        "delta_points_per_seed": [
            100 * (m - b) for m, b in zip(accuracies[recipe],
                                          accuracies["baseline"])
        ],
        "active_fraction": flops.active_fraction(midl),
        "baseline_multiply_adds": flops.model_multiply_adds(baseline),
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


COLUMNS = [
    ("dataset", "Dataset", None),
    (_backend, "Backend", None),
    (lambda r: str(len(r["seeds"])) if r.get("seeds") else "—", "Seeds",
     None),
    (lambda r: r.get("recipe", "default"), "Recipe", None),
    ("epochs", "Epochs", None),
    ("train_examples", "Train examples", None),
    (lambda r: r.get("evaluated_on", "—"), "Evaluated on", None),
    ("k_ratio", "k_ratio", ".2f"),
    (_accuracy("baseline"), "Dense acc % (mean ± std)", None),
    (_accuracy("midl"), "MIDL acc % (mean ± std)", None),
    ("delta_points", "Δ points", "+.2f"),
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
        "Accuracy: evaluation split after the last epoch (no model "
        "selection), mean ± sample std over the seeds; Dense and MIDL "
        "see the same training examples, epochs, batch size and optimizer. "
        "FLOPs: analytic inference multiply-adds (keras_midl.flops). "
        "Dead neurons: never selected by the gate on the whole evaluation "
        "split. Epoch time ratio: median over seeds of the median epoch "
        "time after the first (compiling) epoch, shown only when the "
        f"1-minute load average stayed below {BUSY_LOAD:g} during the "
        "dataset's runs.",
        "",
        "## Gate health (MIDL, evaluation split, over the seeds)",
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
        total=(1 + len(args.recipe_list)) * len(args.seeds) * len(loaded),
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
                f"{100 * row['baseline_acc_mean']:.2f}, MIDL "
                f"{100 * row['midl_acc_mean']:.2f} "
                f"({row['delta_points']:+.2f} points), FLOPs ratio "
                f"{row['flops_ratio_layers']:.2f}, dead {_dead(row)}"
            )
        write(rows, metadata, args)  # partial results survive a crash
    write(rows, metadata, args)


if __name__ == "__main__":
    main()
