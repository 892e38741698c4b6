"""From a trained Dense model to a cheaper MIDL one: train, convert,
calibrate, quantize, serve.

    KERAS_BACKEND=jax python -m examples.convert_pretrained \\
        --data-dir ../shared/datasets

Trains a 784-512-256-10 Dense MLP on MNIST, converts its hidden layers with
`keras_midl.convert` (no training needed to start: the light path is the
truncated SVD of each kernel and the gate picks the neurons with the largest
approximate pre-activation), calibrates it for one epoch, quantizes it to
int8 with Keras's `model.quantize("int8")`, and prints one line per step.
Then it serves: saves the int8 model, loads it back, and times batch-1
`model(x)` of the loaded int8 MIDL model against the float Dense model
(interleaved calls, medians). The converted layers use
`inference_path="auto"`, so on a CPU eager calls read only the selected
int8 rows (`keras_midl.ops.dispatch`). At the default widths the layers
are too small for that to beat Dense (the call overhead dominates); with
`--hidden 4096 4096` it does (benchmarks/results/latency/latency_int8.md
measures one such layer).

`--data-dir DIR` (or KERAS_MIDL_DATA_DIR) reads `DIR/mnist/mnist.npz` (the
arrays of `keras.datasets.mnist`); without it, `keras.datasets.mnist`
downloads the data. `--max-examples 2000` trains and tests on a random
subset (a quick check).
"""

import argparse
import os
import tempfile
import time

import keras
import numpy as np

import keras_midl
from keras_midl import flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("KERAS_MIDL_DATA_DIR")
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256],
                        help="widths of the hidden Dense layers")
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed batch-1 calls per model when serving")
    return parser.parse_args(argv)


def load_mnist(data_dir=None):
    """`(x_train, y_train), (x_test, y_test)`, pixels scaled to [0, 1]."""
    if data_dir:
        with np.load(os.path.join(data_dir, "mnist", "mnist.npz")) as data:
            splits = [
                (data["x_train"], data["y_train"]),
                (data["x_test"], data["y_test"]),
            ]
    else:
        splits = keras.datasets.mnist.load_data()
    return [(x.astype("float32") / 255, y.astype("int32")) for x, y in splits]


def subset(x, y, size, seed=0):
    """At most `size` random examples of `(x, y)`."""
    index = np.random.default_rng(seed).permutation(len(x))[:size]
    return x[index], y[index]


def main(argv=None):
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir)
    if args.max_examples:
        x_train, y_train = subset(x_train, y_train, args.max_examples)
        x_test, y_test = subset(x_test, y_test, args.max_examples)

    def compile_and_fit(model, epochs):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        if epochs:
            model.fit(x_train, y_train, batch_size=128, epochs=epochs)
        return model

    def report(label, model, reference):
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        # Bytes of the weights (a saved, compiled model also holds the
        # optimizer's state).
        size = sum(keras.ops.convert_to_numpy(v).nbytes for v in model.weights)
        ratio = flops.flops_ratio(reference, model)
        print(
            f"{label:<28} accuracy {accuracy:.4f}   FLOPs ratio {ratio:.2f}   "
            f"weights {size / 1024:.0f} KiB"
        )

    # 1. A trained Dense model (yours).
    dense = keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.Flatten(),
        *[keras.layers.Dense(units, activation="relu")
          for units in args.hidden],
        keras.layers.Dense(10, activation="softmax"),
    ])
    compile_and_fit(dense, args.epochs)

    # 2. Convert: every Dense layer except the output becomes a MIDL layer;
    #    "auto" reads only the selected rows where that was measured faster.
    def converted():
        return keras_midl.convert(
            dense, k_ratio=args.k_ratio, inference_path="auto"
        )

    midl = compile_and_fit(converted(), 0)

    # 3. Calibrate: one epoch on the training data (a fresh copy, to compare).
    calibrated = compile_and_fit(converted(), 1)

    # 4. Quantize: the full-path kernels to int8, per-neuron scales.
    quantized = keras.models.clone_model(calibrated)
    quantized.set_weights(calibrated.get_weights())
    quantized.quantize("int8")
    compile_and_fit(quantized, 0)

    report("Dense", dense, dense)
    report(f"MIDL k={args.k_ratio}, no fit", midl, dense)
    report("MIDL, 1 calibration epoch", calibrated, dense)
    report("MIDL, calibrated, int8", quantized, dense)

    # 5. Serve: save, load, and call with one example at a time.
    path = os.path.join(tempfile.mkdtemp(), "midl_int8.keras")
    quantized.save(path)
    served = keras.saving.load_model(path)
    x = keras.ops.convert_to_tensor(x_test[:1])
    same = np.allclose(
        keras.ops.convert_to_numpy(served(x)),
        keras.ops.convert_to_numpy(quantized(x)),
        atol=1e-5,
    )
    print(f"loaded int8 model predicts as the saved one: {same}")
    times = time_batch_one({"Dense (float)": dense, "MIDL int8": served}, x,
                           args.repeats)
    for label, seconds in times.items():
        print(f"{label:<28} batch-1 model(x) {seconds * 1e3:.3f} ms")
    ratio = times["Dense (float)"] / times["MIDL int8"]
    print(f"Dense / MIDL int8: {ratio:.2f}x (measured now, on this machine: "
          "a busy machine moves it)")


def time_batch_one(models, x, repeats):
    """Median seconds of `model(x)` per model, calls interleaved (on
    PyTorch under `torch.no_grad()`, as a server calls it)."""
    if keras.backend.backend() == "torch":
        import torch

        no_grad = torch.no_grad
    else:
        import contextlib

        no_grad = contextlib.nullcontext
    times = {label: [] for label in models}
    with no_grad():
        for model in models.values():  # warm-up: builds, compiles
            for _ in range(3):
                keras.ops.convert_to_numpy(model(x))
        for _ in range(repeats):
            for label, model in models.items():
                start = time.perf_counter()
                keras.ops.convert_to_numpy(model(x))
                times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t)) for label, t in times.items()}


if __name__ == "__main__":
    main()
