"""Tests of benchmarks.common: output folder, metadata, result files."""

import argparse
import json
import mmap
import os
import sys
import time

import keras
import pytest

from benchmarks import common


def test_output_defaults_outside_the_repository():
    parser = argparse.ArgumentParser()
    common.add_output_argument(parser)
    default = parser.parse_args([]).output
    assert default == common.DEFAULT_OUTPUT
    root = os.path.realpath(common.ROOT)
    assert not os.path.realpath(default).startswith(root + os.sep)
    explicit = parser.parse_args(["--output", "benchmarks/results"]).output
    assert explicit == "benchmarks/results"
    assert os.path.samefile(
        os.path.join(common.ROOT, "benchmarks", "results"), common.RESULTS_DIR
    )


def test_output_path_creates_the_folder(tmp_path):
    folder = tmp_path / "a" / "b"
    path = common.output_path(str(folder), "x.json")
    assert path == os.path.join(str(folder), "x.json")
    assert folder.is_dir()


@pytest.fixture
def without_allocator_settings(monkeypatch):
    """The allocator settings of the environment (which `command_line`
    records) removed, so the recorded command is the test's own."""
    for name in common._allocator_environment():
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "spec_name, argv, expected",
    [
        ("benchmarks.smi", ["smi.py", "--seeds", "3"], "-m benchmarks.smi"),
        (None, ["benchmarks/smi.py", "a b"], "benchmarks/smi.py 'a b'"),
    ],
)
def test_command_line(
    spec_name, argv, expected, without_allocator_settings, monkeypatch
):
    main = type(sys)("__main__")
    main.__spec__ = (
        None if spec_name is None else type("Spec", (), {"name": spec_name})
    )
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    command = common.command_line()
    assert command.startswith(f"KERAS_BACKEND=jax python {expected}")


def test_command_line_records_allocator_settings(
    without_allocator_settings, monkeypatch
):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4000000000")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2 x.so")
    monkeypatch.setenv("MALLOCX", "not an allocator setting")
    command = common.command_line()
    assert command.startswith(
        "KERAS_BACKEND=torch LD_PRELOAD='/usr/lib/libjemalloc.so.2 x.so' "
        "MALLOC_TRIM_THRESHOLD_=4000000000 python "
    )
    assert "MALLOCX" not in command


def test_results_record_how_they_were_made(tmp_path):
    metadata = common.environment()
    for key in ("command", "backend", "versions", "machine", "load_average"):
        assert key in metadata
    metadata["load_average_after"] = 0.5
    rows = [{"dataset": "mnist", "acc": 0.98123}]
    json_path = common.output_path(str(tmp_path), "x.json")
    common.write_json(json_path, rows, metadata, settings={"seeds": 3})
    with open(json_path) as file:
        payload = json.load(file)
    assert payload["rows"] == rows and payload["settings"] == {"seeds": 3}
    md_path = common.output_path(str(tmp_path), "x.md")
    common.write_markdown(
        md_path,
        rows,
        metadata,
        columns=[("dataset", "Dataset", None), ("acc", "Accuracy", ".3f")],
        title="X",
    )
    with open(md_path) as file:
        text = file.read()
    assert "| mnist | 0.981 |" in text
    assert ", 0.5 after" in text
    assert f"Command: `{metadata['command']}`" in text


def test_interleaved_medians_runs_every_candidate():
    calls = {"a": 0, "b": 0}

    def make(name):
        def run():
            calls[name] += 1
            return name

        return run

    medians = common.interleaved_medians(
        {"a": make("a"), "b": make("b")}, warmup=2, repeats=3
    )
    assert set(medians) == {"a", "b"}
    assert calls == {"a": 5, "b": 5}
    assert all(value >= 0 for value in medians.values())


def test_interleaved_medians_settles_each_candidate_before_timing_it():
    """With `settle=1` every timed call follows an untimed call of the
    same candidate, never another candidate's."""
    order = []

    def make(name):
        return lambda: order.append(name)

    candidates = {name: make(name) for name in "abc"}
    medians = common.interleaved_medians(candidates, repeats=4, settle=1)
    assert set(medians) == set("abc") and len(order) == 4 * 3 * 2
    # Calls come in pairs of one candidate: the settling call, then the
    # timed one.
    assert all(order[i] == order[i + 1] for i in range(0, len(order), 2))
    with pytest.raises(ValueError, match="settle=-1"):
        common.interleaved_medians(candidates, settle=-1)


def test_interleaved_medians_rests_as_long_as_it_works():
    def work():
        time.sleep(0.01)

    start = time.perf_counter()
    common.interleaved_medians({"a": work, "b": work}, repeats=3, rest=1.0)
    elapsed = time.perf_counter() - start
    # 3 rounds of two 10 ms calls, then as long again asleep: >= 120 ms.
    assert elapsed >= 0.12
    start = time.perf_counter()
    common.interleaved_medians({"a": work, "b": work}, repeats=3, rest=0)
    assert time.perf_counter() - start < elapsed


@pytest.mark.parametrize(
    "readings, expected, sleeps",
    [([0.4], 0.4, 0), ([1.5, 0.9, 0.45], 0.45, 2), ([None], None, 0)],
)
def test_wait_for_quiet_waits_for_the_load_to_fall(
    monkeypatch, readings, expected, sleeps
):
    readings = list(readings)
    slept = []
    monkeypatch.setattr(common, "load_average", lambda: readings.pop(0))
    monkeypatch.setattr(common.time, "sleep", slept.append)
    assert common.wait_for_quiet(limit=0.5, timeout=60.0, poll=5.0) == (
        expected
    )
    assert slept == [5.0] * sleeps


def test_wait_for_quiet_gives_up_after_its_timeout(monkeypatch):
    monkeypatch.setattr(common, "load_average", lambda: 3.0)
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)
    assert common.wait_for_quiet(limit=0.5, timeout=0.0) == 3.0


@pytest.mark.parametrize(
    "value, seconds", [(None, common.QUIET_TIMEOUT), ("0", 0.0), ("2.5", 2.5)]
)
def test_quiet_timeout_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv(common.QUIET_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(common.QUIET_TIMEOUT_ENV, value)
    assert common.quiet_timeout() == seconds


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_quiet_timeout_rejects_a_bad_value(monkeypatch, value):
    monkeypatch.setenv(common.QUIET_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=common.QUIET_TIMEOUT_ENV):
        common.quiet_timeout()


def test_harness_tests_do_not_wait_for_a_quiet_machine():
    # tests/harness/conftest.py: no test waits minutes for the load of a
    # busy CI machine to fall, in process or in the children it starts.
    assert common.quiet_timeout() == 0.0


@pytest.mark.parametrize(
    "loads, threads, valid",
    [
        ((0.5, 1.0), 1, True),
        ((0.5, 1.01), 1, False),
        ((None, 0.2), 1, False),
        ((1.5, 1.9), 2, True),
    ],
)
def test_load_valid_allows_one_per_thread(loads, threads, valid):
    assert common.load_valid(loads, threads) is valid


def test_interleaved_medians_rejects_a_negative_rest():
    with pytest.raises(ValueError, match="rest=-1"):
        common.interleaved_medians({"a": lambda: None}, rest=-1)


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_thread_environment(threads):
    environment = common.thread_environment(threads)
    if not threads:
        assert environment == {}
    else:
        assert environment["OMP_NUM_THREADS"] == str(threads)
        assert environment["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here"
)
@pytest.mark.parametrize("threads", [0, 1])
def test_a_timing_child_is_pinned_to_its_threads(threads, tmp_path):
    """XLA runs a step's independent operations on a thread per CPU
    whatever its flags say: a child limited to one thread is pinned to one
    CPU, the parent's last."""
    available = sorted(os.sched_getaffinity(0))
    path = tmp_path / "cpus.json"
    script = (
        "import json, os, sys; "
        "json.dump(sorted(os.sched_getaffinity(0)), open(sys.argv[1], 'w'))"
    )
    common.run_child([sys.executable, "-c", script, str(path)], threads)
    cpus = json.loads(path.read_text())
    assert cpus == (available[-1:] if threads else available)


@pytest.mark.parametrize("pinned", [None, [1]])
def test_results_say_where_a_timing_was_pinned(monkeypatch, pinned):
    monkeypatch.setattr(common, "_pinned_cpus", lambda: pinned)
    metadata = common.environment()
    assert metadata["machine"]["pinned_cpus"] == pinned
    text = common.metadata_markdown(metadata)
    assert ("pinned to CPU 1" in text) == bool(pinned)


@pytest.mark.parametrize("changed", [False, True])
def test_the_commit_says_when_tracked_files_were_changed(monkeypatch, changed):
    monkeypatch.setattr(common, "_tracked_changes", lambda: changed)
    commit = common._git_commit()
    if commit is None:
        pytest.skip("not a git checkout")
    assert commit.endswith(" + uncommitted changes") == changed


@pytest.mark.parametrize(
    "status, changed",
    [
        ("", False),
        (" M benchmarks/results/smi/smi.md\n M docs/analysis.md\n", False),
        (" M README.md\nM  benchmarks/results/convert/convert.json\n", False),
        (" M keras_midl/midl.py\n", True),
        (" M docs/layer.md\n M benchmarks/common.py\n", True),
        ("R  benchmarks/old.py -> benchmarks/new.py\n", True),
        ('R  "docs/a b.md" -> "docs/c d.md"\n', False),
        # As `_git` returns it: stripped, the first line's space too.
        ("M benchmarks/results/a.json\n M benchmarks/results/b.md", False),
        ("M keras_midl/midl.py\n M docs/layer.md", True),
    ],
)
def test_results_and_prose_are_not_changes_a_result_depends_on(
    monkeypatch, status, changed
):
    """A queue of runs writes results one after the other: the later runs
    measure the same code, not 'uncommitted changes'."""
    monkeypatch.setattr(common, "_git", lambda *arguments: status)
    assert common._tracked_changes() == changed


def test_combined_outputs_keeps_backend_order_and_the_first_metadata(
    monkeypatch,
):
    monkeypatch.setattr(common, "command_line", lambda: "python -m x")
    outputs = {
        "tensorflow": {"metadata": {"machine": "a"}, "rows": [{"r": 1}]},
        "jax": {"metadata": {"machine": "b"}, "rows": [{"r": 2}, {"r": 3}]},
    }
    rows, metadata = common.combined_outputs(outputs)
    assert rows == [{"r": 1}, {"r": 2}, {"r": 3}]
    assert metadata == {
        "machine": "a",
        "command": "python -m x",
        "backend": "tensorflow, jax (one child process each)",
    }
    _, metadata = common.combined_outputs(outputs, backend_note="")
    assert metadata["backend"] == "tensorflow, jax"


@pytest.mark.parametrize("valid, text", [(True, "yes"), (False, "no")])
def test_load_columns(valid, text):
    row = {"load_before": 0.4, "load_after": 0.555, "valid": valid}
    cells = [cell(row) for cell, _, _ in common.LOAD_COLUMNS]
    assert cells[0] == "0.40 / 0.56"
    assert cells[1].startswith(text)


def test_child_output_holds_the_rows_and_the_environment(tmp_path):
    """What a child writes is what `run_backends` reads back."""
    path = tmp_path / "out.json"
    rows = [{"backend": "numpy", "ms": 1.5}]
    common.write_child_output(str(path), rows, threads=1)
    output = json.loads(path.read_text())
    assert output["rows"] == rows
    metadata = output["metadata"]
    assert set(metadata) == set(common.environment()) | {"threads"}
    assert metadata["threads"] == 1
    assert metadata["backend"] == keras.backend.backend()


def test_page_faults_count_the_pages_a_call_maps():
    """A call that touches 64 fresh pages takes at least 64 faults (256
    KiB at 4 KiB pages: no huge page fits); a call that touches none,
    fewer."""
    if common.page_faults(lambda: None) is None:
        pytest.skip("this platform does not count page faults")
    pages = 64

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:
            for page in range(pages):
                memory[page * mmap.PAGESIZE] = 1

    assert common.page_faults(touch_fresh_pages) >= pages
    assert common.page_faults(lambda: None) < pages
