"""Building and loading the native library, from a private per-user cache.

`select_gather.c` is compiled once per machine by the system C compiler
(`$CC`, which may hold arguments, e.g. `CC="clang -m64"`; else `cc`, `gcc`
or `clang`), with AVX2 and FMA where the CPU reports them, and loaded with
`ctypes`. On JAX it is also linked with `jax_ffi.cc` (the training
selection as an XLA FFI handler), on TensorFlow with `tf_ops.cc` (the
training selection and mix as TensorFlow ops), by the C++ compiler
(`$CXX`, else `c++`, `g++` or `clang++`) against the installed jaxlib's or
TensorFlow's headers. The libraries are cached in a folder only their user
can write:

* `$KERAS_MIDL_CACHE` if set, else `$XDG_CACHE_HOME/keras_midl`, else
  `~/.cache/keras_midl`;
* created with mode 0700, whatever the umask;
* before anything is loaded from it, the folder must be a real folder
  (not a symbolic link) owned by the current user and writable by nobody
  else, every folder above it owned by that user or by root and writable
  by nobody else unless sticky (as `/tmp`), and the library a regular
  file owned by the user, writable by nobody else.

Where any of that fails there is no fallback folder: `library()` returns
`None` after one warning, and the layer runs its `keras.ops` path. A
shared, predictable path (such as a folder in the system temp directory)
would let another local user plant a library that this process loads.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings

from keras_midl import config

SOURCE = os.path.join(os.path.dirname(__file__), "select_gather.c")
JAX_FFI_SOURCE = os.path.join(os.path.dirname(__file__), "jax_ffi.cc")
TF_OPS_SOURCE = os.path.join(os.path.dirname(__file__), "tf_ops.cc")
# The declarations that `SOURCE` and the C++ sources share.
KERNELS_HEADER = os.path.join(os.path.dirname(__file__), "select_gather.h")
CACHE_ENV = "KERAS_MIDL_CACHE"

_state = {}


class UnsafeCacheError(RuntimeError):
    """The cache folder or a library in it could be written by another
    user."""


def compiler():
    """The C compiler command as a list (`$CC` split as a shell does), or
    `None` where none is found.

    Raises:
        RuntimeError: If `$CC` is set but its program is not found (it is
            never silently replaced by another compiler).
    """
    return _compiler("C", "CC", ("cc", "gcc", "clang"))


def cxx_compiler():
    """The C++ compiler command (`$CXX`, else `c++`, `g++` or `clang++`),
    as `compiler()` finds the C compiler; for the JAX FFI handler and the
    TensorFlow ops only."""
    return _compiler("C++", "CXX", ("c++", "g++", "clang++"))


def _compiler(language, variable, names):
    requested = os.environ.get(variable, "").strip()
    if requested:
        command = shlex.split(requested)
        program = shutil.which(command[0])
        if program is None:
            raise RuntimeError(
                f"the {language} compiler in ${variable} is not found: "
                f"{variable}={requested!r}"
            )
        return [program, *command[1:]]
    for name in names:
        program = shutil.which(name)
        if program:
            return [program]
    return None


def _cpu_flags():
    """The CPU's feature flags (Linux); empty where not readable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# x86 instruction sets the kernels use where the CPU has them:
# `/proc/cpuinfo` flags -> compiler flags. AVX-512 VNNI needs AVX2 too;
# it is a macro, not `-mavx512*`: select_gather.c compiles only its int8
# dot products for AVX-512 (a `target` attribute), so the compiler does
# not vectorize the rest of the file with 512-bit registers.
X86_INSTRUCTION_SETS = (
    (("avx2", "fma"), ("-mavx2", "-mfma")),
    (
        ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
        ("-DMIDL_AVX512_VNNI",),
    ),
)


# What select_gather.c links with: `dlsym` (in libc since glibc 2.34, in
# libdl before), with which it finds an OpenMP runtime the process has
# loaded (see its threads).
LINK_LIBRARIES = ("-ldl",)


def compile_flags():
    """The compiler flags for this machine."""
    flags = ["-O3", "-std=c99", "-shared", "-fPIC", "-pthread"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        cpu = _cpu_flags()
        for needed, extra in X86_INSTRUCTION_SETS:
            if set(needed) <= cpu:
                flags += extra
    return flags


def cache_folder():
    """The private cache folder, created (mode 0700) where missing.

    Raises:
        UnsafeCacheError: If the folder, or one above it, can be written
            by another user.
        OSError: If the folder cannot be created.
    """
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        folder = os.path.join(base, "keras_midl")
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(folder, 0o700)  # the umask may have cleared bits
    check_private(folder)
    return folder


def check_private(folder):
    """Raises `UnsafeCacheError` unless `folder` is safe to load code from
    (see the module docstring)."""
    user = os.getuid()
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheError(f"{folder} is not a folder (or is a link)")
    if info.st_uid != user:
        raise UnsafeCacheError(
            f"{folder} is owned by user {info.st_uid}, not by this user "
            f"({user})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"{folder} can be written by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o})"
        )
    parent = os.path.dirname(folder)
    while True:
        info = os.stat(parent)
        if info.st_uid not in (user, 0):
            raise UnsafeCacheError(
                f"{parent}, above the cache folder, is owned by user "
                f"{info.st_uid}"
            )
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not info.st_mode & stat.S_ISVTX:
            raise UnsafeCacheError(
                f"{parent}, above the cache folder, can be written by other "
                f"users (mode {stat.S_IMODE(info.st_mode):o})"
            )
        if os.path.dirname(parent) == parent:
            return
        parent = os.path.dirname(parent)


def _check_library(path):
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeCacheError(
            f"{path} is not a regular file owned by this user"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(f"{path} can be written by other users")


def run(command):
    """Runs a build command; `RuntimeError` with its output on failure."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"{command[0]} failed: {error.stderr.strip()[-2000:]}"
        ) from error


def cached_library(stem, key_parts, build, load=ctypes.CDLL):
    """The library `build(work, output)` writes, compiled once per
    `key_parts` (sources, compiler, flags) and machine into the private
    cache folder, then checked and loaded by `load(path)`. It is built in
    a private temporary folder and renamed, so concurrent processes never
    load a half-written file."""
    key_parts = [*key_parts, platform.machine(), sys.platform]
    key = hashlib.sha256(
        b"\0".join(
            part if isinstance(part, bytes) else part.encode()
            for part in key_parts
        )
    ).hexdigest()[:16]
    folder = cache_folder()
    path = os.path.join(folder, f"{stem}-{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=folder) as work:
            partial = os.path.join(work, f"{stem}.so")
            build(work, partial)
            os.chmod(partial, 0o700)
            os.replace(partial, path)
    _check_library(path)
    return load(path)


def _build():
    command = compiler()
    if command is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    flags = compile_flags()
    texts = _read(SOURCE, KERNELS_HEADER)
    lib = cached_library(
        "select_gather",
        [*texts, " ".join(command), " ".join([*flags, *LINK_LIBRARIES])],
        lambda work, output: run(
            [*command, *flags, SOURCE, *LINK_LIBRARIES, "-o", output]
        ),
    )
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.midl_select_gather.argtypes = [pointer, size, pointer, size]
    lib.midl_select_gather.argtypes += [pointer, size, size, pointer]
    lib.midl_select_gather.argtypes += [pointer, pointer, pointer, size]
    lib.midl_select_gather.restype = size  # the threads that ran
    lib.midl_sparse_forward.argtypes = [pointer, size, size, pointer, size]
    lib.midl_sparse_forward.argtypes += [pointer] * 6 + [size, size]
    lib.midl_sparse_forward.argtypes += [pointer] * 3 + [size]
    lib.midl_sparse_forward.restype = size
    # int8 kernel: rows .. light_bias as above, then kernel (int8),
    # kernel_scale, bias, units, k, quantize_inputs, outputs, selected,
    # scratch, threads.
    lib.midl_sparse_forward_int8.argtypes = [pointer, size, size, pointer]
    lib.midl_sparse_forward_int8.argtypes += [size] + [pointer] * 7
    lib.midl_sparse_forward_int8.argtypes += [size, size, ctypes.c_int]
    lib.midl_sparse_forward_int8.argtypes += [pointer] * 3 + [size]
    lib.midl_sparse_forward_int8.restype = size
    # The training selection (the most threads last; returns the threads
    # that ran) and the straight-through mix.
    lib.midl_topk_mask.argtypes = [pointer, size, size, size, pointer]
    lib.midl_topk_mask.argtypes += [pointer, size]
    lib.midl_topk_mask.restype = size
    # The mix: mask, full, light, bias, light_bias, size, units, outputs,
    # scratch.
    lib.midl_mix.argtypes = [pointer] * 5 + [size, size, pointer, pointer]
    lib.midl_mix.restype = None
    # Its gradients: upstream, mask, soft, full, light, bias, light_bias,
    # size, temperature, column, units, the five gradients, scratch.
    lib.midl_mix_backward.argtypes = [pointer] * 7 + [size, ctypes.c_float]
    lib.midl_mix_backward.argtypes += [pointer, size] + [pointer] * 6
    lib.midl_mix_backward.restype = None
    # The masked path's inference output, with no mask (threads last, as
    # the selection).
    lib.midl_select_mix.argtypes = [pointer, size, size, size]
    lib.midl_select_mix.argtypes += [pointer] * 5 + [size]
    lib.midl_select_mix.restype = size
    return lib


def _read(*paths):
    """The bytes of each file, for a cache key."""
    texts = []
    for path in paths:
        with open(path, "rb") as file:
            texts.append(file.read())
    return texts


def _linked_with_kernels(
    stem, cxx_source, cxx_flags, headers=(), key_parts=(), load=ctypes.CDLL
):
    """`select_gather.c` compiled by the C compiler with the flags of
    `library()`, linked with `cxx_source` by the C++ compiler with
    `cxx_flags` (after the sources and the object: link flags may be
    among them), cached as `cached_library` does under a key of both
    sources, their shared `KERNELS_HEADER`, the `headers` it is built
    against, the commands and flags and `key_parts`, and loaded by
    `load`."""
    c_command, cxx_command = compiler(), cxx_compiler()
    if c_command is None or cxx_command is None:
        raise RuntimeError("no C and C++ compilers found ($CC, $CXX)")
    flags = [flag for flag in compile_flags() if flag != "-shared"]
    texts = _read(SOURCE, KERNELS_HEADER, cxx_source, *headers)

    def build(work, output):
        compiled = os.path.join(work, "select_gather.o")
        run([*c_command, *flags, "-c", SOURCE, "-o", compiled])
        run([*cxx_command, cxx_source, compiled, *cxx_flags, "-o", output])

    return cached_library(
        stem,
        [
            *texts,
            " ".join(c_command),
            " ".join(cxx_command),
            " ".join(flags),
            " ".join(cxx_flags),
            *key_parts,
        ],
        build,
        load,
    )


def _build_jax_ffi(include_dir):
    """`select_gather.c` linked with `jax_ffi.cc` against the FFI headers
    in `include_dir` (`_linked_with_kernels`)."""
    headers = [
        os.path.join(include_dir, "xla", "ffi", "api", name)
        for name in ("api.h", "c_api.h", "ffi.h")
    ]
    return _linked_with_kernels(
        "jax_ffi",
        JAX_FFI_SOURCE,
        [
            "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-I",
            include_dir, *LINK_LIBRARIES,
        ],
        headers=headers,
    )


def jax_ffi_library(include_dir):
    """The library holding the XLA FFI handler `MidlTopkMask` (the
    training selection for JAX, see `jax_ffi.cc`), built on first call
    from JAX's FFI headers in `include_dir` and cached as `library()`
    is; `None` where native kernels are off or where it could not be
    built or safely loaded (one warning)."""
    return _built_once(
        "jax_ffi",
        lambda: _build_jax_ffi(include_dir),
        "the native training selection is not used on JAX",
        "MIDL trains with its keras.ops selection (the same mask, slower)",
    )


def _build_tf_ops(tf_flags, version, load):
    """`select_gather.c` linked with `tf_ops.cc` (`_linked_with_kernels`)
    with TensorFlow's `tf_flags` (its compile then link flags, from
    `tf.sysconfig`), loaded by `load` (`tf.load_op_library`). `version`,
    TensorFlow's, is part of the cache key: an upgrade in place changes
    the headers, not the flags."""
    return _linked_with_kernels(
        "tf_ops",
        TF_OPS_SOURCE,
        [
            "-O3", "-shared", "-fPIC", "-pthread", "-w", *tf_flags,
            *LINK_LIBRARIES,
        ],
        key_parts=[" ".join(tf_flags), version],
        load=load,
    )


def tf_ops_library(tf_flags, version, load):
    """The TensorFlow ops `MidlTopkMask`, `MidlMix` and `MidlMixGrad` (see
    `tf_ops.cc`), as the module `load` returns, built on first call with
    the flags `tf_flags` of TensorFlow `version` and cached as `library()`
    is; `None` where native kernels are off or where it could not be
    built or safely loaded (one warning)."""
    return _built_once(
        "tf_ops",
        lambda: _build_tf_ops(tf_flags, version, load),
        "the native training selection and mix are not used on TensorFlow",
        "MIDL trains with its keras.ops mix and a tf.numpy_function "
        "selection (the same values, slower)",
    )


def library():
    """The loaded native library (`ctypes.CDLL`), built on first call;
    `None` where native kernels are off
    (`keras_midl.config.native_kernels_enabled()`) or where it could not
    be built or safely loaded (one warning)."""
    return _built_once(
        "library",
        _build,
        "the native kernel is not used",
        "MIDL runs its keras.ops path",
    )


def _built_once(name, build, not_used, fallback):
    """`build()`'s library, kept in `_state[name]`; `None` where native
    kernels are off, or after one warning (`not_used (error); fallback.`)
    where it fails (no compiler, a build or load failure)."""
    if not config.native_kernels_enabled():
        return None
    if name not in _state:
        try:
            _state[name] = build()
        except Exception as error:  # no compiler, build or load failure
            _state[name] = None
            warnings.warn(
                f"keras_midl: {not_used} ({type(error).__name__}: "
                f"{error}); {fallback}. Call "
                "keras_midl.config.disable_native_kernels() or set "
                f"{config.COMPILE_ENV}=0 to skip building it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state[name]


def loaded_library():
    """The library if already built (no build, no checks): for the
    per-call paths, after `library()` returned one."""
    return _state.get("library")
