"""CIFAR-10: a small CNN whose dense head is a MIDL layer.

    KERAS_BACKEND=jax python -m examples.cifar10_cnn \
        --data-dir ../shared/datasets

Only the dense head (Flatten -> 256 -> 10) uses MIDL; the convolutions are
the same in both variants. The same script works for `--dataset cifar100`
and `--dataset svhn_cropped`.

Run from the repository root (it imports `benchmarks.datasets`); without
`--data-dir` the data comes from TensorFlow Datasets: `pip install -c
requirements/constraints.txt -r requirements/benchmarks.txt`.
"""

import argparse

import keras

from benchmarks import datasets
from benchmarks import models
from keras_midl import flops

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", default=None)
parser.add_argument("--dataset", default="cifar10",
                    choices=["cifar10", "cifar100", "svhn_cropped"])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--k-ratio", type=float, default=0.45)
parser.add_argument("--variant", choices=models.VARIANTS, default="midl")
args = parser.parse_args()

data = datasets.load(args.dataset, data_dir=args.data_dir)
model = models.cnn(
    data.x_train.shape[1:],
    data.num_classes,
    variant=args.variant,
    hidden_units=(256,),
    k_ratio=args.k_ratio,
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.fit(data.x_train, data.y_train, batch_size=128, epochs=args.epochs)
_, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
print(f"test accuracy: {accuracy:.4f}")
flops.summary(model)
