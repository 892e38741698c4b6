"""Quickstart: a Dense MLP against the same MLP with MIDL hidden layers.

Trains both on scikit-learn's bundled handwritten digits (1,797 real 8x8
images, no download), with the same seeds, optimizer and epochs, and prints
test accuracy (mean and std over seeds), the active-neuron fraction, the
inference multiply-adds of the hidden layers (MIDL's gate and light path
included) and the training-time ratio.

Needs keras-midl, a backend and scikit-learn (`pip install
"keras-midl[jax,examples]"`); it imports nothing else:

    python examples/quickstart.py --backend jax --k-ratio 0.45 --epochs 40

(or `python -m examples.quickstart ...` from the repository root, as
`bash scripts/demo.sh` does with the pinned versions).

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
        "--output",
        default=os.path.join(tempfile.gettempdir(), "keras_midl_results"),
        help="Folder for quickstart.md (default: %(default)s).",
    )
    return parser.parse_args(argv)


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

    from keras_midl import MIDL
    from keras_midl import flops

    x_train, x_test, y_train, y_test = load_digits_split()
    variants = {
        "Dense": lambda units: keras.layers.Dense(units, activation="relu"),
        "MIDL": lambda units: MIDL(
            units, k_ratio=args.k_ratio, activation="relu"
        ),
    }
    accuracy = {name: [] for name in variants}
    train_time = {name: [] for name in variants}
    models = {}
    for seed in range(args.seeds):
        for name, hidden_layer in variants.items():  # interleaved
            keras.utils.set_random_seed(seed)
            model = build_mlp(hidden_layer, x_train.shape[1], args.hidden)
            model.compile(
                keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            start = time.perf_counter()
            model.fit(
                x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0
            )
            train_time[name].append(time.perf_counter() - start)
            accuracy[name].append(
                model.evaluate(x_test, y_test, verbose=0)[1] * 100
            )
            models[name] = model
            report(
                f"seed {seed} {name:5s} test accuracy {accuracy[name][-1]:.2f}%"
            )

    def hidden_multiply_adds(model):
        return sum(
            flops.layer_multiply_adds(layer) for layer in model.layers[:-1]
        )

    dense_cost = hidden_multiply_adds(models["Dense"])
    time_ratio = np.median(train_time["MIDL"]) / np.median(train_time["Dense"])
    # Timings on a machine busy with other work say nothing: drop them.
    load_after = load_average()
    busy = [x for x in (load_before, load_after) if x is not None and x > 1]
    report(
        f"\nsklearn digits (1,347 train / 450 test), MLP 64-"
        f"{'-'.join(map(str, args.hidden))}-10, {args.epochs} epochs, "
        f"{args.seeds} seeds, backend {keras.backend.backend()}, "
        f"keras {keras.__version__}\n"
    )
    header = (
        "| model | test accuracy (%) | active neurons | "
        "hidden multiply-adds | Dense / this | train time (s) |"
    )
    report(header)
    report("|" + "---|" * 6)
    for name, model in models.items():
        cost = hidden_multiply_adds(model)
        report(
            f"| {name} | {np.mean(accuracy[name]):.2f} +- "
            f"{np.std(accuracy[name]):.2f} | "
            f"{flops.active_fraction(model):.2f} | {cost:,} | "
            f"{dense_cost / cost:.2f}x | "
            + ("busy" if busy else f"{np.median(train_time[name]):.1f}")
            + " |"
        )
    if busy:
        timing = (
            f"Machine busy (load average {load_before} before, {load_after} "
            "after the run): training times not measured."
        )
    else:
        timing = (
            "MIDL / Dense training time (median over seeds): "
            f"{time_ratio:.2f}x."
        )
    report(
        f"\n{timing}"
        "\nMultiply-adds are analytic, per example, counting the full path of "
        "the k selected\nneurons only; through keras.ops on a CPU they are "
        'not a wall-clock saving\n(docs/inference_paths.md).'
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
