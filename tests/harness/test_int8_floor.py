"""benchmarks/int8_floor.py: the calls, the floor and the table."""

import argparse

import pytest

from benchmarks import common
from benchmarks import int8_floor
from keras_midl import native


@pytest.fixture(autouse=True)
def needs_the_native_kernel():
    if not native.available():
        pytest.skip("no native kernel here (no C compiler)")


def test_row_holds_every_call_and_the_floor():
    row = int8_floor.measure(64, 2)
    for name in int8_floor.CALLS:
        assert row[f"{name} ms"] > 0
    assert row["floor ms"] == pytest.approx(
        row["empty model ms"] + row["kernel ms"]
    )
    assert row["float Dense / floor"] == pytest.approx(
        row["float Dense ms"] / row["floor ms"]
    )
    assert row["target ms"] == pytest.approx(
        row["float Dense ms"] / int8_floor.TARGET
    )


def test_each_part_runs_after_a_model_that_evicts_its_weights():
    """The kernel and the layer's call are timed as the first readers of
    the int8 MIDL's weights after another model's, as `int8 MIDL` is."""
    order = int8_floor.ORDER
    assert sorted(order) == sorted(int8_floor.CALLS)
    for part, before in [
        ("kernel", "float Dense"),
        ("MIDL.call", "int8 Dense"),
        ("int8 MIDL", "float MIDL"),
    ]:
        assert order.index(part) == order.index(before) + 1


def test_table_is_written(tmp_path):
    row = int8_floor.measure(32, 1)
    outputs = {
        row["backend"]: {"metadata": common.environment(), "rows": [row]}
    }
    args = argparse.Namespace(output=str(tmp_path), repeats=1, d=32)
    int8_floor.write(outputs, args)
    text = (tmp_path / "int8_floor.md").read_text()
    assert f"| {row['backend']} |" in text
    assert "floor (empty + kernel)" in text
