"""Shared test set-up: every test runs under the backend in KERAS_BACKEND."""

import keras
import numpy as np
import pytest
from inference_utils import spy_native_calls


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the native kernel's calls (skips where it is not built)."""
    calls = spy_native_calls(monkeypatch)
    if calls is None:
        pytest.skip("the native kernel could not be built here")
    return calls


@pytest.fixture
def selection_blocks(monkeypatch):
    """The `rows_per_block` of every compiled selection
    (`keras_midl.ops.dispatch`'s `topk_mask` calls), recorded as the
    backends pass it."""
    from keras_midl.ops import dispatch

    blocks = []
    original = dispatch.topk_mask

    def spy(*args, **kwargs):
        blocks.append(kwargs.get("rows_per_block"))
        return original(*args, **kwargs)

    monkeypatch.setattr(dispatch, "topk_mask", spy)
    return blocks
