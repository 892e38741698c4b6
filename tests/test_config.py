"""keras_midl.config: the switch for keras_midl's own compiled kernels."""

import pytest

from keras_midl import config


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    monkeypatch.setattr(config, "_enabled", None)
    monkeypatch.delenv(config.COMPILE_ENV, raising=False)


@pytest.mark.parametrize(
    "value, enabled",
    [("1", True), ("0", False), ("false", False), (" OFF ", False),
     ("no", False), ("yes", True)],
)
def test_default_comes_from_the_environment(monkeypatch, value, enabled):
    monkeypatch.setenv(config.COMPILE_ENV, value)
    assert config.native_kernels_enabled() is enabled


def test_on_by_default():
    assert config.native_kernels_enabled()


def test_calls_override_the_environment(monkeypatch):
    monkeypatch.setenv(config.COMPILE_ENV, "0")
    config.enable_native_kernels()
    assert config.native_kernels_enabled()
    config.disable_native_kernels()
    assert not config.native_kernels_enabled()
