"""Tiny MNIST-like dataset folders for the benchmark tests (no shared
data)."""

import os

import numpy as np


def write_mnist(folder, rng, train=60, test_per_class=8, side=4):
    """Writes `folder/mnist/mnist.npz`: `train` random training images
    (labels cycling over the 10 classes) and a test split sorted by class,
    `test_per_class` images each, `side x side` pixels."""
    os.makedirs(folder / "mnist")
    y_test = np.repeat(np.arange(10), test_per_class)
    np.savez(
        folder / "mnist" / "mnist.npz",
        x_train=rng.integers(0, 256, (train, side, side), dtype=np.uint8),
        y_train=np.arange(train) % 10,
        x_test=rng.integers(0, 256, (len(y_test), side, side),
                            dtype=np.uint8),
        y_test=y_test,
    )
