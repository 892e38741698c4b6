"""Native kernels of keras_midl: C, built on first use, loaded with ctypes.

* `select_gather.c`: the C sources (the selection and the selected rows'
  dot products; the whole inference forward of a layer; the training
  selection and straight-through mix).
* `select_gather.h`: the declarations of the functions of
  `select_gather.c` that the C++ sources call.
* `jax_ffi.cc`: the training selection as an XLA FFI handler for JAX,
  built with the C++ compiler against the installed jaxlib's headers.
* `tf_ops.cc`: the training selection and straight-through mix as
  TensorFlow ops, built with the C++ compiler against the installed
  TensorFlow's headers.
* `keras_midl.native.build`: compiling it with the system C compiler into
  a private per-user cache folder, and loading it.
* `keras_midl.native.kernels`: the NumPy entry points, `select_gather` and
  `sparse_forward` (re-exported here), with a NumPy fallback; the
  training kernels `topk_mask`, `mix` and `mix_backward` (no fallback:
  their callers run `keras.ops` where the library is not built).

`available()` says whether the library is built and loaded; it is not
where native kernels are off (`keras_midl.config`) or where no compiler
is found (one warning).
"""

from keras_midl.native import build
from keras_midl.native.kernels import FORWARD_WEIGHTS
from keras_midl.native.kernels import select_gather
from keras_midl.native.kernels import sparse_forward


def available():
    """Whether the native library is built and loaded (built on the first
    call; `False` after one warning where it cannot be)."""
    return build.library() is not None


__all__ = ["FORWARD_WEIGHTS", "available", "select_gather", "sparse_forward"]
