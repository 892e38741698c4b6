"""keras_midl.ops.gathered_conv: the gathered path of MIDLConv2D and the
rule that picks it."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_midl.ops.gathered_conv import GATHERED_CONV_AUTO_RULES
from keras_midl.ops.gathered_conv import GATHERED_CONV_MAX_UNROLL
from keras_midl.ops.gathered_conv import channel_index
from keras_midl.ops.gathered_conv import gathered_conv
from keras_midl.ops.gathered_conv import use_gathered_conv
from keras_midl.ops.selection import topk_mask


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize(
    "path, batch_size, expected",
    [
        ("masked", 1, False),
        ("gathered", None, False),
        ("gathered", "batch", False),  # a symbolic size
        ("gathered", 0, False),
        ("gathered", 1, True),
        ("gathered", 32, GATHERED_CONV_MAX_UNROLL >= 32),
        ("gathered", GATHERED_CONV_MAX_UNROLL, True),
        ("gathered", GATHERED_CONV_MAX_UNROLL + 1, False),
    ],
)
def test_use_gathered_conv(path, batch_size, expected):
    assert use_gathered_conv(path, batch_size) is expected


@pytest.mark.parametrize(
    "backend, filters, batch_size, expected",
    [
        ("torch", 256, 1, True),
        ("torch", 255, 1, False),
        ("torch", 512, 2, False),
        ("torch", 512, None, False),
        ("jax", 512, 1, True),
        ("jax", 256, 1, False),
        ("tensorflow", 4096, 1, False),
    ],
)
def test_auto_follows_the_measured_rules(
    backend, filters, batch_size, expected
):
    assert set(GATHERED_CONV_AUTO_RULES) == {"torch", "jax"}
    assert (
        use_gathered_conv("auto", batch_size, filters, backend) is expected
    )


def test_channel_index():
    mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], "float32")
    np.testing.assert_array_equal(
        to_numpy(channel_index(mask, 2, 5)),
        [[5, 1, 6, 3, 4], [0, 1, 2, 5, 6]],
    )
    np.testing.assert_array_equal(
        to_numpy(channel_index(mask, 2, 1)),
        [[1, 0, 2, 0, 0], [0, 0, 0, 1, 2]],
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("with_light", [True, False])
@pytest.mark.parametrize(
    "strides, padding, dilation_rate",
    [((1, 1), "valid", (1, 1)), ((2, 2), "same", (1, 1)),
     ((1, 1), "same", (2, 2))],
)
def test_gathered_conv_is_where_mask_full_light(
    data_format, with_light, strides, padding, dilation_rate, rng
):
    shape = (3, 7, 7, 4) if data_format == "channels_last" else (3, 4, 7, 7)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(3, 3, 4, 6)).astype("float32")
    bias = rng.normal(size=(6,)).astype("float32")
    mask = to_numpy(topk_mask(rng.normal(size=(3, 6)), 2))
    kwargs = dict(strides=strides, padding=padding,
                  dilation_rate=dilation_rate, data_format=data_format)
    full = to_numpy(ops.conv(x, kernel, **kwargs))
    if data_format == "channels_last":
        full, gate = full + bias, mask[:, None, None, :]
    else:
        full, gate = full + bias[:, None, None], mask[:, :, None, None]
    light = None
    if with_light:
        light = rng.normal(size=full.shape).astype("float32")
    expected = np.where(gate > 0, full, 0.0 if light is None else light)
    actual = gathered_conv(x, kernel, mask, 2, bias=bias, light=light,
                           **kwargs)
    np.testing.assert_allclose(to_numpy(actual), expected, atol=1e-5)


def test_gathered_conv_needs_a_static_batch_size():
    inputs = keras.KerasTensor((None, 5, 5, 2))
    with pytest.raises(ValueError, match="static batch size"):
        gathered_conv(inputs, np.ones((3, 3, 2, 4), "float32"),
                      np.ones((1, 4), "float32"), 4)
