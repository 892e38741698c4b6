"""Tests of benchmarks.datasets: TFDS (mocked) and local files written here.

Nothing here reads ../shared or the network: TFDS runs under
`tfds.testing.mock_data`, and local folders are tiny files the tests write.
"""

import gzip
import json
import os

import numpy as np
import pytest

from benchmarks import datasets

ADULT_TRAIN = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, \
Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, \
Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
38, ?, 215646, HS-grad, 9, Divorced, ?, Not-in-family, White, Female, \
0, 0, 40, ?, <=50K

"""
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, \
Black, Male, 0, 0, 40, United-States, <=50K.
44, State-gov, 160323, Bachelors, 10, Married-civ-spouse, Adm-clerical, \
Husband, White, Male, 7688, 0, 40, ?, >50K.
"""


@pytest.fixture(autouse=True)
def _no_data_dir_variable(monkeypatch):
    monkeypatch.delenv(datasets.DATA_DIR_VARIABLE, raising=False)


def write_npz(folder, name, filename, shape, num_classes, rng):
    os.makedirs(folder / name, exist_ok=True)
    arrays = {}
    for split, count in (("train", 6), ("test", 4)):
        arrays[f"x_{split}"] = rng.integers(
            0, 256, (count, *shape), dtype=np.uint8
        )
        arrays[f"y_{split}"] = rng.integers(0, num_classes, count)
    np.savez(folder / name / filename, **arrays)
    return arrays


def write_text(path, text, compress):
    os.makedirs(path.parent, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wt") as file:
            file.write(text)
    else:
        path.write_text(text)


def write_imdb(folder, compress=True):
    records = [
        {"split": "train", "label": 1, "text": "Great great movie<br />great"},
        {"split": "train", "label": 0, "text": "Bad, bad movie"},
        {"split": "unsup", "label": -1, "text": "ignored"},
        {"split": "test", "label": 1, "text": "great fun"},
        {"split": "test", "label": 0, "text": "unknownword bad"},
    ]
    text = "\n".join(json.dumps(record) for record in records) + "\n"
    write_text(folder / "imdb" / "imdb_reviews.jsonl", text, compress)


# --- local folder ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, filename, shape, num_classes",
    [
        ("mnist", "mnist.npz", (28, 28), 10),
        ("cifar10", "cifar10_jpeg_subset_20k_5k.npz", (32, 32, 3), 10),
        ("cifar100", "cifar100.npz", (32, 32, 3), 100),
        ("svhn_cropped", "any_name.npz", (32, 32, 3), 10),
    ],
)
def test_local_images(tmp_path, rng, name, filename, shape, num_classes):
    arrays = write_npz(tmp_path, name, filename, shape, num_classes, rng)
    data = datasets.load(name, data_dir=tmp_path)
    expected_shape = shape if len(shape) == 3 else (*shape, 1)
    assert data.x_train.shape == (6, *expected_shape)
    assert data.x_test.shape == (4, *expected_shape)
    assert data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int32
    np.testing.assert_allclose(
        data.x_train.reshape(arrays["x_train"].shape),
        arrays["x_train"] / 255.0,
        rtol=1e-6,
    )
    np.testing.assert_array_equal(data.y_test, arrays["y_test"])
    assert data.num_classes == num_classes
    assert data.source.endswith(filename)
    (x_train, y_train), (x_test, y_test) = data.as_tuples()
    assert x_train is data.x_train and y_test is data.y_test


def test_environment_variable_selects_local_folder(tmp_path, rng, monkeypatch):
    write_npz(tmp_path, "mnist", "mnist.npz", (28, 28), 10, rng)
    monkeypatch.setenv(datasets.DATA_DIR_VARIABLE, str(tmp_path))
    assert datasets.load("mnist").x_train.shape == (6, 28, 28, 1)


def test_npz_missing_arrays(tmp_path):
    os.makedirs(tmp_path / "mnist")
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="y_train"):
        datasets.load("mnist", data_dir=tmp_path)


def test_ambiguous_npz_files(tmp_path, rng):
    write_npz(tmp_path, "cifar10", "a.npz", (32, 32, 3), 10, rng)
    write_npz(tmp_path, "cifar10", "b.npz", (32, 32, 3), 10, rng)
    with pytest.raises(FileNotFoundError, match="exactly one"):
        datasets.load("cifar10", data_dir=tmp_path)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar100"):
        datasets.load("cifar100", data_dir=tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        datasets.load("mnist", data_dir=tmp_path / "nowhere")


def test_unknown_name_and_source():
    with pytest.raises(ValueError, match="name='fashion'"):
        datasets.load("fashion")
    with pytest.raises(ValueError, match="source='web'"):
        datasets.load("mnist", source="web")


def test_local_source_without_folder():
    with pytest.raises(ValueError, match="data_dir"):
        datasets.load("mnist", source="local")


@pytest.mark.parametrize("compress", [True, False])
def test_local_adult(tmp_path, compress):
    write_text(tmp_path / "adult" / "adult.data", ADULT_TRAIN, compress)
    write_text(tmp_path / "adult" / "adult.test", ADULT_TEST, compress)
    data = datasets.load("adult", data_dir=tmp_path)
    names = data.info["feature_names"]
    assert data.x_train.shape == (3, len(names))
    assert data.x_test.shape == (2, len(names))
    np.testing.assert_array_equal(data.y_train, [0, 1, 0])
    np.testing.assert_array_equal(data.y_test, [0, 1])
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    # Numeric columns: standardized with the training split's statistics.
    ages = np.array([39.0, 50.0, 38.0])
    age = names.index("age")
    np.testing.assert_allclose(
        data.x_train[:, age], (ages - ages.mean()) / ages.std(), rtol=1e-5
    )
    np.testing.assert_allclose(
        data.x_test[:, age], (np.array([25, 44]) - ages.mean()) / ages.std(),
        rtol=1e-5,
    )
    # Categories come from the training split; "?" is not a category.
    assert "workclass=?" not in names
    assert "workclass=State-gov" in names
    assert "workclass=Private" not in names  # only in the test split
    workclass = [i for i, n in enumerate(names) if n.startswith("workclass=")]
    train_hot = data.x_train[:, workclass].sum(axis=1)
    test_hot = data.x_test[:, workclass].sum(axis=1)
    np.testing.assert_array_equal(train_hot, [1, 1, 0])
    np.testing.assert_array_equal(test_hot, [0, 1])
    country = names.index("native-country=United-States")
    np.testing.assert_array_equal(data.x_test[:, country], [1, 0])


def test_adult_bad_rows(tmp_path):
    write_text(tmp_path / "adult" / "adult.data", "1, 2, 3\n", False)
    write_text(tmp_path / "adult" / "adult.test", ADULT_TEST, False)
    with pytest.raises(ValueError, match="15 comma-separated fields"):
        datasets.load("adult", data_dir=tmp_path)
    bad_label = ADULT_TRAIN.replace(">50K", "rich")
    write_text(tmp_path / "adult" / "adult.data", bad_label, False)
    with pytest.raises(ValueError, match="unknown label"):
        datasets.load("adult", data_dir=tmp_path)


def test_adult_missing_test_file(tmp_path):
    write_text(tmp_path / "adult" / "adult.data", ADULT_TRAIN, False)
    with pytest.raises(FileNotFoundError, match="adult.test"):
        datasets.load("adult", data_dir=tmp_path)


def test_adult_download_checks_md5(tmp_path, monkeypatch):
    # A cached file with the wrong contents fails the UCI checksum.
    write_text(tmp_path / "adult" / "adult.data", ADULT_TRAIN, False)
    write_text(tmp_path / "adult" / "adult.test", ADULT_TEST, False)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        datasets.load("adult", tfds_data_dir=tmp_path, download=False)
    # Matching checksums are accepted (patched to the tiny files' MD5).
    monkeypatch.setattr(
        datasets,
        "ADULT_MD5",
        {
            name: datasets.file_md5(str(tmp_path / "adult" / name))
            for name in ("adult.data", "adult.test")
        },
    )
    data = datasets.load("adult", tfds_data_dir=tmp_path, download=False)
    assert data.x_train.shape[0] == 3


def test_adult_not_cached_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=False"):
        datasets.load("adult", tfds_data_dir=tmp_path, download=False)


def test_file_md5_of_gzip_is_of_contents(tmp_path):
    write_text(tmp_path / "a.txt", "hello\n", False)
    write_text(tmp_path / "b.txt", "hello\n", True)
    assert datasets.file_md5(str(tmp_path / "a.txt")) == datasets.file_md5(
        str(tmp_path / "b.txt.gz")
    )
    assert datasets.file_md5(str(tmp_path / "a.txt")) == (
        "b1946ac92492d2347c6235b4d2611184"
    )


def test_imdb_vocabulary_size_limits_vocabulary(tmp_path):
    write_imdb(tmp_path)
    data = datasets.load(
        "imdb", data_dir=tmp_path, vocabulary_size=3, sequence_length=2
    )
    assert data.info["vocabulary"] == ["", "[UNK]", "great"]
    assert data.x_train.max() == 2


@pytest.mark.parametrize("compress", [True, False])
def test_local_imdb(tmp_path, compress):
    write_imdb(tmp_path, compress)
    data = datasets.load(
        "imdb", data_dir=tmp_path, vocabulary_size=9, sequence_length=4
    )
    # Ordered by training frequency (great 3; bad and movie 2, in either
    # order). "<br />" became a space: no "moviebr" token. Test-only words
    # are out of vocabulary (id 1).
    vocabulary = data.info["vocabulary"]
    assert vocabulary[:3] == ["", "[UNK]", "great"]
    assert sorted(vocabulary[3:]) == ["bad", "movie"]
    assert data.x_train.shape == (2, 4) and data.x_test.shape == (2, 4)
    assert data.x_train.dtype == np.int32
    np.testing.assert_array_equal(data.y_train, [1, 0])
    np.testing.assert_array_equal(data.y_test, [1, 0])
    great, bad = 2, vocabulary.index("bad")
    np.testing.assert_array_equal(data.x_test[0], [great, 1, 0, 0])
    np.testing.assert_array_equal(data.x_test[1], [1, bad, 0, 0])


def test_imdb_bad_line(tmp_path):
    path = tmp_path / "imdb" / "imdb_reviews.jsonl"
    write_text(path, '{"split": 1}\n', False)
    with pytest.raises(ValueError, match="line 1"):
        datasets.load("imdb", data_dir=tmp_path)


@pytest.mark.parametrize(
    "argument, value",
    [("vocabulary_size", 2), ("sequence_length", 0), ("sequence_length", 2.5)],
)
def test_imdb_invalid_parameters(tmp_path, argument, value):
    with pytest.raises(ValueError, match=argument):
        datasets.load("imdb", data_dir=tmp_path, **{argument: value})


# --- TFDS (mocked) --------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_tfds_images(tfds, tmp_path, name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=5):
        data = datasets.load(name, tfds_data_dir=tmp_path, download=False)
    assert data.source == "tfds"
    assert data.x_train.shape == (5, *shape)
    assert data.x_test.shape == (5, *shape)
    assert data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.y_train.dtype == np.int32
    assert ((0 <= data.y_test) & (data.y_test < num_classes)).all()


def test_tfds_imdb(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        data = datasets.load(
            "imdb",
            tfds_data_dir=tmp_path,
            download=False,
            vocabulary_size=50,
            sequence_length=7,
        )
    assert data.x_train.shape == (6, 7) and data.x_test.shape == (6, 7)
    assert data.x_train.dtype == np.int32
    assert set(np.unique(data.y_train)) <= {0, 1}
    assert data.x_train.max() < len(data.info["vocabulary"]) <= 50


def test_tfds_source_ignores_data_dir(tfds, tmp_path, rng):
    write_npz(tmp_path, "mnist", "mnist.npz", (28, 28), 10, rng)
    with tfds.testing.mock_data(num_examples=3):
        data = datasets.load(
            "mnist", data_dir=tmp_path, source="tfds", download=False
        )
    assert data.source == "tfds" and data.x_train.shape[0] == 3


# --- unreadable files, pixel scale, labels (audit defect 7) ---------------


def _corrupt(path, how):
    """Truncates a file, or overwrites its middle or all of it."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a zip or gzip file\n" * 20)
    else:  # "flipped": damage the compressed bytes in the middle.
        middle = len(data) // 2
        damaged = bytes(b ^ 0xFF for b in data[middle: middle + 64])
        path.write_bytes(data[:middle] + damaged + data[middle + 64:])


def _write_compressed_npz(folder, rng):
    os.makedirs(folder / "mnist", exist_ok=True)
    path = folder / "mnist" / "mnist.npz"
    np.savez_compressed(
        path,
        x_train=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_test=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 32),
    )
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped"])
def test_corrupt_npz_is_a_value_error_naming_the_file(tmp_path, rng, how):
    path = _write_compressed_npz(tmp_path, rng)
    _corrupt(path, how)
    with pytest.raises(ValueError, match="mnist.npz") as info:
        datasets.load("mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["adult", "imdb"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_gzip_is_a_value_error_naming_the_file(tmp_path, name, how):
    if name == "adult":
        # Large enough that half of the compressed file is a real prefix.
        write_text(tmp_path / "adult" / "adult.data", ADULT_TRAIN * 200, True)
        write_text(tmp_path / "adult" / "adult.test", ADULT_TEST, True)
        path = tmp_path / "adult" / "adult.data.gz"
    else:
        write_imdb(tmp_path, compress=True)
        path = tmp_path / "imdb" / "imdb_reviews.jsonl.gz"
    _corrupt(path, how)
    with pytest.raises(ValueError) as info:
        datasets.load(name, data_dir=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [True, False])
def test_non_utf8_adult_file_is_a_value_error_naming_the_file(
    tmp_path, compress
):
    latin1 = ADULT_TRAIN.replace("State-gov", "État").encode("latin-1")
    folder = tmp_path / "adult"
    os.makedirs(folder)
    path = folder / ("adult.data.gz" if compress else "adult.data")
    if compress:
        with gzip.open(path, "wb") as file:
            file.write(latin1)
    else:
        path.write_bytes(latin1)
    write_text(folder / "adult.test", ADULT_TEST, False)
    with pytest.raises(ValueError, match="adult.data") as info:
        datasets.load("adult", data_dir=tmp_path)
    assert str(path) in str(info.value)


def _write_images(folder, x_train, y_train, x_test, y_test):
    os.makedirs(folder / "mnist", exist_ok=True)
    np.savez(folder / "mnist" / "mnist.npz", x_train=x_train,
             y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_float_pixels_in_unit_range_are_not_divided_again(
    tmp_path, rng, dtype
):
    x_train = rng.uniform(0.0, 1.0, (6, 28, 28)).astype(dtype)
    x_test = rng.uniform(0.0, 1.0, (4, 28, 28)).astype(dtype)
    _write_images(tmp_path, x_train, np.arange(6), x_test, np.arange(4))
    data = datasets.load("mnist", data_dir=tmp_path)
    assert data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train[..., 0], x_train, rtol=1e-6)
    np.testing.assert_allclose(data.x_test[..., 0], x_test, rtol=1e-6)
    assert data.x_train.max() > 0.9  # not scaled down to [0, 1/255]


@pytest.mark.parametrize("dtype", ["uint8", "int64", "float32"])
def test_pixels_in_0_255_are_divided_by_255(tmp_path, rng, dtype):
    x_train = rng.integers(0, 256, (6, 28, 28)).astype(dtype)
    x_train[0, 0, 0] = 255
    # A test split whose largest pixel is 1 still uses the train scale.
    x_test = np.ones((4, 28, 28), dtype)
    _write_images(tmp_path, x_train, np.arange(6), x_test, np.arange(4))
    data = datasets.load("mnist", data_dir=tmp_path)
    np.testing.assert_allclose(data.x_train[..., 0], x_train / 255.0,
                               rtol=1e-6)
    np.testing.assert_allclose(data.x_test, 1 / 255.0, rtol=1e-6)


@pytest.mark.parametrize("low, high", [(-0.5, 1.0), (0.0, 300.0)])
def test_pixels_out_of_range_are_rejected(tmp_path, low, high):
    x = np.full((6, 28, 28), 0.5, "float32")
    x[0, 0, 0], x[0, 0, 1] = low, high
    _write_images(tmp_path, x, np.arange(6), x[:4], np.arange(4))
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 255\]"):
        datasets.load("mnist", data_dir=tmp_path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (0.7, "whole numbers"),
        (1.9, "whole numbers"),
        (np.nan, "whole numbers"),
        (-1, r"must lie in \[0, 9\]"),
        (300, r"must lie in \[0, 9\]"),
        (10, r"must lie in \[0, 9\]"),
    ],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_image_labels_must_be_class_indices(tmp_path, rng, bad, message,
                                            split):
    x = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = {"train": np.arange(6.0), "test": np.arange(4.0)}
    labels[split][1] = bad
    _write_images(tmp_path, x, labels["train"], x[:4], labels["test"])
    with pytest.raises(ValueError, match=message) as info:
        datasets.load("mnist", data_dir=tmp_path)
    assert f"mnist {split}" in str(info.value)


def test_whole_float_labels_are_accepted(tmp_path, rng):
    x = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_images(tmp_path, x, np.arange(6.0), x[:4], np.array([9.0] * 4))
    data = datasets.load("mnist", data_dir=tmp_path)
    assert data.y_train.dtype == np.int32
    np.testing.assert_array_equal(data.y_train, np.arange(6))
    np.testing.assert_array_equal(data.y_test, [9, 9, 9, 9])


@pytest.mark.parametrize("bad", [0.7, 1.9, -1, 2, 300, "1", True])
def test_imdb_labels_must_be_0_or_1(tmp_path, bad):
    records = [
        {"split": "train", "label": 1, "text": "great"},
        {"split": "train", "label": bad, "text": "bad"},
        {"split": "test", "label": 0, "text": "bad"},
    ]
    text = "\n".join(json.dumps(record) for record in records) + "\n"
    write_text(tmp_path / "imdb" / "imdb_reviews.jsonl", text, False)
    with pytest.raises(ValueError, match="line 2") as info:
        datasets.load("imdb", data_dir=tmp_path)
    assert "label" in str(info.value)


def test_check_labels_returns_int32():
    labels = datasets.check_labels([[0.0], [2.0], [1.0]], 3, "x")
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 2, 1])
    with pytest.raises(ValueError, match="must be numbers"):
        datasets.check_labels(np.array(["a", "b"]), 3, "x")


# --- stratified subsets ---------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 50, 100])
def test_stratified_indices_keep_class_shares(size):
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    index = datasets.stratified_indices(labels, size, seed=3)
    assert index.shape == (size,) and len(np.unique(index)) == size
    counts = np.bincount(labels[index], minlength=4)
    expected = size * np.array([0.4, 0.3, 0.2, 0.1])
    assert np.all(np.abs(counts - expected) < 1)
    np.testing.assert_array_equal(
        index, datasets.stratified_indices(labels, size, seed=3)
    )


def test_stratified_indices_of_sorted_labels_are_shuffled():
    labels = np.repeat(np.arange(10), 50)
    index = datasets.stratified_indices(labels, 100, seed=0)
    assert len(np.unique(labels[index[:30]])) > 3


@pytest.mark.parametrize("size", [0, -1, 12, 2.5])
def test_stratified_indices_invalid_size(size):
    with pytest.raises(ValueError, match="size"):
        datasets.stratified_indices(np.arange(11) % 2, size, seed=0)
