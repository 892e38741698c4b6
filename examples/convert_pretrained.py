"""From a trained Dense model to a cheaper MIDL one: train, convert,
calibrate, quantize.

    KERAS_BACKEND=jax python examples/convert_pretrained.py \\
        --data-dir ../shared/datasets

Trains a 784-512-256-10 Dense MLP on MNIST, converts its hidden layers with
`keras_midl.convert` (no training needed to start: the light path is the
truncated SVD of each kernel and the gate picks the neurons with the largest
approximate pre-activation), calibrates it for one epoch, quantizes it to
int8 with Keras's `model.quantize("int8")`, and prints one line per step.

`--data-dir DIR` (or KERAS_MIDL_DATA_DIR) reads `DIR/mnist/mnist.npz` (the
arrays of `keras.datasets.mnist`); without it, `keras.datasets.mnist`
downloads the data. `--max-examples 2000` trains and tests on a random
subset (a quick check).
"""

import argparse
import os

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
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    compile_and_fit(dense, args.epochs)

    # 2. Convert: every Dense layer except the output becomes a MIDL layer.
    midl = compile_and_fit(keras_midl.convert(dense, k_ratio=args.k_ratio), 0)

    # 3. Calibrate: one epoch on the training data (a fresh copy, to compare).
    calibrated = compile_and_fit(
        keras_midl.convert(dense, k_ratio=args.k_ratio), 1
    )

    # 4. Quantize: the full-path kernels to int8, per-neuron scales.
    quantized = keras.models.clone_model(calibrated)
    quantized.set_weights(calibrated.get_weights())
    quantized.quantize("int8")
    compile_and_fit(quantized, 0)

    report("Dense", dense, dense)
    report(f"MIDL k={args.k_ratio}, no fit", midl, dense)
    report("MIDL, 1 calibration epoch", calibrated, dense)
    report("MIDL, calibrated, int8", quantized, dense)


if __name__ == "__main__":
    main()
