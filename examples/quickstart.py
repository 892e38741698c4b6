"""Quickstart: MIDL against a Dense MLP of the same width and one of the
same cost.

Trains three MLPs on scikit-learn's bundled handwritten digits (1,797 real
8x8 images, no download), with the same seeds, optimizer and epochs:
Dense 64-256-128-10, the same MLP with MIDL hidden layers, and the Dense
MLP narrowed until it costs what the MIDL one costs
(`keras_midl.flops.iso_cost_units`), the alternative a user really has.
Prints their test accuracy (mean and std over seeds), multiply-adds (MIDL's
gate and light path included), MIDL's accuracy difference to each Dense
model per seed, and a batch-1 latency of each trained model called as
`model(x)`.

Needs keras-midl, a backend and scikit-learn (`pip install
"keras-midl[jax,examples]"`); it imports nothing else:

    python examples/quickstart.py --backend jax --k-ratio 0.45 --epochs 40

(or `python -m examples.quickstart ...` from the repository root, as
`bash scripts/demo.sh` does with the pinned versions). `--balance-weight`
and `--convert-epochs` try two of the recipes of
docs/accuracy_per_cost.md.

Writes the printed comparison, with the command, versions, machine and load
average, to `quickstart.md` in `--output` (default: a `keras_midl_results`
folder in the system's temporary folder).
"""

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as error:
    raise SystemExit(
        f'{error.name} is missing: pip install "keras-midl[examples]"'
    ) from error

PACKAGES = ("keras", "keras-midl", "numpy", "tensorflow", "tensorflow-cpu",
            "jax", "jaxlib", "torch", "scikit-learn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend (default: $KERAS_BACKEND, else jax).",
    )
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    parser.add_argument(
        "--balance-weight", type=float, default=0.1,
        help="MIDL's balance_weight (default: %(default)s).",
    )
    parser.add_argument(
        "--convert-epochs", type=int, default=0,
        help="Train the MIDL model as Dense, then convert it "
        "(keras_midl.convert) and train it as MIDL for this many of the "
        "epochs; 0 trains MIDL from scratch (default: %(default)s).",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(tempfile.gettempdir(), "keras_midl_results"),
        help="Folder for quickstart.md (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.convert_epochs < args.epochs:
        parser.error(
            f"--convert-epochs must be in [0, --epochs): received "
            f"{args.convert_epochs} with --epochs {args.epochs}"
        )
    return args


def load_digits_split(seed=0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def build_mlp(hidden_layer, input_dim, hidden_units, num_classes=10):
    import keras

    layers = [keras.Input((input_dim,))]
    layers += [hidden_layer(units) for units in hidden_units]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers)


def load_average():
    """The 1-minute load average, or None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_info(backend, load_before, load_after):
    """Markdown lines: command, versions, machine, load average, date."""
    script = f"-m {__spec__.name}" if __spec__ else sys.argv[0]
    arguments = " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:  # The commit, when the script runs from a git checkout.
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    return (
        f"Command: `KERAS_BACKEND={backend} python {script} {arguments}`  \n"
        f"Backend: {backend}; {', '.join(versions)}; "
        f"Python {platform.python_version()}  \n"
        f"Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs; "
        f"load average {load_before} before, {load_after} after  \n"
        f"Date: {date}" + (f", commit {commit}" if commit else "")
    )


def wait_for_quiet(limit=1.0, timeout=90):
    """Waits until the 1-minute load average is below `limit` (at most
    `timeout` seconds); returns the last reading."""
    deadline = time.monotonic() + timeout
    load = load_average()
    while load is not None and load >= limit and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()
    return load


def latency_ms(models, x, rounds=7, calls=30):
    """Median milliseconds of one `model(x)` call, per model: rounds
    interleaved across the models, so that load drifts hit them alike."""
    samples = {name: [] for name in models}
    for model in models.values():
        model(x)  # warm-up: builds caches and compiles
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: sorted(values)[len(values) // 2]
            for name, values in samples.items()}


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before importing keras
    load_before = load_average()
    lines = []

    def report(line=""):
        print(line, flush=True)
        lines.append(line)

    import keras
    import numpy as np

    import keras_midl
    from keras_midl import MIDL
    from keras_midl import flops

    x_train, x_test, y_train, y_test = load_digits_split()
    input_dim, num_classes = x_train.shape[1], 10
    # The Dense alternative a user really has: the same MLP, narrowed
    # until it costs what the MIDL model costs (keras_midl.flops).
    budget = flops.midl_stack_multiply_adds(
        input_dim, args.hidden, args.k_ratio, output_units=num_classes
    )
    iso_units = flops.iso_cost_units(
        input_dim, args.hidden, budget, output_units=num_classes
    )
    widths = {"Dense": args.hidden, "Dense, iso-cost": iso_units,
              "MIDL": args.hidden}

    def dense(units):
        return keras.layers.Dense(units, activation="relu")

    def midl(units):
        return MIDL(units, k_ratio=args.k_ratio, activation="relu",
                    balance_weight=args.balance_weight)

    def compiled(model):
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def train(name, seed):
        keras.utils.set_random_seed(seed)
        fit = {"batch_size": 32, "verbose": 0}
        from_scratch = name == "MIDL" and not args.convert_epochs
        hidden_layer = midl if from_scratch else dense
        model = compiled(build_mlp(hidden_layer, input_dim, widths[name]))
        if name != "MIDL" or not args.convert_epochs:
            model.fit(x_train, y_train, epochs=args.epochs, **fit)
            return model
        # Train as Dense, convert the hidden layers, train as MIDL: the
        # same number of epochs in all.
        model.fit(x_train, y_train,
                  epochs=args.epochs - args.convert_epochs, **fit)
        model = compiled(keras_midl.convert(
            model, k_ratio=args.k_ratio, balance_weight=args.balance_weight
        ))
        model.fit(x_train, y_train, epochs=args.convert_epochs, **fit)
        return model

    accuracy = {name: [] for name in widths}
    train_time = {name: [] for name in widths}
    models = {}
    for seed in range(args.seeds):
        for name in widths:  # interleaved
            start = time.perf_counter()
            model = train(name, seed)
            train_time[name].append(time.perf_counter() - start)
            accuracy[name].append(
                model.evaluate(x_test, y_test, verbose=0)[1] * 100
            )
            models[name] = model
            report(f"seed {seed} {name:15s} test accuracy "
                   f"{accuracy[name][-1]:.2f}%")

    # Training raised the load average; let it fall below 1 (at most 90 s)
    # so that the timing is not taken beside other work. The timing's own
    # thread counts 1 in the reading after it.
    load_mid = wait_for_quiet()
    latency = latency_ms(models, x_test[:1])
    load_after = load_average()
    busy = (load_mid is None or load_mid >= 1) or (
        load_after is not None and load_after > 2
    )
    loads = [load_before, load_mid, load_after]
    recipe = (
        f"converted from Dense for the last {args.convert_epochs} epochs"
        if args.convert_epochs else "trained from scratch"
    )
    report(
        f"\nsklearn digits (1,347 train / 450 test), MLP 64-"
        f"{'-'.join(map(str, args.hidden))}-10, {args.epochs} epochs, "
        f"{args.seeds} seeds, backend {keras.backend.backend()}, "
        f"keras {keras.__version__}; MIDL k_ratio {args.k_ratio}, "
        f"balance_weight {args.balance_weight}, {recipe}\n"
    )
    report(
        "| model | units | test accuracy (%) | multiply-adds | "
        "Dense / this | batch-1 model(x) (ms) |"
    )
    report("|" + "---|" * 6)
    dense_cost = flops.model_multiply_adds(models["Dense"])
    for name, model in models.items():
        cost = flops.model_multiply_adds(model)
        report(
            f"| {name} | {'-'.join(map(str, widths[name]))} | "
            f"{np.mean(accuracy[name]):.2f} +- {np.std(accuracy[name]):.2f} | "
            f"{cost:,} | {dense_cost / cost:.2f}x | "
            + ("busy" if busy else f"{latency[name]:.3f}") + " |"
        )

    def gap(other):
        differences = np.subtract(accuracy["MIDL"], accuracy[other])
        return f"{differences.mean():+.2f} +- {differences.std():.2f}"

    report(
        f"\nMIDL - Dense: {gap('Dense')} points; MIDL - iso-cost Dense: "
        f"{gap('Dense, iso-cost')} points (per-seed differences)."
    )
    if busy:
        report(
            f"Machine busy (load average {loads}: before training, before "
            "and after timing): no latency measured."
        )
    else:
        report(
            "Batch-1 latency, median of 7 interleaved rounds of 30 calls: "
            f"MIDL / Dense {latency['MIDL'] / latency['Dense']:.2f}x, "
            "MIDL / iso-cost Dense "
            f"{latency['MIDL'] / latency['Dense, iso-cost']:.2f}x (below 1: "
            "MIDL faster).\nAt this size a call's time is per-call overhead, "
            "not multiply-adds: on TensorFlow and JAX\nMIDL's eager call "
            "runs as one compiled function, Dense's op by op. Savings from\n"
            "sparsity start at layers of about d = n = 1024 "
            "(docs/inference_paths.md)."
        )
    report(
        "Multiply-adds are analytic, per example, MIDL's gate and light path "
        "included."
    )
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "quickstart.md")
    with open(path, "w") as file:
        file.write(
            "# examples/quickstart.py output\n\n"
            f"{run_info(keras.backend.backend(), load_before, load_after)}\n\n"
            "```\n" + "\n".join(lines).strip() + "\n```\n"
        )
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
