"""The training-time selection gives `topk_mask`'s mask, bit for bit."""

import numpy as np
import pytest
from conftest import BACKEND
from keras import ops

from keras_midl import compiled_selection
from keras_midl.selection import SELECTION_METHODS
from keras_midl.selection import topk_mask


def _scores(rng):
    scores = rng.normal(size=(12, 40)).astype("float32")
    scores[0] = 0.5  # all tied
    scores[1, ::3] = np.nan
    scores[2, :20] = np.inf
    scores[3, 10:30] = scores[3, 10]  # ties at the threshold
    return scores


def _in_graph(fn):
    """`fn` as `fit` runs it: a `tf.function` without XLA on TensorFlow."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("k", [1, 17, 39])
def test_training_mask_is_topk_mask(method, k, rng):
    scores = _scores(rng)
    expected = ops.convert_to_numpy(topk_mask(scores, k, method=method))
    for run in (
        compiled_selection.training_topk_mask,
        _in_graph(compiled_selection.training_topk_mask),
    ):
        mask = ops.convert_to_numpy(run(scores, k, method))
        np.testing.assert_array_equal(mask, expected)


def test_compilation_can_be_turned_off(monkeypatch, rng):
    monkeypatch.setenv("KERAS_MIDL_COMPILE", "0")
    compiled_selection._functions.clear()
    scores = _scores(rng)
    mask = compiled_selection.training_topk_mask(scores, 9, "bisection")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(mask),
        ops.convert_to_numpy(topk_mask(scores, 9, method="bisection")),
    )
    assert not compiled_selection._functions


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA on TensorFlow only")
def test_tensorflow_compiles_one_function_per_selection_and_signature(rng):
    compiled_selection._functions.clear()
    scores = _scores(rng)
    for k in (3, 3, 5):
        compiled_selection.training_topk_mask(scores, k, "top_k")
    compiled_selection.training_topk_mask(scores[:5], 3, "top_k")
    compiled_selection.training_topk_mask(scores[None], 3, "top_k")
    assert sorted(key[:3] for key in compiled_selection._functions) == [
        (3, "top_k", 2),
        (3, "top_k", 3),
        (5, "top_k", 2),
    ]


@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40), (3, 4, 40)])
def test_training_mask_of_any_rank_and_empty_batches(shape, rng):
    """Ranks and batch sizes in any order (a relaxed signature once lost
    the rank after seeing two)."""
    for rows in (shape, (5, 40), shape):
        scores = rng.normal(size=rows).astype("float32")
        mask = compiled_selection.training_topk_mask(scores, 7, "bisection")
        np.testing.assert_array_equal(
            ops.convert_to_numpy(mask),
            ops.convert_to_numpy(topk_mask(scores, 7, method="bisection")),
        )
