"""Reproduces the MID-L paper's benchmark table: Dense baseline vs MIDL.

For each dataset, trains the baseline (Dense hidden layers) and the MIDL
model (the same hidden layers as MIDL) with the same seeds, epochs, batch
size and optimizer, interleaved seed by seed, then evaluates both on the
test split after the last epoch (no early stopping, no model selection on
the test split). Writes `benchmarks/results/<output>.json` and `.md`.

Rows of datasets not run in this invocation are kept from an existing
result file, so datasets can be run in separate processes (or backends):

    KERAS_BACKEND=jax python benchmarks/paper_table.py \\
        --data-dir ../shared/datasets --datasets mnist adult imdb
    KERAS_BACKEND=tensorflow python benchmarks/paper_table.py \\
        --data-dir ../shared/datasets --datasets cifar10 --train-limit 5000

A dataset absent from `--data-dir` is listed as "not run here" unless
`--tfds` allows TensorFlow Datasets to download it.
"""

import argparse
import os
import time

if os.environ.get("KERAS_BACKEND") == "jax":
    # Same HLO for every seed: reuse compilations across the runs.
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", "/tmp/keras_midl_jax_cache"
    )

import keras  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import datasets  # noqa: E402
from benchmarks import models  # noqa: E402
from keras_midl import flops  # noqa: E402

DEFAULT_EPOCHS = {
    "mnist": 5,
    "adult": 10,
    "imdb": 4,
    "cifar10": 6,
    "cifar100": 10,
    "svhn_cropped": 6,
}
ORDER = ("mnist", "cifar10", "cifar100", "svhn_cropped", "adult", "imdb")
TARGET_POINTS = 0.3
TARGET_FLOPS = 1.7


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock time of each training epoch."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


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
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every dataset (default: per dataset)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use the first N training examples only")
    parser.add_argument("--vocabulary-size", type=int, default=20000)
    parser.add_argument("--sequence-length", type=int, default=200)
    parser.add_argument("--tfds", action="store_true",
                        help="let TFDS download datasets missing locally")
    parser.add_argument("--output", default="paper_table")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only rewrite the .md file from the .json file")
    return parser.parse_args(argv)


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


def train_one(name, data, variant, seed, epochs, args):
    keras.utils.set_random_seed(seed)
    kwargs = {"k_ratio": args.k_ratio, "rank": args.rank}
    if name == "imdb":
        kwargs["vocabulary_size"] = args.vocabulary_size
    if variant == "baseline":
        kwargs = {k: v for k, v in kwargs.items()
                  if k == "vocabulary_size"}
    model = models.build(name, variant, data.x_train.shape[1:],
                         data.num_classes, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x_train, y_train = data.x_train, data.y_train
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[
            : args.train_limit]
    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs,
              callbacks=[timer], verbose=0)
    _, accuracy = model.evaluate(data.x_test, data.y_test, batch_size=1024,
                                 verbose=0)
    return model, float(accuracy), timer.times


def steady_epoch_time(times):
    """Median epoch time, leaving out the first epoch (compilation)."""
    import statistics

    return statistics.median(times[1:] if len(times) > 1 else times)


def hidden_multiply_adds(model):
    return sum(
        flops.layer_multiply_adds(layer)
        for layer in models.hidden_layers(model)
    )


def run_dataset(name, data, args, progress):
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    accuracies = {"baseline": [], "midl": []}
    epoch_times = {"baseline": [], "midl": []}
    built = {}
    for seed in args.seeds:
        for variant in ("baseline", "midl"):
            model, accuracy, times = train_one(name, data, variant, seed,
                                               epochs, args)
            built[variant] = model
            accuracies[variant].append(accuracy)
            epoch_times[variant].append(steady_epoch_time(times))
            progress.step(f"{name} seed {seed} {variant}",
                          f"test acc {accuracy:.4f}, "
                          f"epoch {epoch_times[variant][-1]:.1f}s")
    baseline, midl = built["baseline"], built["midl"]
    base_mean, base_std = common.mean_std(accuracies["baseline"])
    midl_mean, midl_std = common.mean_std(accuracies["midl"])
    layers_ratio = hidden_multiply_adds(baseline) / hidden_multiply_adds(midl)
    delta = 100 * (midl_mean - base_mean)
    return {
        "dataset": name,
        "status": "run",
        "backend": keras.backend.backend(),
        "seeds": list(args.seeds),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_examples": int(min(len(data.x_train),
                                  args.train_limit or len(data.x_train))),
        "test_examples": int(len(data.x_test)),
        "k_ratio": args.k_ratio,
        "midl_ranks": [layer.effective_rank
                       for layer in models.hidden_layers(midl)],
        "hidden_units": [layer.units for layer in models.hidden_layers(midl)],
        "baseline_acc": accuracies["baseline"],
        "midl_acc": accuracies["midl"],
        "baseline_acc_mean": base_mean,
        "baseline_acc_std": base_std,
        "midl_acc_mean": midl_mean,
        "midl_acc_std": midl_std,
        "delta_points": delta,
        "active_fraction": flops.active_fraction(midl),
        "baseline_multiply_adds": flops.model_multiply_adds(baseline),
        "midl_multiply_adds": flops.model_multiply_adds(midl),
        "flops_ratio_layers": layers_ratio,
        "flops_ratio_model": flops.flops_ratio(baseline, midl),
        "baseline_epoch_s": epoch_times["baseline"],
        "midl_epoch_s": epoch_times["midl"],
        "epoch_time_ratio": common.median_ratio(epoch_times["midl"],
                                                epoch_times["baseline"]),
        "target_met": bool(delta >= -TARGET_POINTS
                           and layers_ratio >= TARGET_FLOPS
                           and args.k_ratio <= 0.45),
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


COLUMNS = [
    ("dataset", "Dataset", None),
    ("backend", "Backend", None),
    (lambda r: str(len(r["seeds"])) if r.get("seeds") else "—", "Seeds",
     None),
    ("epochs", "Epochs", None),
    ("k_ratio", "k_ratio", ".2f"),
    (_accuracy("baseline"), "Dense acc % (mean ± std)", None),
    (_accuracy("midl"), "MIDL acc % (mean ± std)", None),
    ("delta_points", "Δ points", "+.2f"),
    ("active_fraction", "Active fraction", ".3f"),
    ("flops_ratio_layers", "FLOPs ratio (hidden layers)", ".2f"),
    ("flops_ratio_model", "FLOPs ratio (model)", ".2f"),
    ("epoch_time_ratio", "Epoch time ratio (MIDL/Dense)", ".2f"),
    (_target, "Target met", None),
]


def read_rows(args):
    json_path = common.results_path(f"{args.output}.json")
    if not os.path.exists(json_path):
        return []
    import json

    with open(json_path) as file:
        return json.load(file).get("rows", [])


def write_markdown(rows, metadata, args):
    notes = [
        f"Target: at k_ratio <= 0.45, MIDL mean test accuracy >= Dense "
        f"mean - {TARGET_POINTS} points and FLOPs ratio (hidden layers, gate "
        f"and light path included) >= {TARGET_FLOPS}.",
        "Accuracy: test split after the last epoch, mean ± sample std over "
        "the seeds. FLOPs: analytic inference multiply-adds "
        "(keras_midl.flops). Epoch time: median over seeds of the median "
        "epoch time after the first (compiling) epoch.",
        "",
        "Rows were produced by:",
        "",
    ]
    for command in dict.fromkeys(
        row["command"] for row in rows if "command" in row
    ):
        same = [r for r in rows if r.get("command") == command]
        datasets_run = [r["dataset"] for r in same]
        dates = sorted(r["date"] for r in same)
        notes.append(f"* `{command}` ({', '.join(datasets_run)}; {dates[0]})")
    notes.append("")
    common.write_markdown(common.results_path(f"{args.output}.md"), rows,
                          metadata, COLUMNS,
                          title="MID-L paper table: Dense vs MIDL",
                          notes=notes)


def write(rows, metadata, args):
    json_path = common.results_path(f"{args.output}.json")
    old_rows = read_rows(args)
    new = {row["dataset"] for row in rows}
    kept = [row for row in old_rows if row["dataset"] not in new]
    # A dataset that was not run does not replace a row that was.
    for row in rows:
        if row["status"] != "run":
            previous = [r for r in old_rows if r["dataset"] == row["dataset"]
                        and r.get("status") == "run"]
            if previous:
                kept.append(previous[0])
                continue
        kept.append(row)
    rows = sorted(kept, key=lambda row: ORDER.index(row["dataset"]))
    common.write_json(json_path, rows, metadata,
                      target={"points": TARGET_POINTS, "flops": TARGET_FLOPS})
    write_markdown(rows, metadata, args)


def main(argv=None):
    args = parse_args(argv)
    metadata = common.environment()
    if args.markdown_only:
        import json

        with open(common.results_path(f"{args.output}.json")) as file:
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
                         "command": metadata["command"],
                         "date": metadata["date"]})
        else:
            loaded[name] = data
    progress = common.Progress(
        total=2 * len(args.seeds) * len(loaded), label="paper_table"
    )
    for name, data in loaded.items():
        progress.note(f"{name}: train {data.x_train.shape}, "
                      f"test {data.x_test.shape}")
        row = run_dataset(name, data, args, progress)
        row["command"] = metadata["command"]
        row["date"] = metadata["date"]
        rows.append(row)
        write(rows, metadata, args)  # partial results survive a crash
        progress.note(
            f"{name}: Dense {100 * row['baseline_acc_mean']:.2f}, MIDL "
            f"{100 * row['midl_acc_mean']:.2f} ({row['delta_points']:+.2f} "
            f"points), FLOPs ratio {row['flops_ratio_layers']:.2f}"
        )
    write(rows, metadata, args)


if __name__ == "__main__":
    main()
