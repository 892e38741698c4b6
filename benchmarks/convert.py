"""Converting trained Dense models to MIDL: accuracy, FLOPs, int8, size.

For each dataset (MNIST and Adult MLPs, the CIFAR-10 CNN's dense head) and
seed: train the Dense model of `benchmarks.models` for a few epochs, then
for each `k_ratio`, `keras_midl.convert` its hidden Dense layers and report

* accuracy before any fit, with the low-rank gate (`G = U`, `c = b`) and
  with a random gate (`gate_init="random"`), the design choice to check;
* accuracy after 1 calibration epoch, training everything
  (`trainable="all"`) or only the gate and light path
  (`trainable="gate_and_light"`);
* the int8 accuracy (`model.quantize("int8")` after calibration) and the
  int8 Dense model's;
* the FLOPs ratio of the converted layers (gate and light path included),
  and the model file sizes (`.keras`).

The Dense model trained one more epoch ("Dense +1 epoch") is a control:
calibration is one more epoch of training, so it is the fair reference for
"after calibration" numbers. For each `k_ratio`, a Dense model narrowed to
the converted model's inference cost (`iso_cost_hidden`), trained from
scratch for the same epochs plus one, is what a user could train instead.

`--part latency` measures batch-1 inference latency instead, on every
backend (one child process each, one thread): float Dense, int8 Dense and
the converted model (k_ratio 0.45) in float and int8, masked and gathered.
As `benchmarks/latency.py`, it is started on a quiet machine and reads
the 1-minute load average around the timed calls, which then includes the
benchmark's own thread: it refuses to report numbers where a reading
exceeds 1 + 1 thread ("machine busy, not measured"), a sign that another
job ran.

Usage (from the repository root):

    KERAS_BACKEND=jax python -m benchmarks.convert \\
        --data-dir ../shared/datasets --output benchmarks/results/convert
    python -m benchmarks.convert --part latency \\
        --output benchmarks/results/convert

Writes `convert.json`/`convert.md` (or `convert_latency.*`) under
`--output` (default: a folder in the system's temporary directory; the
committed results are in `benchmarks/results/convert`).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from benchmarks import common

DATASETS = ("mnist", "adult", "cifar10")
# Training of the Dense model: short, to fit the CPU budget of a shared
# 2-core machine: the first examples of the (shuffled) training split only
# (None: all of it; Adult has 30k rows); evaluation on the full test split.
EPOCHS = {"mnist": 2, "adult": 3, "cifar10": 3}
TRAIN_LIMIT = {"mnist": 20000, "adult": None, "cifar10": 10000}
K_RATIOS = (0.25, 0.45, 0.65)
BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_convert")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("accuracy", "latency"),
                        default="accuracy")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS),
                        choices=DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k-ratios", type=float, nargs="+",
                        default=list(K_RATIOS))
    parser.add_argument("--epochs", type=int, default=None,
                        help="Dense training epochs (default: per dataset)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on the first N (shuffled) examples "
                        "(default: per dataset)")
    parser.add_argument("--full-k-ratios", type=float, nargs="+",
                        default=[0.45],
                        help="k_ratios at which the random gate and the "
                        "gate+light calibration are measured too")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=300,
                        help="latency: timed calls per model")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--combine", nargs="+", default=None,
                        metavar="JSON",
                        help="rewrite the tables from the rows of earlier "
                        "runs' convert.json files (e.g. datasets run as "
                        "separate processes), instead of running")
    parser.add_argument("--child-latency", default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- accuracy -----------------------------------------------------------


def compiled(model, learning_rate):
    import keras

    model.compile(
        keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def accuracy(model, data, batch_size=512):
    if not model.compiled:
        model.compile(loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    _, acc = model.evaluate(data.x_test, data.y_test, batch_size=batch_size,
                            verbose=0)
    return float(acc)


def copy_of(model):
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def file_size(model, folder, name):
    """Bytes of `model.save(...)` for an uncompiled model (no optimizer)."""
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    return os.path.getsize(path)


def converted_layer_flops_ratio(model):
    """Dense multiply-adds over MIDL multiply-adds, converted layers only."""
    from keras_midl import MIDL
    from keras_midl import flops

    dense = midl = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, MIDL):
            dense += flops.dense_equivalent_multiply_adds(layer)
            midl += flops.layer_multiply_adds(layer)
    return dense / midl


def iso_cost_hidden(dense, converted):
    """Hidden widths, proportional to `dense`'s, of a Dense model of the
    same architecture that costs at most `converted`'s inference
    multiply-adds (`keras_midl.flops.iso_cost_units`; the layers before
    the hidden ones, the CNN's convolutions, are the same in both)."""
    from benchmarks import models
    from keras_midl import flops

    hidden = models.hidden_layers(dense)
    input_dim = int(hidden[0].kernel.shape[0])
    units = [layer.units for layer in hidden]
    num_classes = int(dense.outputs[0].shape[-1])
    head = flops.dense_stack_multiply_adds(input_dim, units, num_classes)
    budget = flops.model_multiply_adds(converted) - (
        flops.model_multiply_adds(dense) - head
    )
    return flops.iso_cost_units(
        input_dim, units, budget, output_units=num_classes
    )


def run_dataset(name, args, progress, folder, done=None):
    import keras

    import keras_midl
    from benchmarks import datasets
    from benchmarks import models

    data = datasets.load(name, data_dir=args.data_dir)
    limit = args.train_limit or TRAIN_LIMIT[name]
    if limit:
        order = np.random.default_rng(1234).permutation(len(data.y_train))
        data.x_train = data.x_train[order[:limit]]
        data.y_train = data.y_train[order[:limit]]
    epochs = args.epochs or EPOCHS[name]
    fit = dict(batch_size=args.batch_size, verbose=0)
    rows = []
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        dense = models.build(name, "baseline", data.x_train.shape[1:],
                             data.num_classes)
        compiled(dense, args.learning_rate)
        dense.fit(data.x_train, data.y_train, epochs=epochs, **fit)
        dense_acc = accuracy(dense, data)
        extra = compiled(copy_of(dense), args.learning_rate)
        extra.fit(data.x_train, data.y_train, epochs=1, **fit)
        dense_int8 = copy_of(dense)
        dense_int8.quantize("int8")
        base = {
            "dataset": name,
            "seed": seed,
            "epochs": epochs,
            "dense_acc": dense_acc,
            "dense_plus1_acc": accuracy(extra, data),
            "dense_int8_acc": accuracy(dense_int8, data),
        }
        progress.step(f"{name} seed {seed} dense",
                      f"acc {dense_acc:.4f}")
        for k_ratio in args.k_ratios:
            row = dict(base, k_ratio=k_ratio)
            converted = keras_midl.convert(dense, k_ratio=k_ratio)
            row["flops_ratio"] = converted_layer_flops_ratio(converted)
            widths = iso_cost_hidden(dense, converted)
            keras.utils.set_random_seed(seed)
            iso = models.build(name, "baseline", data.x_train.shape[1:],
                               data.num_classes, hidden_units=widths)
            compiled(iso, args.learning_rate)
            iso.fit(data.x_train, data.y_train, epochs=epochs + 1, **fit)
            row["iso_cost_hidden"] = list(widths)
            row["iso_cost_acc"] = accuracy(iso, data)
            row["before_acc"] = accuracy(converted, data)
            row["before_random_gate_acc"] = None
            row["calibrated_gate_light_acc"] = None
            if k_ratio in args.full_k_ratios:
                random_gate = keras_midl.convert(dense, k_ratio=k_ratio,
                                                 gate_init="random")
                row["before_random_gate_acc"] = accuracy(random_gate, data)
                frozen = keras_midl.convert(dense, k_ratio=k_ratio,
                                            trainable="gate_and_light")
                compiled(frozen, args.learning_rate)
                frozen.fit(data.x_train, data.y_train, epochs=1, **fit)
                row["calibrated_gate_light_acc"] = accuracy(frozen, data)
            compiled(converted, args.learning_rate)
            converted.fit(data.x_train, data.y_train, epochs=1, **fit)
            row["calibrated_acc"] = accuracy(converted, data)
            converted.quantize("int8")
            row["int8_acc"] = accuracy(converted, data)
            rows.append(row)
            progress.step(
                f"{name} seed {seed} k {k_ratio}",
                f"before {row['before_acc']:.4f} "
                f"(random gate {row['before_random_gate_acc']}) "
                f"calibrated {row['calibrated_acc']:.4f} "
                f"int8 {row['int8_acc']:.4f}",
            )
        if done is not None:
            done(rows)
    return rows


METRICS = (
    "dense_acc",
    "dense_plus1_acc",
    "dense_int8_acc",
    "iso_cost_acc",
    "before_acc",
    "before_random_gate_acc",
    "calibrated_acc",
    "calibrated_gate_light_acc",
    "int8_acc",
    "flops_ratio",
)


def summarize(rows):
    """One row per (dataset, k_ratio): mean and std over seeds, in points
    for accuracies; gaps to Dense and the issue's targets."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["k_ratio"]), []).append(row)
    summary = []
    for (name, k_ratio), group in groups.items():
        out = {"dataset": name, "k_ratio": k_ratio, "seeds": len(group)}
        for metric in METRICS:
            scale = 1.0 if metric == "flops_ratio" else 100.0
            values = [r[metric] * scale for r in group if r[metric] is not None]
            mean, std = common.mean_std(values) if values else (None, None)
            out[metric] = mean
            out[metric + "_std"] = std
        gaps = {
            "before_gap": "before_acc",
            "calibrated_gap": "calibrated_acc",
            "int8_gap": "int8_acc",
        }
        for gap, metric in gaps.items():
            out[gap] = common.mean_std(
                [100 * (r[metric] - r["dense_acc"]) for r in group]
            )[0]
        out["iso_cost_hidden"] = "-".join(map(str, group[0]["iso_cost_hidden"]))
        out["calibrated_vs_iso_cost"] = common.mean_std(
            [100 * (r["calibrated_acc"] - r["iso_cost_acc"]) for r in group]
        )
        out["int8_vs_calibrated"] = common.mean_std(
            [100 * (r["int8_acc"] - r["calibrated_acc"]) for r in group]
        )[0]
        out["target_before"] = out["before_gap"] >= -0.5
        out["target_calibrated"] = out["calibrated_gap"] >= -0.3
        out["target_int8"] = out["int8_vs_calibrated"] >= -0.3
        summary.append(out)
    return summary


def pm(key):
    return lambda row: (
        "—" if row[key] is None
        else f"{row[key]:.2f} ± {row[key + '_std']:.2f}"
    )


def yes_no(key):
    return lambda row: "yes" if row[key] else "no"


def run_accuracy(args):
    metadata = common.environment()
    metadata["load_before"] = common.load_average()
    progress = common.Progress(
        total=len(args.datasets) * len(args.seeds) * (1 + len(args.k_ratios)),
        label="convert",
    )
    rows = []
    def done(new_rows):
        # Written after each seed, so a partial run keeps its rows.
        metadata["load_after"] = common.load_average()
        write_accuracy(args, rows + new_rows, metadata)

    with tempfile.TemporaryDirectory() as folder:
        for name in args.datasets:
            rows.extend(run_dataset(name, args, progress, folder, done))


def write_accuracy(args, rows, metadata):
    summary = summarize(rows)
    settings = {
        "epochs": {row["dataset"]: row["epochs"] for row in rows},
        "train_limit": {
            n: args.train_limit or TRAIN_LIMIT[n] for n in args.datasets
        },
        "calibration_epochs": 1,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seeds": args.seeds,
        "rank": "default_rank(d, n)",
    }
    os.makedirs(args.output, exist_ok=True)
    common.write_json(os.path.join(args.output, "convert.json"), rows,
                      metadata, settings=settings, summary=summary)
    columns = [
        ("dataset", "Dataset", None),
        ("k_ratio", "k_ratio", ".2f"),
        ("seeds", "Seeds", None),
        ("flops_ratio", "FLOPs ratio", ".2f"),
        (pm("dense_acc"), "Dense", None),
        (pm("before_acc"), "Converted, no fit", None),
        (pm("before_random_gate_acc"), "Random gate, no fit", None),
        (pm("calibrated_acc"), "1 calib. epoch (all)", None),
        (pm("calibrated_gate_light_acc"), "1 calib. epoch (gate+light)",
         None),
        (pm("dense_plus1_acc"), "Dense +1 epoch", None),
        (pm("int8_acc"), "Converted int8", None),
        (pm("dense_int8_acc"), "Dense int8", None),
        (pm("iso_cost_acc"), "Iso-cost Dense, +1 epoch", None),
        ("iso_cost_hidden", "Iso-cost widths", None),
        (lambda row: "{:+.2f} ± {:.2f}".format(*row["calibrated_vs_iso_cost"]),
         "Calibrated − iso-cost Dense", None),
    ]
    targets = [
        ("dataset", "Dataset", None),
        ("k_ratio", "k_ratio", ".2f"),
        ("seeds", "Seeds", None),
        ("before_gap", "No fit − Dense", "+.2f"),
        (yes_no("target_before"), "≥ −0.5?", None),
        ("calibrated_gap", "Calibrated − Dense", "+.2f"),
        (yes_no("target_calibrated"), "≥ −0.3?", None),
        ("int8_vs_calibrated", "int8 − calibrated", "+.2f"),
        (yes_no("target_int8"), "≥ −0.3?", None),
    ]
    notes = [
        "Test accuracy in %, mean ± std over the seeds run "
        f"({args.seeds} asked). Random gate and gate+light calibration: at "
        f"k_ratio {args.full_k_ratios} only (— elsewhere). Dense trained "
        + ", ".join(
            f"{n} {e} epochs on "
            + (f"{settings['train_limit'][n]} training examples"
               if settings["train_limit"][n] else "the full training split")
            for n, e in settings["epochs"].items()
        )
        + f" (Adam {args.learning_rate}, batch {args.batch_size}); "
        "calibration: 1 epoch, same optimizer settings, fresh Adam. "
        "FLOPs ratio: Dense multiply-adds of the converted layers over "
        "their MIDL multiply-adds (gate and light path included). "
        "Iso-cost Dense: the same architecture with hidden widths scaled "
        "to the converted model's inference multiply-adds (at most), "
        "trained from scratch for the Dense epochs + 1 (the converted "
        "model's training: the Dense epochs and 1 calibration epoch); "
        "the last column is the mean ± std of the per-seed differences. "
        "File sizes: `convert_latency.md`.",
        "",
        "## Targets (issue 13), mean gaps in points",
        "",
        common.markdown_table(summary, targets),
        "",
        f"Load average before/after: {metadata['load_before']} / "
        f"{metadata['load_after']}.",
    ]
    common.write_markdown(
        os.path.join(args.output, "convert.md"), summary, metadata, columns,
        title="Converting trained Dense models to MIDL", notes=notes,
    )
    print(common.markdown_table(summary, targets))


# --- latency --------------------------------------------------------------


LATENCY_MODELS = {
    "mnist": ((784,), 10, "mlp"),
    "adult": ((105,), 2, "mlp"),
    "cifar10": ((32, 32, 3), 10, "cnn"),
}


def child_latency(args):
    import keras

    import keras_midl
    from benchmarks import latency
    from benchmarks import models

    latency.set_threads(1)
    rows = []
    for name in args.datasets:
        shape, classes, _ = LATENCY_MODELS[name]
        keras.utils.set_random_seed(0)
        dense = models.build(name, "baseline", shape, classes)
        candidates = {"Dense": dense}
        dense_int8 = copy_of(dense)
        dense_int8.quantize("int8")
        candidates["Dense int8"] = dense_int8
        for path in ("masked", "gathered"):
            converted = keras_midl.convert(dense, k_ratio=0.45,
                                           inference_path=path)
            candidates[f"MIDL {path}"] = converted
            quantized = keras_midl.convert(dense, k_ratio=0.45,
                                           inference_path=path)
            quantized.quantize("int8")
            candidates[f"MIDL int8 {path}"] = quantized
        sizes = {}
        with tempfile.TemporaryDirectory() as folder:
            for key, model in candidates.items():
                sizes[key] = file_size(model, folder, key.replace(" ", "_"))
        x = np.random.default_rng(0).normal(size=(1, *shape))
        x = x.astype("float32")
        functions = {}
        for key, model in candidates.items():
            function = latency.forward_function(model)
            tensor = keras.ops.convert_to_tensor(x)
            for _ in range(10):
                common.block(function(tensor))
            functions[key] = (lambda f, t: lambda: f(t))(function, tensor)
        load_before = common.wait_for_quiet()
        medians = common.interleaved_medians(functions, repeats=args.repeats)
        load_after = common.load_average()
        busy = not common.load_valid((load_before, load_after))
        for key, seconds in medians.items():
            rows.append({
                "backend": keras.backend.backend(),
                "dataset": name,
                "model": key,
                "microseconds": None if busy else seconds * 1e6,
                "vs_dense": None if busy else medians["Dense"] / seconds,
                "vs_dense_int8": (
                    None if busy else medians["Dense int8"] / seconds
                ),
                "kib": sizes[key] / 1024,
                "load_before": load_before,
                "load_after": load_after,
            })
    with open(args.child_latency, "w") as file:
        json.dump(rows, file)


def run_latency(args):

    metadata = common.environment()
    rows = []
    for backend in BACKENDS:
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            env = dict(os.environ, KERAS_BACKEND=backend,
                       **common.thread_environment(1))
            command = [sys.executable, "-m", "benchmarks.convert",
                       "--part", "latency", "--child-latency", handle.name,
                       "--repeats", str(args.repeats), "--datasets",
                       *args.datasets]
            common.run_child(command, 1, env=env)
            with open(handle.name) as file:
                rows.extend(json.load(file))
    os.makedirs(args.output, exist_ok=True)
    common.write_json(os.path.join(args.output, "convert_latency.json"),
                      rows, metadata)
    columns = [
        ("backend", "Backend", None),
        ("dataset", "Model", None),
        ("model", "Variant", None),
        (lambda r: "machine busy, not measured"
         if r["microseconds"] is None else f"{r['microseconds']:.0f}",
         "Batch-1 latency (µs)", None),
        ("vs_dense", "Speed-up vs Dense", ".2f"),
        ("vs_dense_int8", "vs Dense int8", ".2f"),
        ("kib", "File KiB", ".0f"),
        ("load_before", "Load before", ".2f"),
        ("load_after", "Load after", ".2f"),
    ]
    notes = [
        "Median of interleaved calls, one thread, batch 1, compiled "
        "inference function as in `benchmarks/latency.py` (jax.jit, "
        "tf.function, torch eager under no_grad). MIDL: the hidden Dense "
        "layers converted at k_ratio 0.45; int8: `model.quantize('int8')` "
        "(the output Dense layer too). Each backend's timings start once "
        "the load average has fallen to 0.5 after the warm-up; a "
        "measurement with a load average above 1 before or after is not "
        "reported. File: `model.save` of the "
        "uncompiled model (`.keras`, no optimizer state).",
    ]
    common.write_markdown(
        os.path.join(args.output, "convert_latency.md"), rows, metadata,
        columns, title="Batch-1 latency of converted models", notes=notes,
    )
    print(common.markdown_table(rows, columns))


def combine(args):
    """Tables from several partial runs; the metadata keeps each run's."""
    rows, parts = [], []
    for path in args.combine:
        with open(path) as file:
            payload = json.load(file)
        # Sizes saved by early runs included the optimizer state: dropped
        # (`--part latency` measures them on uncompiled models).
        rows.extend(
            {k: v for k, v in row.items() if not k.endswith("_bytes")}
            for row in payload["rows"]
        )
        parts.append(payload["metadata"])
    metadata = dict(parts[0])
    metadata["command"] = " ; ".join(
        [part["command"] for part in parts] + [common.command_line()]
    )
    metadata["parts"] = parts
    loads = [p.get(k) for p in parts for k in ("load_before", "load_after")]
    metadata["load_before"] = parts[0].get("load_before")
    metadata["load_after"] = max(v for v in loads if v is not None)
    args.datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    args.seeds = sorted({row["seed"] for row in rows})
    write_accuracy(args, rows, metadata)


def main(argv=None):
    args = parse_args(argv)
    if args.combine:
        combine(args)
    elif args.child_latency:
        child_latency(args)
    elif args.part == "latency":
        run_latency(args)
    else:
        run_accuracy(args)


if __name__ == "__main__":
    main()
