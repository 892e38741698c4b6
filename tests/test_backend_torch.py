"""`keras_midl.backend.torch`: the native kernel in every eager call (an
autograd function where gradients are recorded), `torch.compile` of the
gathered path where it cannot run (with one warning and the `keras.ops`
path when compiling fails), and the masked path under `torch.jit.trace`.

Each distinct layer shape compiled by `torch.compile` costs tens of
seconds here: the tests that compile share one shape, the others replace
the compiler (`_compile`) by the function itself.
"""

import warnings

import keras
import numpy as np
import pytest
from inference_utils import CONFIGS
from inference_utils import INPUT_DIM
from inference_utils import NATIVE_SELECTION
from inference_utils import UNITS
from inference_utils import as_numpy
from inference_utils import make_pair
from inference_utils import spy_native_threads

from keras_midl import config
from keras_midl.midl import MIDL
from keras_midl.native import build
from keras_midl.ops import dispatch
from keras_midl.ops import gathered

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch backend only"
)


@pytest.fixture
def torch_backend():
    from keras_midl.backend import torch as module

    return module


@pytest.fixture
def without_native(torch_backend, monkeypatch):
    """torch with the native kernel not built (as where it cannot be),
    native kernels on, and no compiled function nor failure yet: the
    `torch.compile` path runs."""
    monkeypatch.setattr(torch_backend, "_compiled", {})
    monkeypatch.setattr(torch_backend, "_failed", [])
    monkeypatch.setattr(build, "_state", {"library": None})
    monkeypatch.setattr(config, "_enabled", None)
    monkeypatch.delenv(config.COMPILE_ENV, raising=False)
    return torch_backend


@pytest.fixture
def compiled_names(without_native, monkeypatch):
    """`_compile` replaced by the function itself (run eagerly): records
    the names of the functions it was given."""
    names = []

    def record(function):
        names.append(function.__name__)
        return function

    monkeypatch.setattr(without_native, "_compile", record)
    return names


def _tensor(x):
    import torch

    return torch.tensor(x)


# --- Where the native kernel runs ------------------------------------------


def test_in_trace_and_exporting(torch_backend, monkeypatch):
    import torch

    assert not torch_backend.in_trace(None)
    assert not torch_backend.exporting()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert torch_backend.in_trace(None) and torch_backend.exporting()


def test_native_forward_needs_float32_cpu_tensors(torch_backend):
    import torch

    layer = MIDL(UNITS)
    layer.build((None, INPUT_DIM))
    weights = dispatch.layer_weights(layer)
    on_meta = torch.empty((1, INPUT_DIM), device="meta")
    assert torch_backend.native_forward(on_meta, weights, layer.k) is None
    double = torch.zeros((1, INPUT_DIM), dtype=torch.float64)
    assert torch_backend.native_forward(double, weights, layer.k) is None


def test_jit_trace_records_the_masked_path(native_calls, rng):
    """The ONNX exporter traces with `torch.jit.trace`: it records the
    masked path (the gathered one's scatter has no ONNX op), never the
    native call."""
    import torch

    masked, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        traced = torch.jit.trace(layer, (x,), check_trace=False)
    assert not native_calls
    np.testing.assert_allclose(
        as_numpy(traced(x)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_stateless_call_of_numpy_inputs_on_the_gathered_path(rng):
    masked, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    outputs, _ = layer.stateless_call(
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        x,
        training=False,
    )
    np.testing.assert_allclose(
        as_numpy(outputs),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


# --- SelectGather: the native kernel's gradient -----------------------------


def test_native_gradient_equals_the_reference(
    torch_backend, native_calls, rng
):
    """Gradients through the native forward (inputs, kernel, bias) equal
    those of the `keras.ops` gathered path."""
    import torch

    _, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    weights = dispatch.layer_weights(layer)
    x = rng.normal(size=(2, INPUT_DIM)).astype("float32")
    seed = _tensor(rng.normal(size=(2, UNITS)).astype("float32"))
    gradients = []
    for native in (True, False):
        inputs = torch.tensor(x, requires_grad=True)
        for name in ("kernel", "bias"):
            weights[name].grad = None
        if native:
            outputs = torch_backend.native_forward(inputs, weights, layer.k)
        else:
            outputs = gathered.gathered_outputs(inputs, weights, layer.k)
        (outputs * seed).sum().backward()
        gradients.append(
            [
                inputs.grad.numpy(),
                weights["kernel"].grad.numpy().copy(),
                weights["bias"].grad.numpy().copy(),
            ]
        )
    assert "select_gather_pointers" in native_calls
    for native_gradient, reference in zip(*gradients):
        np.testing.assert_allclose(
            native_gradient, reference, rtol=1e-5, atol=1e-5
        )


def test_select_gather_gradient_of_the_full_and_light_paths(
    torch_backend, rng
):
    """`SelectGather`: the gradient of the selected outputs goes to the
    rows, the kernel and the bias, that of the others to the light path
    `base`; the logits get none (the selection is held fixed)."""
    import torch

    from keras_midl import native

    if not native.available():
        pytest.skip("the native kernel could not be built here")
    rows_count, k = 3, 5
    logits = torch.tensor(
        rng.normal(size=(rows_count, UNITS)).astype("float32"),
        requires_grad=True,
    )
    tensors = [
        torch.tensor(
            rng.normal(size=shape).astype("float32"), requires_grad=True
        )
        for shape in (
            (rows_count, INPUT_DIM),
            (UNITS, INPUT_DIM),
            (UNITS,),
            (rows_count, UNITS),
        )
    ]
    rows, kernel, bias, base = tensors
    outputs = torch_backend.SelectGather.apply(
        logits, rows, kernel, bias, base, k
    )
    mask = torch.zeros_like(logits)
    mask.scatter_(1, torch.topk(logits.detach(), k).indices, 1.0)
    reference = mask * (rows @ kernel.T + bias) + (1 - mask) * base
    np.testing.assert_allclose(
        outputs.detach().numpy(),
        reference.detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    seed = _tensor(rng.normal(size=(rows_count, UNITS)).astype("float32"))
    grads = torch.autograd.grad(
        (outputs * seed).sum(), [logits, *tensors], allow_unused=True
    )
    expected = torch.autograd.grad((reference * seed).sum(), tensors)
    assert grads[0] is None or not grads[0].any()
    for grad, reference_grad in zip(grads[1:], expected):
        np.testing.assert_allclose(
            grad.numpy(), reference_grad.numpy(), rtol=1e-5, atol=1e-5
        )


def test_layer_gradient_through_the_native_kernel(native_calls, rng):
    """An inference call with gradients recorded (no `no_grad`) runs the
    native kernel, and the full and light paths' weights get the masked
    path's gradients."""
    import torch

    masked, layer = make_pair((3, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(3, INPUT_DIM)).astype("float32"))
    seed = _tensor(rng.normal(size=(3, UNITS)).astype("float32"))
    names = ("kernel", "bias", "light_kernel", "light_bias")
    grads = []
    for model in (layer, masked):
        variables = [getattr(model, name).value for name in names]
        outputs = model(x, training=False)
        grads.append(torch.autograd.grad((outputs * seed).sum(), variables))
    assert "select_gather_pointers" in native_calls
    for name, native_grad, masked_grad in zip(names, *grads):
        np.testing.assert_allclose(
            native_grad.numpy(),
            masked_grad.numpy(),
            rtol=1e-5,
            atol=1e-5,
            err_msg=name,
        )


# --- torch_forward: the gathered path in torch ops ----------------------------


@pytest.mark.parametrize("rows", [1, 4])
def test_torch_forward_equals_the_reference(torch_backend, rows, rng):
    layer = MIDL(UNITS, k_ratio=0.25, bias_initializer="random_normal")
    layer.build((None, INPUT_DIM))
    # Ties in the gate logits: the lowest index wins, as in topk_mask.
    layer.gate_kernel.assign(np.zeros((layer.effective_rank, UNITS)))
    bias = np.round(rng.normal(size=(UNITS,)), 0).astype("float32")
    layer.gate_bias.assign(bias)
    weights = dispatch.layer_weights(layer)
    x = _tensor(rng.normal(size=(rows, INPUT_DIM)).astype("float32"))
    arguments = [weights[name] for name in torch_backend.WEIGHT_NAMES]
    outputs = torch_backend.torch_forward(x, *arguments, layer.k)
    np.testing.assert_allclose(
        as_numpy(outputs),
        as_numpy(layer.masked_outputs(x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_one_compiled_function_per_layer_shape(compiled_names, rng):
    """One `torch.compile` per layer shape (a code object of its own, so
    that shapes do not share a recompile limit); batch sizes share it."""
    for units in (UNITS, UNITS, 2 * UNITS):
        masked, layer = make_pair((1, INPUT_DIM), units=units, k_ratio=0.5)
        for rows in (1, 3):
            x = _tensor(rng.normal(size=(rows, INPUT_DIM)).astype("float32"))
            np.testing.assert_allclose(
                as_numpy(layer(x, training=False)),
                as_numpy(masked(x, training=False)),
                rtol=1e-5,
                atol=1e-5,
            )
    assert len(compiled_names) == 2
    assert all(n.startswith("midl_gathered_") for n in compiled_names)
    assert len(set(compiled_names)) == 2


def test_auto_without_the_native_kernel_runs_masked(compiled_names, rng):
    """torch's `"auto"` rule is the native kernel's: without it the masked
    path runs, and nothing is compiled."""
    masked, layer = make_pair((1, INPUT_DIM), k_ratio=0.25)
    layer.inference_path = "auto"
    x = _tensor(rng.normal(size=(1, INPUT_DIM)).astype("float32"))
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not compiled_names


# --- torch.compile: its failure and the opt-out ----------------------------


def test_compile_failure_falls_back_with_one_warning(
    without_native, monkeypatch, rng
):
    attempts = []

    def failing_compile(function):
        def compiled(*args):
            attempts.append(1)
            raise RuntimeError("simulated: no C++ compiler")

        return compiled

    monkeypatch.setattr(without_native, "_compile", failing_compile)
    masked, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    expected = as_numpy(masked(x, training=False))
    with pytest.warns(RuntimeWarning, match="simulated: no C"):
        outputs = as_numpy(layer(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        outputs = as_numpy(layer(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert len(attempts) == 1  # not retried
    assert len(without_native._failed) == 1


@pytest.mark.parametrize("how", ["environment", "function"])
def test_compile_opt_out(how, without_native, monkeypatch, rng):
    def no_compile(function):
        raise AssertionError("compiled despite the opt-out")

    monkeypatch.setattr(without_native, "_compile", no_compile)
    if how == "environment":
        monkeypatch.setenv(config.COMPILE_ENV, "0")
    else:
        config.disable_native_kernels()
    masked, layer = make_pair((1, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(1, INPUT_DIM)).astype("float32"))
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_torch_compile_of_the_eager_gathered_call(without_native, rng):
    """The real `torch.compile` of the gathered path, in an eager call the
    native kernel cannot take."""
    masked, layer = make_pair((1, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(1, INPUT_DIM)).astype("float32"))
    np.testing.assert_allclose(
        as_numpy(layer(x, training=False)),
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert len(without_native._compiled) == 1
    assert not without_native._failed


def test_a_callers_torch_compile_never_runs_the_native_kernel(
    torch_backend, native_calls, monkeypatch, rng
):
    """Inside a caller's `torch.compile` the gathered path is traced inline
    in torch ops (`torch_forward`), never the native call."""
    import torch

    monkeypatch.setattr(torch_backend, "_failed", [])
    masked, layer = make_pair((1, INPUT_DIM), **CONFIGS["k_half"])
    x = _tensor(rng.normal(size=(1, INPUT_DIM)).astype("float32"))
    compiled = torch.compile(lambda x: layer(x, training=False))
    with torch.no_grad():
        outputs = as_numpy(compiled(x))
    np.testing.assert_allclose(
        outputs,
        as_numpy(masked(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not native_calls
    assert not torch_backend._failed


def test_select_gather_reads_a_bias_that_outlives_the_call(
    torch_backend, native_calls, monkeypatch, rng
):
    """A non-contiguous bias is copied to a contiguous tensor held until
    the C call returns (the old code passed the address of a temporary
    that was freed before the call). Allocations of the same size before
    the call would reuse a freed buffer and fill it with garbage."""
    import torch

    from keras_midl.native import kernels

    units, dim, k = 64, 16, 20
    real = kernels.select_gather_pointers

    def allocate_then_call(*args, **kwargs):
        garbage = [torch.full((units,), 1e6) for _ in range(8)]
        real(*args, **kwargs)
        del garbage

    monkeypatch.setattr(kernels, "select_gather_pointers", allocate_then_call)
    logits = torch.tensor(rng.normal(size=(3, units)).astype("float32"))
    rows = torch.tensor(rng.normal(size=(3, dim)).astype("float32"))
    kernel = torch.tensor(rng.normal(size=(units, dim)).astype("float32"))
    strided = torch.tensor(rng.normal(size=(2 * units,)).astype("float32"))
    bias = strided[::2]  # not contiguous: the kernel needs a copy
    base = torch.zeros((3, units))
    outputs = torch_backend.SelectGather.apply(
        logits, rows, kernel, bias, base, k
    )
    chosen = torch.topk(logits, k).indices
    want = (rows @ kernel.T + bias).gather(1, chosen)
    np.testing.assert_allclose(
        outputs.gather(1, chosen).numpy(), want.numpy(), rtol=1e-5,
        atol=1e-5,
    )


# --- The training selection and mix in C ------------------------------------


@pytest.fixture
def c_pass_calls(monkeypatch):
    """Records the calls of the native training kernels and of the
    masked inference pass; skips where the library is not built here."""
    from keras_midl.native import kernels

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")
    calls = []
    for name in (
        "topk_mask_pointers",
        "mix_pointers",
        "mix_backward_pointers",
        "select_mix_pointers",
    ):
        original = getattr(kernels, name)

        def spy(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def _training_loss(layer, outputs, seed):
    """A loss of the outputs, and the balance loss: the mix takes the
    latter's gradient to the logits too."""
    return (outputs * seed).sum() + sum(layer.losses)


def _randomize_biases(layer, rng):
    """Non-zero path biases: the C mix adds them and sums their
    gradients."""
    for bias in (layer.bias, layer.light_bias):
        if bias is not None:
            bias.assign(rng.normal(size=bias.shape).astype("float32"))


def _training_gradients(layer, x, seed):

    for variable in layer.trainable_variables:
        variable.value.grad = None
    outputs = layer(_tensor(x), training=True)
    _training_loss(layer, outputs, seed).backward()
    return [as_numpy(outputs)] + [
        variable.value.grad.numpy().copy()
        for variable in layer.trainable_variables
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_native_training_step_equals_the_keras_ops_path(
    temperature, light_path, use_bias, c_pass_calls, monkeypatch, rng
):
    """A training call runs the C selection and mix (forward and
    backward, the paths' biases added and their gradients summed); its
    outputs equal the `keras.ops` path's bit for bit, its gradients to
    float32 rounding."""
    layer = MIDL(
        UNITS,
        k_ratio=0.4,
        rank=3,
        temperature=temperature,
        light_path=light_path,
        use_bias=use_bias,
        gate_noise=0.0,
        activation="relu",
    )
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    x[0] = 0.0  # a row of tied logits (the gate bias only)
    layer.build(x.shape)
    _randomize_biases(layer, rng)
    seed = _tensor(rng.normal(size=(6, UNITS)).astype("float32"))
    native_results = _training_gradients(layer, x, seed)
    assert sorted(set(c_pass_calls)) == [
        "mix_backward_pointers", "mix_pointers", "topk_mask_pointers"
    ]
    monkeypatch.setattr(config, "_enabled", False)
    reference = _training_gradients(layer, x, seed)
    np.testing.assert_array_equal(native_results[0], reference[0])
    for native, want in zip(native_results[1:], reference[1:]):
        np.testing.assert_allclose(native, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
def test_the_c_mix_adds_the_biases_and_sums_their_gradients(
    light_path, monkeypatch, rng
):
    """The training mix takes the paths' biases: its forward adds them and
    its backward sums their gradients, in the C passes (no separate adds
    and sums over the rows)."""
    from keras_midl.native import kernels

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")
    seen = []
    for name in ("mix_pointers", "mix_backward_pointers"):
        original = getattr(kernels, name)

        def spy(*args, original=original, name=name, **kwargs):
            seen.append((name, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    layer = MIDL(UNITS, k_ratio=0.4, rank=3, light_path=light_path)
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    layer.build(x.shape)
    _randomize_biases(layer, rng)
    seed = _tensor(rng.normal(size=(6, UNITS)).astype("float32"))
    _training_gradients(layer, x, seed)
    (forward, forward_kwargs), (backward, backward_kwargs) = seen
    assert (forward, backward) == ("mix_pointers", "mix_backward_pointers")
    with_light = light_path == "lowrank"
    for kwargs in (forward_kwargs, backward_kwargs):
        assert kwargs["bias"] == layer.bias.value.data_ptr()
        assert bool(kwargs["light_bias"]) == with_light
    assert backward_kwargs["d_bias"] != 0
    assert bool(backward_kwargs["d_light_bias"]) == with_light


def test_no_native_training_kernel_where_torch_jit_traces(
    c_pass_calls, rng
):
    """`torch.jit.trace` (the ONNX exporter) records torch ops: ONNX has
    no operator for the C calls."""
    import torch

    layer = MIDL(UNITS, k_ratio=0.4, inference_path="masked")
    x = _tensor(rng.normal(size=(3, INPUT_DIM)).astype("float32"))
    layer(x)
    c_pass_calls.clear()

    class Training(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, inputs):
            return self.layer(inputs, training=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        torch.jit.trace(Training(layer), (x,), check_trace=False)
    assert c_pass_calls == []
    layer(x, training=True)
    assert "topk_mask_pointers" in c_pass_calls


def test_native_mix_needs_float32_tensors_of_one_shape(torch_backend):
    import torch

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")
    mask = torch.ones((2, 3))
    full = torch.ones((2, 3))
    assert torch_backend.native_mix(mask, full, full, None, 1.0) is not None
    assert torch_backend.native_mix(mask[:1], full, full, None, 1.0) is None
    half = full.to(torch.float16)
    assert torch_backend.native_mix(mask, full, half, None, 1.0) is None
    assert torch_backend.native_topk_mask(half, 2, training=True) is None


def test_eager_training_calls_skip_the_operators(torch_backend, monkeypatch):
    """Eager, the C selection is called directly and the mix is the
    autograd function `EagerMix`: the operators' dispatch is for
    `torch.compile` (below), and costs an eager step more."""
    import torch

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")

    def operator(*args):
        raise AssertionError("an operator was dispatched eagerly")

    monkeypatch.setattr(torch_backend, "topk_mask_op", operator)
    monkeypatch.setattr(torch_backend, "mix_op", operator)
    logits = torch.randn((4, 6), requires_grad=True)
    mask = torch_backend.native_topk_mask(logits, 2, training=True)
    assert mask.sum().item() == 8
    outputs = torch_backend.native_mix(mask, logits, logits * 2, None, 1.0)
    assert type(outputs.grad_fn).__name__ == "EagerMixBackward"


def test_torch_compile_records_the_native_training_operators(
    c_pass_calls, rng
):
    """Under `torch.compile` (Keras's `jit_compile=True`) the C selection
    and mix run as the operators `keras_midl::topk_mask` and
    `keras_midl::mix`, with the eager call's values and gradients."""
    import torch

    layer = MIDL(UNITS, k_ratio=0.4, rank=3, activation="relu")
    x = rng.normal(size=(6, INPUT_DIM)).astype("float32")
    layer.build(x.shape)
    _randomize_biases(layer, rng)
    seed = _tensor(rng.normal(size=(6, UNITS)).astype("float32"))
    eager = _training_gradients(layer, x, seed)
    c_pass_calls.clear()

    def step(inputs):
        return layer(inputs, training=True)

    compiled = torch.compile(step, dynamic=False)
    for variable in layer.trainable_variables:
        variable.value.grad = None
    outputs = compiled(_tensor(x))
    _training_loss(layer, outputs, seed).backward()
    assert sorted(set(c_pass_calls)) == [
        "mix_backward_pointers", "mix_pointers", "topk_mask_pointers"
    ]
    np.testing.assert_array_equal(as_numpy(outputs), eager[0])
    for variable, want in zip(layer.trainable_variables, eager[1:]):
        np.testing.assert_allclose(
            variable.value.grad.numpy(), want, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_bias": False},
        {"light_path": "zero"},
        {"activation": "relu", "use_bias": False, "light_path": "zero"},
    ],
)
@pytest.mark.parametrize("inference_path", ["masked", "auto"])
def test_inference_without_gradient_selects_and_mixes_in_one_c_pass(
    options, inference_path, c_pass_calls, rng
):
    """Where no gradient is recorded (`torch.no_grad()`, `predict`), the
    masked path's selection, bias adds and mix are one C pass with no
    mask (`native_select_mix`): the masked path's values, bit for bit.
    Where one may be recorded, the masked path runs (its mix has the
    gate's gradient)."""
    import torch

    layer = MIDL(
        UNITS, k_ratio=0.4, inference_path=inference_path, **options
    )
    x = rng.normal(size=(40, 3, INPUT_DIM)).astype("float32")
    x[0] = 0.0  # rows of tied logits (the gate bias only)
    layer.build(x.shape)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    want = as_numpy(layer.masked_outputs(_tensor(x), training=False))
    recorded = as_numpy(layer(_tensor(x)))
    assert "select_mix_pointers" not in c_pass_calls
    with torch.no_grad():
        outputs = as_numpy(layer(_tensor(x)))
    assert c_pass_calls.count("select_mix_pointers") == 1
    np.testing.assert_array_equal(outputs.view("uint32"), want.view("uint32"))
    np.testing.assert_array_equal(recorded, want)
    predicted = keras.Sequential([layer]).predict(x, verbose=0)
    assert c_pass_calls.count("select_mix_pointers") > 1
    np.testing.assert_array_equal(predicted, want)


def test_no_native_mix_for_an_int8_layer_nor_a_trace(c_pass_calls, rng):
    """An int8 layer's masked path is an integer matmul; `torch.jit.trace`
    records torch ops only: neither runs `midl_select_mix`."""
    import torch

    layer = MIDL(UNITS, k_ratio=0.4, inference_path="masked")
    x = _tensor(rng.normal(size=(20, INPUT_DIM)).astype("float32"))
    layer.build(x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        with torch.no_grad():
            torch.jit.trace(layer, (x,), check_trace=False)
    assert "select_mix_pointers" not in c_pass_calls
    layer.quantize("int8")
    with torch.no_grad():
        layer(x)
    assert "select_mix_pointers" not in c_pass_calls


# torch's thread count, the CPUs this process may run on, the kernel's.
@pytest.mark.parametrize(
    "torch_threads, cpus, expected", [(3, 8, 3), (3, 2, 2), (1, 8, 1)]
)
@pytest.mark.parametrize("recorded", [False, True])
def test_the_native_kernel_runs_on_torchs_threads(
    torch_backend, native_calls, monkeypatch, torch_threads, cpus,
    expected, recorded, rng,
):
    """With no gradient recorded (`midl_sparse_forward`) and with one
    (`midl_select_gather`), the kernel gets `torch.get_num_threads()`,
    at most the CPUs this process may run on."""
    import torch

    from keras_midl.native import kernels

    threads = spy_native_threads(monkeypatch)
    monkeypatch.setattr(kernels, "available_cpus", lambda: cpus)
    _, layer = make_pair((2, INPUT_DIM), **CONFIGS["k_half"])
    weights = dispatch.layer_weights(layer)
    x = torch.tensor(rng.normal(size=(2, INPUT_DIM)).astype("float32"))
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        with torch.set_grad_enabled(recorded):
            torch_backend.native_forward(x, weights, layer.k)
    finally:
        torch.set_num_threads(before)
    assert threads == [expected]


@pytest.mark.parametrize(
    "torch_threads, cpus, expected", [(3, 8, 3), (3, 2, 2), (1, 8, 1)]
)
def test_the_selection_runs_on_torchs_threads(
    torch_backend, monkeypatch, torch_threads, cpus, expected, rng
):
    """The training selection (`midl_topk_mask`) and the masked path's
    mix (`midl_select_mix`) get `torch.get_num_threads()`, at most the
    CPUs this process may run on."""
    import torch

    from keras_midl.native import kernels

    if build.library() is None:
        pytest.skip("the native kernel could not be built here")
    threads = spy_native_threads(monkeypatch, NATIVE_SELECTION)
    monkeypatch.setattr(kernels, "available_cpus", lambda: cpus)
    logits, full, light = (
        torch.tensor(rng.normal(size=(4, 30)).astype("float32"))
        for _ in range(3)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        mask = torch_backend.native_topk_mask(logits, 7, training=True)
        mixed = torch_backend.native_select_mix(
            logits, 7, full.clone(), None, light, None
        )
    finally:
        torch.set_num_threads(before)
    assert threads == [expected, expected]
    np.testing.assert_array_equal(
        as_numpy(mixed), np.where(as_numpy(mask) > 0, full, light)
    )


@pytest.mark.parametrize("shape", [(3, 3, 4, 1), (3, 4, 1), (2, 2, 2, 3, 1)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_conv_kernel_of_one_output_channel_is_a_copy_in_torch_layout(
    torch_backend, shape, dtype, rng
):
    """Keras's permutation of the returned half-precision kernel to
    `(c_out, c_in, *spatial)` is a contiguous tensor, not a view that
    only reads as channels-last (which PyTorch's float16 convolution
    cannot take a gradient into), with the kernel's values."""
    kernel = keras.ops.cast(rng.normal(size=shape), dtype)
    spatial = len(shape) - 2
    order = (spatial + 1, spatial, *range(spatial))
    laid_out = torch_backend.conv_kernel(kernel)
    assert laid_out.permute(order).is_contiguous()
    assert not kernel.permute(order).is_contiguous()
    np.testing.assert_array_equal(
        as_numpy(keras.ops.cast(laid_out, "float32")),
        as_numpy(keras.ops.cast(kernel, "float32")),
    )


@pytest.mark.parametrize(
    "shape, dtype",
    [((3, 3, 4, 2), "float16"), ((3, 3, 4, 1), "float32")],
)
def test_conv_kernel_leaves_other_kernels(torch_backend, shape, dtype, rng):
    """Several output channels, or float32: the kernel as it is."""
    kernel = keras.ops.cast(rng.normal(size=shape), dtype)
    assert torch_backend.conv_kernel(kernel) is kernel


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_conv_of_one_output_channel_has_gradients(
    torch_backend, dtype, rng
):
    """The gradient of a float16 (bfloat16) convolution with one output
    channel, channels-last as Keras runs it, through `conv_kernel`, is
    the float32 one (without it, float16 failed on some CPUs:
    "slow_conv2d: grad_weight must be contiguous")."""
    import torch

    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    w = rng.normal(size=(3, 3, 3, 1)).astype("float32")

    def kernel_gradient(compute_dtype):
        kernel = torch.tensor(w, requires_grad=True)
        outputs = keras.ops.conv(
            keras.ops.cast(x, compute_dtype),
            torch_backend.conv_kernel(keras.ops.cast(kernel, compute_dtype)),
            padding="same",
        )
        keras.ops.sum(keras.ops.cast(outputs, "float32")).backward()
        return kernel.grad.numpy()

    np.testing.assert_allclose(
        kernel_gradient(dtype), kernel_gradient("float32"), rtol=0.05,
        atol=0.05,
    )
