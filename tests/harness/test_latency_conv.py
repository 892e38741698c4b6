"""Tests of benchmarks.latency_conv on the current backend: tiny shapes,
two repeats (the in-process timings, then one export per runtime)."""

import argparse
import json

import keras
import pytest

from benchmarks import latency_conv

BACKEND = keras.backend.backend()


def test_parse_shape():
    assert latency_conv.parse_shape("32x16x64x128") == (32, 16, 64, 128)
    for bad in ("32x32x64", "0x4x4x4", "axbxcxd", "4x4x4x4x4"):
        with pytest.raises(argparse.ArgumentTypeError):
            latency_conv.parse_shape(bad)


def test_arguments_reach_the_children():
    args = latency_conv.parse_args([
        "--shapes", "4x4x8x8", "8x8x8x16", "--repeats", "3",
        "--variants", "conv2d", "gathered", "--export-variants", "conv2d",
    ])
    assert args.export_shapes == [(4, 4, 8, 8)]
    child = latency_conv.parse_args(
        latency_conv.child_arguments(args) + ["--child", "out.json"]
    )
    for key in ("shapes", "repeats", "threads", "variants",
                "export_variants", "export_shapes"):
        assert getattr(child, key) == getattr(args, key)
    no_export = latency_conv.parse_args(["--export-shapes"])
    assert no_export.export_shapes == []
    assert latency_conv.parse_args(
        latency_conv.child_arguments(no_export)).export_shapes == []


@pytest.mark.parametrize(
    "argv",
    [["--variants", "gathered"], ["--repeats", "0"], ["--shapes", "4x4"],
     ["--backends", "numpy"]],
)
def test_invalid_arguments_exit(argv):
    with pytest.raises(SystemExit):
        latency_conv.parse_args(argv)


def test_in_process_timings(tmp_path):
    args = latency_conv.parse_args([
        "--shapes", "6x6x8x16", "--repeats", "2", "--export-shapes",
    ])
    rows = latency_conv.measure((6, 6, 8, 16), args, str(tmp_path))
    assert [row["runtime"] for row in rows] == ["keras", "predict_on_batch"]
    for row in rows:
        assert row["backend"] == BACKEND and row["shape"] == "6x6x8x16"
        assert set(row["ms"]) == set(latency_conv.VARIANTS)
        assert all(ms > 0 for ms in row["ms"].values())
        assert set(row["conv_over"]) == set(latency_conv.VARIANTS) - {
            "conv2d"}
        assert row["errors"] == {}
        # k = round(0.45 * 16) = 7, rounded up to multiples of 8 and 16.
        assert row["k"] == {"gathered": 7, "auto": 7, "gathered_k8": 8,
                            "gathered_k16": 16}
        conv = 6 * 6 * 9 * 8 * 16
        assert row["multiply_adds"]["conv2d"] == conv
        assert row["multiply_adds_ratio"]["gathered"] == pytest.approx(
            conv / row["multiply_adds"]["gathered"])
        assert row["multiply_adds_ratio"]["gathered_k16"] < 1
        assert isinstance(row["valid"], bool)


def test_exports_are_served_or_their_errors_recorded(tmp_path):
    args = latency_conv.parse_args([
        "--shapes", "4x4x8x8", "--repeats", "2", "--variants", "conv2d",
        "gathered",
    ])
    rows = latency_conv.measure((4, 4, 8, 8), args, str(tmp_path))
    runtimes = {row["runtime"]: row for row in rows}
    assert set(runtimes) == set(latency_conv.runtimes_of(BACKEND))
    for name in ("tf_saved_model", "onnxruntime"):
        if name not in runtimes:
            continue
        row = runtimes[name]
        # Every exported variant is timed or has its error recorded.
        for variant in ("conv2d", "gathered"):
            assert (variant in row["ms"]) != (variant in row["errors"])
            if variant in row["ms"]:
                assert row["max_abs_difference"][variant] < 1e-4
        if name == "onnxruntime":
            for variant in row["ms"]:
                assert "Conv" in row["onnx_operators"][variant]
    # Conv2D exports wherever Keras has the exporter.
    if BACKEND in ("tensorflow", "jax"):
        assert "conv2d" in runtimes["tf_saved_model"]["ms"]
    if BACKEND in ("tensorflow", "torch"):
        assert "conv2d" in runtimes["onnxruntime"]["ms"]
    # The result files, from the child's output.
    output = tmp_path / "out"
    args.output = str(output)
    latency_conv.write({BACKEND: {"metadata": _metadata(), "rows": rows}},
                       args)
    payload = json.loads((output / "latency_conv.json").read_text())
    assert payload["rows"] == json.loads(json.dumps(rows))
    assert payload["settings"]["export_variants"] == ["conv2d", "gathered"]
    markdown = (output / "latency_conv.md").read_text()
    assert "Conv2D / MIDL gathered" in markdown
    for row in rows:
        for variant in row["errors"]:
            assert f"{row['runtime']}, {variant}:" in markdown


def _metadata():
    from benchmarks import common

    return common.environment()
