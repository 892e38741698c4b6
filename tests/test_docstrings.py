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


def _modules():
    names = [keras_midl.__name__]
    names += [
        f"{keras_midl.__name__}.{info.name}"
        for info in pkgutil.iter_modules(keras_midl.__path__)
    ]
    return sorted(names)


def _cases():
    cases = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in _modules():
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
    return cases


CASES = _cases()


def test_every_module_is_collected():
    collected = {case.id.split(".")[1] for case in CASES if "." in case.id}
    assert {"midl", "flops", "selection"} <= collected


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
