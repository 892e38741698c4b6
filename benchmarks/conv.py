"""Accuracy per cost of a CNN with MIDLConv2D: conv vs iso-cost vs MIDL.

For each image dataset (`--datasets`: the CIFAR-10 subset, SVHN, CIFAR-100)
and seed, trains three models of `benchmarks.models.conv_cnn` (three
`Conv 3x3 + ReLU -> MaxPool` blocks of 32, 64 and 128 filters, then a
softmax on the flattened features):

* `conv`: `Conv2D` everywhere, the same-width baseline;
* `iso_cost`: the same CNN with every block's filters scaled by one
  factor, solved (`iso_cost_width`, a bisection) so that its whole-model
  multiply-adds (`keras_midl.flops.model_multiply_adds`) are as close as
  possible to the MIDL model's, never above;
* `midl`: `MIDLConv2D` (`k_ratio=--k-ratio`, the layer's default rank,
  ReLU, padding same) in the second and third blocks, `Conv2D` in the
  first (see `benchmarks.models.conv_cnn` for why).

`--convert-epochs N` trains the MIDL model another way: the conv model
for `epochs - N` epochs, then `keras_midl.convert` of its MIDL blocks
(`MIDLConv2D.from_conv2d`), then N more epochs with a fresh Adam: the same
total epochs (the row's "MIDL recipe"; the conv and iso-cost models are
trained as without it).

Protocol: the same training examples, epochs (`--epochs`, default 8),
batch size (128) and optimizer (Adam, fixed learning rate 1e-3) for every
model; a stratified `--validation-fraction` (default 0.1) of the training
split is held out of training (`benchmarks.paper_table.splits`, the same
held-out examples as the paper table). Every model is evaluated after its
last epoch on the validation and the test split: nothing is chosen on
either (no early stopping, no best epoch, no tuning), the validation
accuracy is reported beside the test accuracy only to show the spread
between two held-out sets. Reported per dataset: both accuracies per
model and seed, mean ± sample std over the seeds, the per-seed
differences MIDL − iso_cost and MIDL − conv (mean ± std), each model's
multiply-adds per image and the ratios conv / MIDL and iso_cost / MIDL,
and the median epoch time (after the first, compiling epoch) with the
load average range.

Data: `benchmarks.datasets.load(name, data_dir=--data-dir)`; a dataset
absent from the folder is listed as "not run here" unless `--tfds` lets
TensorFlow Datasets download it (`svhn_cropped`, `cifar100`).

Usage (rows are merged into `<output>/<name>.json` keyed by dataset and
backend, so datasets and backends can be run separately):

    KERAS_BACKEND=jax python -m benchmarks.conv --data-dir ../shared/datasets \\
        --output benchmarks/results/conv
    KERAS_BACKEND=jax python -m benchmarks.conv --data-dir ../shared/datasets \\
        --datasets cifar10 --seeds 0 --epochs 1 --train-limit 2000
"""

import argparse
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

import keras_midl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import datasets  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.paper_table import splits  # noqa: E402
from keras_midl import flops  # noqa: E402

ORDER = ("cifar10", "svhn_cropped", "cifar100")
VARIANTS = models.CONV_VARIANTS
BACKENDS = ("jax", "tensorflow", "torch")
DEFAULT_EPOCHS = 8
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_results")
TARGET_RATIO = 1.6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get(
        datasets.DATA_DIR_VARIABLE))
    parser.add_argument("--datasets", nargs="+", default=list(ORDER),
                        choices=ORDER)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--rank", type=int, default=None,
                        help="MIDLConv2D rank (default: the layer's)")
    parser.add_argument("--filters", type=int, nargs="+",
                        default=list(models.CONV_FILTERS),
                        help="filters of each conv block (same-width model)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--convert-epochs", type=int, default=0,
        help="MIDL recipe: train the conv model for epochs - N epochs, "
        "convert its MIDL blocks with keras_midl.convert, train N more "
        "(the same total epochs); 0: MIDL trained from scratch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam learning rate, fixed, every model")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="stratified fraction of the training split "
                        "held out of training and evaluated")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on a fixed, stratified random subset of "
                        "N training examples (quick runs)")
    parser.add_argument("--tfds", action="store_true",
                        help="let TFDS download datasets missing locally")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="folder for the result files (default: "
                        f"{DEFAULT_OUTPUT}; the committed results are in "
                        "benchmarks/results/conv)")
    parser.add_argument("--name", default="conv",
                        help="stem of the result files")
    args = parser.parse_args(argv)
    if not 0.0 < args.validation_fraction < 1.0:
        parser.error("--validation-fraction must be in (0, 1)")
    if args.train_limit is not None and args.train_limit < 1:
        parser.error("--train-limit must be a positive integer")
    if not 0.0 < args.k_ratio <= 1.0:
        parser.error("--k-ratio must be in (0, 1]")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    if any(f < 1 for f in args.filters):
        parser.error("--filters must be positive")
    return args


# --- the iso-cost model -------------------------------------------------


def iso_cost_width(cost, budget, high=1.0, iterations=40):
    """The largest width in `(0, high]` whose cost is within `budget`.

    `cost(width)` must be non-decreasing in `width` (a model whose filters
    are `round(width * f)` is: rounding is monotone). Bisection between a
    width within the budget and one above it; `cost(0)` is the cost of
    the narrowest model (one filter per layer with `scaled_filters`).

    Example:

    >>> iso_cost_width(lambda w: round(10 * w) ** 2, budget=50)
    0.7499...

    Args:
        cost: Callable `width -> multiply-adds`.
        budget: The most the result may cost.
        high: The largest width tried (returned when within budget).
        iterations: Bisection steps; 40 resolves widths to `high / 2**40`.

    Returns:
        A width `w` with `cost(w) <= budget`; every width above `w` (up to
        `high`, at the resolution) costs more.

    Raises:
        ValueError: even the narrowest model costs more than `budget`.
    """
    if cost(high) <= budget:
        return high
    low = 0.0
    if cost(low) > budget:
        raise ValueError(
            f"No width fits the budget: the narrowest model costs "
            f"{cost(low)} multiply-adds, more than budget={budget}."
        )
    for _ in range(iterations):
        middle = (low + high) / 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle
    return low


def counting_model(input_shape, num_classes, filters, variant="conv",
                   **kwargs):
    """A `conv_cnn` built only to count its multiply-adds (zero kernels:
    the count does not depend on the weights, and a random initializer
    compiles once per new shape on JAX)."""
    return models.conv_cnn(input_shape, num_classes, variant,
                           filters=tuple(filters), kernel_initializer="zeros",
                           **kwargs)


def model_cost(input_shape, num_classes, filters, variant="conv", **kwargs):
    """Whole-model multiply-adds per example of a `conv_cnn`
    (`keras_midl.flops.model_multiply_adds`)."""
    return flops.model_multiply_adds(
        counting_model(input_shape, num_classes, filters, variant, **kwargs)
    )


def iso_cost_filters(input_shape, num_classes, filters, budget):
    """The iso-cost CNN: `(width, scaled filters, multiply-adds)`.

    The Conv2D CNN whose filters are `filters` scaled by the largest
    factor (`iso_cost_width`) at which its whole-model multiply-adds stay
    within `budget`.
    """
    costs = {}

    def cost(width):
        scaled = models.scaled_filters(filters, width)
        if scaled not in costs:
            costs[scaled] = model_cost(input_shape, num_classes, scaled)
        return costs[scaled]

    width = iso_cost_width(cost, budget)
    scaled = models.scaled_filters(filters, width)
    return width, scaled, cost(width)


def plan(data, args):
    """The three models' filters, widths and multiply-adds for a dataset."""
    shape, classes = data.x_train.shape[1:], data.num_classes
    filters = tuple(args.filters)
    midl = counting_model(shape, classes, filters, "midl",
                          k_ratio=args.k_ratio, rank=args.rank)
    budget = flops.model_multiply_adds(midl)
    width, iso, iso_cost = iso_cost_filters(shape, classes, filters, budget)
    layers = []
    for layer in models.conv_layers(midl):
        count = flops.layer_multiply_adds(layer)
        entry = {"name": layer.name, "type": type(layer).__name__,
                 "filters": layer.filters, "multiply_adds": count}
        if hasattr(layer, "k"):
            conv = conv2d_multiply_adds(layer)
            entry.update({"k": int(layer.k),
                          "rank": _rank(layer),
                          "conv_multiply_adds": conv,
                          "ratio": conv / count})
        layers.append(entry)
    return {
        "filters": {"conv": filters, "iso_cost": iso, "midl": filters},
        "width": {"conv": 1.0, "iso_cost": width, "midl": 1.0},
        "multiply_adds": {
            "conv": model_cost(shape, classes, filters),
            "iso_cost": iso_cost,
            "midl": budget,
        },
        "midl_layers": layers,
    }


def conv2d_multiply_adds(layer):
    """Multiply-adds per example of the `Conv2D` a conv layer replaces
    (same filters, kernel, strides, padding, on the same input)."""
    conv = keras.layers.Conv2D(
        layer.filters, layer.kernel_size, strides=layer.strides,
        padding=layer.padding, data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
    )
    return flops.layer_multiply_adds(conv, tuple(layer.input.shape))


def _rank(layer):
    for name in ("effective_rank", "rank"):
        value = getattr(layer, name, None)
        if value is not None:
            return int(value)
    return None


# --- training -------------------------------------------------------------


def load(name, args):
    """`(Dataset, None)`, or `(None, reason)` where it is not available."""
    try:
        return datasets.load(name, data_dir=args.data_dir), None
    except FileNotFoundError as error:
        if not args.tfds:
            return None, f"not run here: {error}"
    try:
        return datasets.load(name, source="tfds"), None
    except Exception as error:  # TFDS download failures vary widely.
        return None, f"not run here: TFDS failed ({type(error).__name__})"


class EpochTimer(keras.callbacks.Callback):
    """Each epoch's wall-clock time and the load average after it."""

    def __init__(self):
        super().__init__()
        self.times = []
        self.loads = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.loads.append(common.load_average())


def train_one(data, split, variant, width, seed, args):
    """Trains one model; returns its accuracy per evaluation split, its
    epoch times and the load averages (before training, after each
    epoch)."""
    x_train, y_train = split["train"]
    keras.utils.set_random_seed(seed)
    converting = variant == "midl" and args.convert_epochs > 0
    model = models.conv_cnn(
        data.x_train.shape[1:], data.num_classes,
        "conv" if converting else variant,
        filters=tuple(args.filters), width=width, k_ratio=args.k_ratio,
        rank=args.rank, seed=seed,
    )
    timer = EpochTimer()
    loads = [common.load_average()]
    phases = [(model, args.epochs - args.convert_epochs if converting
               else args.epochs)]
    if converting:
        phases.append((None, args.convert_epochs))
    for phase_model, epochs in phases:
        if phase_model is None:
            # The conv model trained so far, its MIDL blocks converted
            # (`MIDLConv2D.from_conv2d`: the same full path, an SVD light
            # path and a gate initialized from it), a fresh Adam.
            model = keras_midl.convert(
                model, k_ratio=args.k_ratio, rank=args.rank, seed=seed,
                layers=[f"conv_{i}" for i in models.MIDL_BLOCKS],
            )
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        if epochs:
            model.fit(x_train, y_train, epochs=epochs,
                      batch_size=args.batch_size, callbacks=[timer],
                      verbose=0)
    accuracy = {}
    for where in ("validation", "test"):
        x_eval, y_eval = split[where]
        accuracy[where] = float(
            model.evaluate(x_eval, y_eval, batch_size=1024, verbose=0)[1]
        )
    return accuracy, timer.times, loads + timer.loads


def steady_epoch_time(times):
    """Median epoch time, leaving out the first epoch (compilation)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def run_dataset(name, data, args, progress, on_seed=None):
    """Trains the three models on every seed; returns the dataset's row
    (`on_seed(row)` receives the row of the seeds done so far)."""
    split = splits(data, args)
    setup = plan(data, args)
    accuracy = {v: {"validation": [], "test": []} for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    loads = []
    row = None
    for seed in args.seeds:
        for variant in VARIANTS:
            result, epoch_times, seed_loads = train_one(
                data, split, variant, setup["width"][variant], seed, args
            )
            for where, value in result.items():
                accuracy[variant][where].append(value)
            times[variant].append(steady_epoch_time(epoch_times))
            loads.extend(load for load in seed_loads if load is not None)
            progress.step(
                f"{name} seed {seed} {variant}",
                f"val {100 * result['validation']:.2f} "
                f"test {100 * result['test']:.2f}",
            )
        row = make_row(name, args, split, setup, accuracy, times, loads)
        if on_seed is not None and seed != args.seeds[-1]:
            on_seed(row)
    return row


def check_convert_epochs(args):
    if not 0 <= args.convert_epochs < args.epochs:
        raise SystemExit(
            "--convert-epochs must be in [0, --epochs); received "
            f"--convert-epochs {args.convert_epochs} with --epochs "
            f"{args.epochs}"
        )


def recipe(args):
    """How the MIDL model was trained: `"scratch"` or
    `"convert_epochs=N"` (`--convert-epochs`)."""
    if args.convert_epochs > 0:
        return f"convert_epochs={args.convert_epochs}"
    return "scratch"


def make_row(name, args, split, setup, accuracy, times, loads):
    done = len(accuracy["conv"]["test"])
    macs = setup["multiply_adds"]
    row = {
        "dataset": name,
        "backend": keras.backend.backend(),
        "status": "run",
        "seeds": list(args.seeds[:done]),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "k_ratio": args.k_ratio,
        "recipe": recipe(args),
        "rank": args.rank,
        "train_examples": int(len(split["train"][1])),
        "validation_examples": int(len(split["validation"][1])),
        "test_examples": int(len(split["test"][1])),
        "filters": {k: list(v) for k, v in setup["filters"].items()},
        "iso_cost_width": setup["width"]["iso_cost"],
        "multiply_adds": macs,
        "ratio_conv_midl": macs["conv"] / macs["midl"],
        "ratio_iso_midl": macs["iso_cost"] / macs["midl"],
        "midl_layers": setup["midl_layers"],
        "accuracy_per_seed": accuracy,
        "epoch_seconds": {
            v: statistics.median(t) if t else None for v, t in times.items()
        },
        "load_average_min": min(loads) if loads else None,
        "load_average_max": max(loads) if loads else None,
    }
    for variant in VARIANTS:
        for where, key in (("validation", "val"), ("test", "test")):
            mean, std = common.mean_std(accuracy[variant][where])
            row[f"{variant}_{key}_mean"] = 100 * mean
            row[f"{variant}_{key}_std"] = 100 * std
    for other in ("iso_cost", "conv"):
        for where, key in (("validation", "val"), ("test", "test")):
            deltas = [
                100 * (m - o) for m, o in zip(
                    accuracy["midl"][where], accuracy[other][where],
                    strict=True)
            ]
            mean, std = common.mean_std(deltas)
            row[f"delta_{other}_{key}_per_seed"] = deltas
            row[f"delta_{other}_{key}"] = mean
            row[f"delta_{other}_{key}_std"] = std
    return row


# --- result files ---------------------------------------------------------


def _score(variant, key, status=False):
    """`mean ± std` of a model's accuracy; a dataset not run shows its
    status in the column given `status=True` and a dash elsewhere."""
    def cell(row):
        if row.get("status") != "run":
            return row.get("status", "—") if status else "—"
        text = (f"{row[f'{variant}_{key}_mean']:.2f} ± "
                f"{row[f'{variant}_{key}_std']:.2f}")
        if variant == "iso_cost":
            text += f" ({'-'.join(map(str, row['filters']['iso_cost']))})"
        return text
    return cell


def _delta(other, key):
    def cell(row):
        if row.get("status") != "run":
            return "—"
        return (f"{row[f'delta_{other}_{key}']:+.2f} ± "
                f"{row[f'delta_{other}_{key}_std']:.2f}")
    return cell


def _run_only(function):
    def cell(row):
        return function(row) if row.get("status") == "run" else "—"
    return cell


COLUMNS = [
    ("dataset", "Dataset", None),
    ("backend", "Backend", None),
    (lambda r: r.get("recipe", "scratch"), "MIDL recipe", None),
    (_run_only(lambda r: str(len(r["seeds"]))), "Seeds", None),
    ("epochs", "Epochs", None),
    ("train_examples", "Train examples", ",d"),
    (_score("conv", "test", status=True), "Conv, test", None),
    (_score("iso_cost", "test"), "Iso-cost conv (filters), test", None),
    (_score("midl", "test"), "MIDL, test", None),
    (_delta("iso_cost", "test"), "Δ vs iso-cost, test", None),
    (_delta("conv", "test"), "Δ vs conv, test", None),
    (_delta("iso_cost", "val"), "Δ vs iso-cost, validation", None),
    (_delta("conv", "val"), "Δ vs conv, validation", None),
    (_run_only(lambda r: " / ".join(
        f"{r['multiply_adds'][v] / 1e6:.2f}" for v in VARIANTS)),
     "M multiply-adds (conv / iso / MIDL)", None),
    ("ratio_conv_midl", "Conv / MIDL", ".2f"),
    ("ratio_iso_midl", "Iso / MIDL", ".3f"),
    (_run_only(lambda r: " / ".join(
        f"{r['epoch_seconds'][v]:.1f}" for v in VARIANTS)),
     "Epoch s (conv / iso / MIDL)", None),
    (_run_only(lambda r: f"{r['load_average_min']:.2f}-"
               f"{r['load_average_max']:.2f}"
               if r.get("load_average_max") is not None else "—"),
     "Load average", None),
]

SEED_COLUMNS = [
    ("dataset", "Dataset", None),
    ("backend", "Backend", None),
    (lambda r: r.get("recipe", "scratch"), "MIDL recipe", None),
    ("seed", "Seed", None),
    *[(f"{v}_{k}", f"{v} {w}", ".2f") for v in VARIANTS
      for k, w in (("val", "validation"), ("test", "test"))],
]


def seed_rows(rows):
    """One row per dataset, backend and seed: every model's accuracies."""
    result = []
    for row in rows:
        if row.get("status") != "run":
            continue
        for index, seed in enumerate(row["seeds"]):
            entry = {"dataset": row["dataset"], "backend": row["backend"],
                     "recipe": row.get("recipe", "scratch"), "seed": seed}
            for variant in VARIANTS:
                per_seed = row["accuracy_per_seed"][variant]
                entry[f"{variant}_val"] = 100 * per_seed["validation"][index]
                entry[f"{variant}_test"] = 100 * per_seed["test"][index]
            result.append(entry)
    return result


def layer_lines(rows):
    lines = []
    for row in rows:
        if row.get("status") != "run":
            continue
        parts = []
        for layer in row["midl_layers"]:
            text = (f"{layer['name']} {layer['type']} {layer['filters']}: "
                    f"{layer['multiply_adds'] / 1e6:.3f}M")
            if "k" in layer:
                text += (f" (k {layer['k']}, rank {layer['rank']}; Conv2D "
                         f"{layer['conv_multiply_adds'] / 1e6:.3f}M, "
                         f"{layer['ratio']:.2f}x)")
            parts.append(text)
        lines.append(f"* {row['dataset']} ({row['backend']}): "
                     + "; ".join(parts))
    return lines


def paths(args):
    return (os.path.join(args.output, f"{args.name}.json"),
            os.path.join(args.output, f"{args.name}.md"))


def row_key(row):
    return (row["dataset"], row.get("backend"), row.get("recipe", "scratch"))


def sort_key(row):
    backend = row.get("backend")
    return (BACKENDS.index(backend) if backend in BACKENDS else -1,
            ORDER.index(row["dataset"]))


def merge(old_rows, rows):
    """`rows` over `old_rows` by (dataset, backend); a dataset not run
    does not replace one that was."""
    new = {row_key(row): row for row in rows}
    merged = {row_key(row): row for row in old_rows}
    for key, row in new.items():
        previous = merged.get(key)
        if row.get("status") != "run" and previous is not None and (
            previous.get("status") == "run"
        ):
            continue
        merged[key] = row
    return sorted(merged.values(), key=sort_key)


def write(rows, metadata, args):
    json_path, markdown_path = paths(args)
    old_rows = []
    if os.path.exists(json_path):
        with open(json_path) as file:
            old_rows = json.load(file).get("rows", [])
    rows = merge(old_rows, rows)
    metadata = dict(metadata, load_average_after=common.load_average())
    common.write_json(json_path, rows, metadata,
                      settings={"target_ratio": TARGET_RATIO})
    notes = [
        "Accuracy in %, after the last epoch, mean ± sample std over the "
        "seeds. Every model sees the same training examples, epochs, batch "
        "size and optimizer (Adam, fixed learning rate); a stratified part "
        "of the training split is held out of training and evaluated "
        "('validation'). Nothing is chosen on the validation or the test "
        "split. Δ: mean ± std of the per-seed differences MIDL − other, "
        "in points. Multiply-adds: whole model, per image "
        "(keras_midl.flops.model_multiply_adds, the MIDL gate and light "
        "path included). Iso-cost conv: every conv's filters scaled by one "
        "factor, the largest at which the model costs no more than the "
        f"MIDL model. Target: conv / MIDL >= {TARGET_RATIO}. Epoch time: "
        "median over seeds of the median epoch after the first.",
        "",
        "## Per seed (accuracy in %)",
        "",
        common.markdown_table(seed_rows(rows), SEED_COLUMNS),
        "",
        "## Conv layers of the MIDL model (multiply-adds per image)",
        "",
        *layer_lines(rows),
        "",
        "Rows were produced by:",
        "",
        *[f"* `{command}`" for command in dict.fromkeys(
            row["command"] for row in rows if "command" in row)],
        "",
    ]
    common.write_markdown(
        markdown_path, rows, metadata, COLUMNS,
        title="Accuracy per cost: CNN with MIDLConv2D", notes=notes,
    )
    print(f"Wrote {json_path} and {markdown_path}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    check_convert_epochs(args)
    metadata = common.environment()
    rows = []
    loaded = {}
    for name in args.datasets:
        data, reason = load(name, args)
        if data is None:
            print(f"[conv] {name}: {reason}", flush=True)
            rows.append({"dataset": name, "backend": keras.backend.backend(),
                         "status": reason, "command": metadata["command"],
                         "date": metadata["date"]})
        else:
            loaded[name] = data
    progress = common.Progress(
        total=len(VARIANTS) * len(args.seeds) * len(loaded), label="conv"
    )

    def stamp(row):
        row["command"] = metadata["command"]
        row["date"] = metadata["date"]
        return row

    for name, data in loaded.items():
        progress.note(f"{name}: train {data.x_train.shape}, "
                      f"test {data.x_test.shape}")
        row = run_dataset(
            name, data, args, progress,
            on_seed=lambda row: write(rows + [stamp(row)], metadata, args),
        )
        rows.append(stamp(row))
        progress.note(
            f"{name}: test conv {row['conv_test_mean']:.2f}, iso-cost "
            f"{row['iso_cost_test_mean']:.2f}, MIDL "
            f"{row['midl_test_mean']:.2f} ({row['delta_iso_cost_test']:+.2f}"
            f" vs iso-cost, {row['delta_conv_test']:+.2f} vs conv); "
            f"multiply-adds conv / MIDL {row['ratio_conv_midl']:.2f}"
        )
        write(rows, metadata, args)  # partial results survive a crash
    write(rows, metadata, args)


if __name__ == "__main__":
    main()
