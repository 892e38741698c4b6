"""Runs the examples in the docstrings of keras_midl as doctests.

As keras-hub's `docstring_test.py` does: every `>>>` example of every
module of the package, with only `np`, `keras` and `keras_midl` preloaded
(an example imports anything else it uses, so a user can copy it), on the
backend in KERAS_BACKEND. One test per docstring; a module whose optional
dependency is missing (keras-tuner, scikit-learn, matplotlib) is skipped.
"""

import doctest
import importlib
import io
import pkgutil

import keras
import numpy as np
import pytest

import keras_midl

OPTIONS = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
)

# Examples that do not run yet, each with what it lacks. Strict: once an
# example runs, its test fails until its name is removed from here.
KNOWN_FAILING = {}
# The same, on one backend only.
KNOWN_FAILING_ON = {}


# Modules whose examples must be collected (the doctests of the layer, the
# switch, the ops and the native entry points).
EXPECTED_MODULES = {
    "keras_midl.config",
    "keras_midl.convert",
    "keras_midl.flops",
    "keras_midl.gating",
    "keras_midl.lowrank",
    "keras_midl.midl",
    "keras_midl.midl_conv2d",
    "keras_midl.native.kernels",
    "keras_midl.ops.dispatch",
    "keras_midl.ops.gathered",
    "keras_midl.ops.gathered_conv",
    "keras_midl.ops.selection",
}
_BACKEND_MODULES = keras_midl.__name__ + ".backend."


def _modules():
    """Every module of the package, subpackages included, except the
    backend modules of the other backends (each imports its framework)."""
    names = [keras_midl.__name__]
    for info in pkgutil.walk_packages(
        keras_midl.__path__, prefix=keras_midl.__name__ + "."
    ):
        if info.name.startswith(_BACKEND_MODULES):
            backend = info.name[len(_BACKEND_MODULES) :]
            if backend not in ("generic", keras.backend.backend()):
                continue
        names.append(info.name)
    return sorted(names)


MODULES = _modules()
COLLECTED = set()  # the modules with at least one example


def _cases():
    cases = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:  # an optional dependency is missing
            cases.append(
                pytest.param(
                    None,
                    id=name,
                    marks=pytest.mark.skip(reason=f"{name}: {error}"),
                )
            )
            continue
        for test in finder.find(module, name, globs={}):
            # Only what the module defines: not its imports' docstrings.
            if test.examples and test.name.startswith(name):
                marks = []
                known = {
                    **KNOWN_FAILING,
                    **KNOWN_FAILING_ON.get(keras.backend.backend(), {}),
                }
                if test.name in known:
                    marks.append(
                        pytest.mark.xfail(reason=known[test.name], strict=True)
                    )
                cases.append(pytest.param(test, id=test.name, marks=marks))
                COLLECTED.add(name)
    return cases


CASES = _cases()


def test_every_module_is_collected():
    assert EXPECTED_MODULES <= COLLECTED, EXPECTED_MODULES - COLLECTED
    # The modules of before the restructuring are gone.
    for old in ("selection", "fast_inference", "compiled_selection"):
        assert f"keras_midl.{old}" not in MODULES
    assert "keras_midl.ops" in MODULES and "keras_midl.backend" in MODULES


@pytest.mark.parametrize("test", CASES)
def test_docstring_example(test, tmp_path, monkeypatch):
    # Examples that write files (a tuner's folder, a saved model) write
    # them into a temporary folder, never into the repository.
    monkeypatch.chdir(tmp_path)
    test.globs = {"np": np, "keras": keras, "keras_midl": keras_midl}
    output = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    try:
        result = runner.run(test, out=output.write, clear_globs=True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert result.failed == 0, output.getvalue()
