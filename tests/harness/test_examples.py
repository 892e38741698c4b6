"""examples/: the scripts a user copies run end to end on tiny data."""

import numpy as np

from examples import convert_pretrained


def write_mnist(folder, rng, size=120):
    """A tiny `mnist/mnist.npz` with the arrays of keras.datasets.mnist."""
    (folder / "mnist").mkdir()
    arrays = {}
    for split in ("train", "test"):
        arrays[f"x_{split}"] = rng.integers(0, 256, (size, 28, 28), "uint8")
        arrays[f"y_{split}"] = rng.integers(0, 10, size, "uint8")
    np.savez(folder / "mnist" / "mnist.npz", **arrays)


def test_convert_pretrained_trains_converts_quantizes_and_serves(
    tmp_path, capsys, rng
):
    write_mnist(tmp_path, rng)
    convert_pretrained.main([
        "--data-dir", str(tmp_path), "--epochs", "1", "--hidden", "32", "16",
        "--repeats", "2",
    ])
    printed = capsys.readouterr().out
    assert "MIDL, calibrated, int8" in printed
    assert "loaded int8 model predicts as the saved one: True" in printed
    assert "Dense / MIDL int8:" in printed
