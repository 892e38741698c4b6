"""From a trained Dense model to a cheaper MIDL one: train, convert,
calibrate, quantize.

    KERAS_BACKEND=jax python -m examples.convert_pretrained \\
        --data-dir ../shared/datasets

Run from the repository root (it imports `benchmarks.datasets`).

Trains a 784-512-256-10 Dense MLP on MNIST, converts its hidden layers with
`keras_midl.convert` (no training needed to start: the light path is the
truncated SVD of each kernel and the gate picks the neurons with the largest
approximate pre-activation), calibrates it for one epoch, quantizes it to
int8 with Keras's `model.quantize("int8")`, and prints one line per step.
Without `--data-dir` (or KERAS_MIDL_DATA_DIR) the data comes from TensorFlow
Datasets.
"""

import argparse

import keras

import keras_midl
from benchmarks import datasets
from keras_midl import flops

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", default=None)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--k-ratio", type=float, default=0.45)
args = parser.parse_args()

data = datasets.load("mnist", data_dir=args.data_dir)


def compile_and_fit(model, epochs):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if epochs:
        model.fit(data.x_train, data.y_train, batch_size=128, epochs=epochs)
    return model


def report(label, model, reference):
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    # Bytes of the weights (a saved, compiled model also holds the
    # optimizer's state).
    size = sum(keras.ops.convert_to_numpy(v).nbytes for v in model.weights)
    ratio = flops.flops_ratio(reference, model)
    print(
        f"{label:<28} accuracy {accuracy:.4f}   FLOPs ratio {ratio:.2f}   "
        f"weights {size / 1024:.0f} KiB"
    )


# 1. A trained Dense model (yours).
dense = keras.Sequential(
    [
        keras.Input(data.x_train.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
compile_and_fit(dense, args.epochs)

# 2. Convert: every Dense layer except the output becomes a MIDL layer.
midl = compile_and_fit(keras_midl.convert(dense, k_ratio=args.k_ratio), 0)

# 3. Calibrate: one epoch on the training data (a fresh copy, to compare).
calibrated = compile_and_fit(keras_midl.convert(dense, args.k_ratio), 1)

# 4. Quantize: the full-path kernels to int8, per-neuron scales.
quantized = keras.models.clone_model(calibrated)
quantized.set_weights(calibrated.get_weights())
quantized.quantize("int8")
compile_and_fit(quantized, 0)

report("Dense", dense, dense)
report(f"MIDL k={args.k_ratio}, no fit", midl, dense)
report("MIDL, 1 calibration epoch", calibrated, dense)
report("MIDL, calibrated, int8", quantized, dense)
