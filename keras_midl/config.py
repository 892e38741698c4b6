"""The switch for keras_midl's own compiled kernels.

keras_midl compiles kernels of its own where that makes a layer faster:
the native C kernel of the gathered inference path (`keras_midl.native`),
the `torch.compile` version of that path where the C kernel cannot run,
and the XLA-compiled training selection on TensorFlow. All are on by
default and all have a `keras.ops` fallback that computes the same
outputs. The environment variable `KERAS_MIDL_COMPILE=0` turns them off
for a process; these functions turn them off or on at run time, as
`keras.config.enable_flash_attention()` does for Keras's fused attention.

Example:

>>> keras_midl.config.disable_native_kernels()
>>> keras_midl.config.native_kernels_enabled()
False
>>> keras_midl.config.enable_native_kernels()
>>> keras_midl.config.native_kernels_enabled()
True
"""

import os

COMPILE_ENV = "KERAS_MIDL_COMPILE"

_enabled = None  # None: from the environment


def enable_native_kernels():
    """Lets keras_midl build and run its own compiled kernels."""
    global _enabled
    _enabled = True


def disable_native_kernels():
    """Runs every MIDL layer through its `keras.ops` paths only: nothing is
    built or compiled by keras_midl from now on."""
    global _enabled
    _enabled = False


def native_kernels_enabled():
    """Whether keras_midl may build and run its own compiled kernels: the
    last `enable_native_kernels()` / `disable_native_kernels()` call, else
    the environment variable `KERAS_MIDL_COMPILE` (default on; `0`,
    `false`, `no` or `off` turn it off)."""
    if _enabled is not None:
        return _enabled
    value = os.environ.get(COMPILE_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")
