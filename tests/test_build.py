"""keras_midl.native.build: the native library is built once into a
private per-user cache folder and loaded only from there; where that is
not possible there is no native kernel (one warning), never a shared
folder."""

import os
import shutil
import stat
import tempfile

import numpy as np
import pytest

from keras_midl import config
from keras_midl import native
from keras_midl.native import build

HAS_COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(
    not HAS_COMPILER, reason="no C compiler on this machine"
)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build into a new cache folder, as on a new machine; the system
    temp folder is a fresh one too, to see whether anything lands there."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(config, "_enabled", None)
    monkeypatch.delenv(config.COMPILE_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    cache = tmp_path / "cache"
    monkeypatch.setenv(build.CACHE_ENV, str(cache))
    return cache


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@needs_compiler
def test_builds_once_into_a_private_folder(fresh_build):
    previous = os.umask(0)  # the worst umask: modes must not come from it
    try:
        library = build.library()
    finally:
        os.umask(previous)
    assert library is not None and build.library() is library
    (built,) = fresh_build.glob("select_gather-*.so")
    assert mode(fresh_build) == 0o700
    assert mode(built) & 0o077 == 0


@needs_compiler
def test_a_changed_header_is_a_new_build(fresh_build, monkeypatch, tmp_path):
    """The header `select_gather.c` shares with the C++ sources is part of
    the cache key: a library built before an edit of it is not reused."""
    assert build.library() is not None
    header = tmp_path / "select_gather.h"
    with open(build.KERNELS_HEADER) as original:
        header.write_text(original.read() + "/* edited */\n")
    monkeypatch.setattr(build, "KERNELS_HEADER", str(header))
    monkeypatch.setattr(build, "_state", {})
    assert build.library() is not None
    assert len(list(fresh_build.glob("select_gather-*.so"))) == 2


@needs_compiler
def test_a_folder_others_can_write_is_refused(fresh_build):
    fresh_build.mkdir(mode=0o700)
    os.chmod(fresh_build, 0o777)
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        assert build.library() is None
    assert not list(fresh_build.iterdir())  # nothing built, nothing loaded


@needs_compiler
def test_a_folder_of_another_user_is_refused(fresh_build):
    if os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    fresh_build.mkdir(mode=0o700)
    os.chown(fresh_build, 12345, 12345)
    with pytest.warns(RuntimeWarning, match="owned by user 12345"):
        assert build.library() is None


@needs_compiler
def test_a_folder_under_one_others_can_write_is_refused(fresh_build):
    os.chmod(fresh_build.parent, 0o777)  # not sticky, as /tmp would be
    try:
        with pytest.warns(RuntimeWarning, match="above the cache folder"):
            assert build.library() is None
    finally:
        os.chmod(fresh_build.parent, 0o700)


@needs_compiler
def test_a_linked_folder_is_refused(fresh_build, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    fresh_build.symlink_to(target)
    with pytest.warns(RuntimeWarning, match="is not a folder"):
        assert build.library() is None


@needs_compiler
def test_a_library_others_can_write_is_not_loaded(fresh_build, monkeypatch):
    assert build.library() is not None
    (built,) = fresh_build.glob("select_gather-*.so")
    os.chmod(built, 0o666)
    monkeypatch.setattr(build, "_state", {})
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        assert build.library() is None


@needs_compiler
@pytest.mark.parametrize("variable", ["XDG_CACHE_HOME", build.CACHE_ENV])
def test_an_unusable_cache_means_no_kernel_and_no_shared_folder(
    fresh_build, monkeypatch, tmp_path, variable
):
    """The audit's case: the cache folder cannot be created. The old code
    fell back to `keras_midl` in the system temp folder, which another
    user could have created and planted a library in."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.delenv(build.CACHE_ENV)
    monkeypatch.setenv(variable, str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="native kernel is not used"):
        assert build.library() is None
    assert build.library() is None  # one warning, no retry
    assert not list((tmp_path / "system_temp").iterdir())


def test_cc_with_arguments_is_used_as_given(monkeypatch):
    monkeypatch.setenv("CC", "gcc -m64 -DKERAS_MIDL_TEST")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    want = [shutil.which("gcc"), "-m64", "-DKERAS_MIDL_TEST"]
    assert build.compiler() == want


def test_a_missing_cc_is_an_error_not_another_compiler(
    fresh_build, monkeypatch
):
    monkeypatch.setenv("CC", "no-such-compiler -O2")
    with pytest.raises(RuntimeError, match="CC='no-such-compiler -O2'"):
        build.compiler()
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        assert build.library() is None


@needs_compiler
def test_cc_arguments_reach_the_build(fresh_build, monkeypatch):
    commands = []
    real_run = build.run
    monkeypatch.setattr(
        build, "run", lambda command: (commands.append(command),
                                       real_run(command))
    )
    monkeypatch.setenv("CC", f"{shutil.which('cc') or 'gcc'} -DMIDL_FLAG=1")
    assert build.library() is not None
    assert "-DMIDL_FLAG=1" in commands[0]


def test_no_compiler_warns_once_and_falls_back(fresh_build, monkeypatch, rng):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert build.library() is None
    assert build.library() is None  # no second warning, no retry
    logits = rng.normal(size=(2, 9)).astype("float32")
    kernel = rng.normal(size=(9, 5)).astype("float32")
    rows = rng.normal(size=(2, 5)).astype("float32")
    outputs, selected = native.select_gather(
        logits, kernel, rows, 4, np.zeros((2, 9))
    )
    want = np.zeros((2, 9))
    for row in range(2):
        top = np.argsort(-logits[row], kind="stable")[:4]
        want[row, top] = kernel[top] @ rows[row]
    np.testing.assert_allclose(outputs, want, rtol=1e-5, atol=1e-5)
    assert (np.diff(selected, axis=1) > 0).all()


@pytest.mark.parametrize("how", ["environment", "config"])
def test_opt_out(fresh_build, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv(config.COMPILE_ENV, "0")
    else:
        config.disable_native_kernels()
    assert not config.native_kernels_enabled()
    assert build.library() is None and not native.available()
    assert not fresh_build.exists()


def test_compile_flags_match_the_cpu(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "fma"})
    assert {"-mavx2", "-mfma"} <= set(build.compile_flags())
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse4_2"})
    assert "-mavx2" not in build.compile_flags()
    monkeypatch.setattr(
        build,
        "_cpu_flags",
        lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"},
    )
    assert {"-mavx2", "-DMIDL_AVX512_VNNI"} <= set(build.compile_flags())
    monkeypatch.setattr(
        build, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni"}
    )
    assert "-DMIDL_AVX512_VNNI" not in build.compile_flags()
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "fma"})
    assert "-mavx2" not in build.compile_flags()


def _instruction_set_flags(name):
    """The compiler flags of one of the kernels' builds, `None` where this
    CPU cannot run it."""
    base = ["-O3", "-std=c99", "-shared", "-fPIC"]
    if name == "portable":
        return base
    x86 = build.platform.machine().lower() in ("x86_64", "amd64")
    sets = dict(
        zip(("avx2", "avx512_vnni"), build.X86_INSTRUCTION_SETS)
    )
    extra = []
    for key, (needed, flags) in sets.items():
        if not x86 or not set(needed) <= build._cpu_flags():
            return None
        extra += flags
        if key == name:
            return base + extra
    return None


@needs_compiler
@pytest.mark.parametrize("instruction_set", ["portable", "avx2", "avx512_vnni"])
def test_every_int8_build_equals_numpy(
    instruction_set, fresh_build, monkeypatch, rng
):
    """Each build of the int8 dot products (portable C, AVX2, AVX-512
    VNNI) gives the exact integer sums of the NumPy fallback, for one row
    and for blocks of rows (whose union is read a window at a time), with
    a dim that is no multiple of the 32- or 64-byte steps."""
    flags = _instruction_set_flags(instruction_set)
    if flags is None:
        pytest.skip(f"this CPU cannot run the {instruction_set} build")
    monkeypatch.setattr(build, "compile_flags", lambda: flags)
    assert build.library() is not None
    for units, dim, count in ((300, 1100, 1), (300, 1100, 9), (70, 130, 66)):
        def normal(*shape):
            return rng.normal(size=shape).astype("float32")

        kernel = rng.integers(-127, 128, size=(units, dim)).astype("int8")
        weights = {
            "projection": normal(dim, 4),
            "gate_kernel": normal(4, units),
            "gate_bias": normal(units),
            "light_kernel": normal(4, units),
            "light_bias": normal(units),
            "kernel": kernel,
            "bias": normal(units),
            "kernel_scale": rng.uniform(0.5, 2, units).astype("float32"),
        }
        rows = normal(count, dim)
        k = units // 3
        outputs, selected = native.sparse_forward(rows, weights, k)
        monkeypatch.setattr(config, "_enabled", False)
        want, want_selected = native.sparse_forward(rows, weights, k)
        monkeypatch.setattr(config, "_enabled", None)
        np.testing.assert_array_equal(selected, want_selected)
        np.testing.assert_allclose(outputs, want, rtol=1e-5, atol=1e-4)


@needs_compiler
def test_portable_build_equals_numpy(fresh_build, monkeypatch, rng):
    """The C fallback for CPUs without AVX2 and FMA (and other
    architectures) computes the same outputs."""
    monkeypatch.setattr(
        build, "compile_flags", lambda: ["-O3", "-std=c99", "-shared", "-fPIC"]
    )
    assert build.library() is not None
    logits = np.round(rng.normal(size=(2, 30))).astype("float32")
    kernel = rng.normal(size=(30, 21)).astype("float32")
    rows = rng.normal(size=(2, 21)).astype("float32")
    light = np.zeros((2, 30))
    outputs, _ = native.select_gather(logits, kernel, rows, 7, light)
    monkeypatch.setattr(config, "_enabled", False)
    want, _ = native.select_gather(logits, kernel, rows, 7, light)
    np.testing.assert_allclose(outputs, want, rtol=1e-5, atol=1e-5)


# --- The JAX FFI handler ---------------------------------------------------


def _jax_include_dir():
    jax = pytest.importorskip("jax")
    return jax.ffi.include_dir()


@pytest.mark.skipif(
    not (HAS_COMPILER and shutil.which("c++")), reason="no C/C++ compiler"
)
def test_the_jax_ffi_handler_builds_once_into_the_private_folder(
    fresh_build,
):
    include_dir = _jax_include_dir()
    library = build.jax_ffi_library(include_dir)
    assert library is not None and library.MidlTopkMask
    (path,) = fresh_build.glob("jax_ffi-*.so")
    assert mode(fresh_build) == 0o700 and mode(path) == 0o700
    modified = os.stat(path).st_mtime_ns
    build._state.clear()
    assert build.jax_ffi_library(include_dir) is not None
    assert os.stat(path).st_mtime_ns == modified  # loaded, not rebuilt


def test_no_cxx_compiler_warns_once_and_gives_no_handler(
    fresh_build, monkeypatch
):
    monkeypatch.setattr(build, "cxx_compiler", lambda: None)
    include_dir = _jax_include_dir()
    with pytest.warns(RuntimeWarning, match="no C and C.. compilers found"):
        assert build.jax_ffi_library(include_dir) is None
    assert build.jax_ffi_library(include_dir) is None  # no second warning


def test_a_missing_cxx_is_an_error_not_another_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler in \\$CXX"):
        build.cxx_compiler()


def test_the_jax_ffi_handler_respects_the_opt_out(fresh_build, monkeypatch):
    monkeypatch.setenv(config.COMPILE_ENV, "0")
    assert build.jax_ffi_library("/nonexistent") is None
    assert not fresh_build.exists()


def _tf_flags():
    tf = pytest.importorskip("tensorflow")
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    return flags, tf.__version__


@pytest.mark.skipif(
    not (HAS_COMPILER and shutil.which("c++")), reason="no C/C++ compiler"
)
def test_the_tensorflow_ops_build_once_into_the_private_folder(fresh_build):
    """Built against the installed TensorFlow, checked, then handed to the
    loader (`tf.load_op_library` in the backend; the path here, so that
    this process registers no second copy of the ops)."""
    flags, version = _tf_flags()
    loaded = []

    def load(path):
        loaded.append(path)
        return path

    assert build.tf_ops_library(flags, version, load) is not None
    (path,) = fresh_build.glob("tf_ops-*.so")
    assert loaded == [str(path)]
    assert mode(fresh_build) == 0o700 and mode(path) == 0o700
    modified = os.stat(path).st_mtime_ns
    build._state.clear()
    build.tf_ops_library(flags, version, load)
    assert os.stat(path).st_mtime_ns == modified  # loaded, not rebuilt
    assert loaded == [str(path)] * 2
    build._state.clear()
    build.tf_ops_library(flags, "another version", load)
    assert len(list(fresh_build.glob("tf_ops-*.so"))) == 2


def test_tensorflow_ops_of_an_unsafe_cache_are_not_loaded(fresh_build):
    flags, version = _tf_flags()
    fresh_build.mkdir(mode=0o700)
    os.chmod(fresh_build, 0o777)
    loaded = []
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        library = build.tf_ops_library(flags, version, loaded.append)
    assert library is None and not loaded


def test_no_cxx_compiler_warns_once_and_gives_no_tensorflow_ops(
    fresh_build, monkeypatch
):
    monkeypatch.setattr(build, "cxx_compiler", lambda: None)
    flags, version = _tf_flags()
    with pytest.warns(RuntimeWarning, match="no C and C.. compilers found"):
        assert build.tf_ops_library(flags, version, lambda path: path) is None
    assert build.tf_ops_library(flags, version, lambda path: path) is None


def test_the_tensorflow_ops_respect_the_opt_out(fresh_build, monkeypatch):
    monkeypatch.setenv(config.COMPILE_ENV, "0")
    assert build.tf_ops_library([], "0", lambda path: path) is None
    assert not fresh_build.exists()
