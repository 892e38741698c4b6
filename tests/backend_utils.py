"""Test helpers: the backend in use, gradients per backend, a layer test,
a built Dense layer with random weights.

The library itself uses keras.ops only; the gradient helpers here are the
backend-specific code the tests need.
"""

import os
import tempfile

import keras
import numpy as np

BACKEND = keras.backend.backend()

_PLAIN = (bool, int, float, str, type(None))


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    expected_num_trainable_weights=None,
    expected_num_non_trainable_weights=0,
    input_dtype="float32",
):
    """Checks what every Keras layer must do, in the spirit of Keras's
    `testing.TestCase.run_layer_test`:

    * `get_config()` holds each plain (scalar or string) constructor
      argument unchanged, and `from_config(get_config())` gives the same
      config;
    * `build` creates the expected number of trainable and non-trainable
      weights, and `compute_output_shape` gives the expected shape;
    * an eager call on data and a symbolic call on `keras.Input` give the
      expected shape;
    * a model holding the layer saved as `.keras` and loaded back predicts
      the same outputs (inference mode).

    Args:
        layer_cls: The layer class.
        init_kwargs: Dict of constructor arguments.
        input_shape: Concrete input shape, batch axis included.
        expected_output_shape: Output shape for that input.
        expected_num_trainable_weights: Checked when not `None`.
        expected_num_non_trainable_weights: Checked when not `None`.
        input_dtype: Dtype of the random input data.

    Returns:
        The built layer of the saved model, for further checks.
    """
    input_shape = tuple(input_shape)
    expected_output_shape = tuple(expected_output_shape)

    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():
        if isinstance(value, _PLAIN):
            assert config[key] == value, (key, config[key], value)
    assert layer_cls.from_config(config).get_config() == config

    layer.build(input_shape)
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights
    if expected_num_non_trainable_weights is not None:
        assert (
            len(layer.non_trainable_weights)
            == expected_num_non_trainable_weights
        )
    assert tuple(layer.compute_output_shape(input_shape)) == (
        expected_output_shape
    )

    x = np.random.default_rng(0).normal(size=input_shape).astype(input_dtype)
    assert tuple(layer(x).shape) == expected_output_shape

    inputs = keras.Input(input_shape[1:], batch_size=input_shape[0])
    symbolic = layer_cls(**init_kwargs)
    model = keras.Model(inputs, symbolic(inputs))
    assert tuple(model.output.shape) == expected_output_shape

    expected = keras.ops.convert_to_numpy(model(x, training=False))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x, training=False)),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )
    (revived,) = [
        candidate
        for candidate in reloaded.layers
        if isinstance(candidate, layer_cls)
    ]
    assert revived.get_config() == symbolic.get_config()
    return revived


def value_and_gradients(fn, *arrays):
    """Returns `fn(*arrays)` and its gradients w.r.t. each array, in NumPy.

    `fn` maps backend tensors to a scalar tensor.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(a) for a in arrays]
        with tf.GradientTape() as tape:
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
        return value.numpy(), [g.numpy() for g in grads]
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(
            fn, argnums=tuple(range(len(arrays)))
        )(*arrays)
        return np.asarray(value), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors)
        return value.detach().numpy(), [g.numpy() for g in grads]
    raise NotImplementedError(backend)


def variable_gradients(layer, fn):
    """Gradients of `fn()` w.r.t. the layer's trainable variables, in NumPy.

    Returns a dict keyed by the variable's path-less name.
    """
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    names = [v.name for v in variables]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [v.value for v in variables])
        return dict(zip(names, [np.asarray(g) for g in grads]))
    if backend == "jax":
        import jax

        values = [v.value for v in variables]

        def stateless(values):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values))
            ):
                return fn()

        grads = jax.grad(stateless)(values)
        return dict(zip(names, [np.asarray(g) for g in grads]))
    if backend == "torch":
        import torch

        value = fn()
        grads = torch.autograd.grad(value, [v.value for v in variables])
        return dict(zip(names, [g.numpy() for g in grads]))
    raise NotImplementedError(backend)


def assert_transposed_product(inputs, kernel, outputs, d_inputs, d_kernel):
    """`outputs` is `inputs @ kernel^T` (a kernel stored as `(units, d)`,
    inputs of any rank), and `d_inputs`, `d_kernel` the gradients of
    `sum(outputs ** 2)`; NumPy arrays."""
    want = inputs @ kernel.T
    np.testing.assert_allclose(outputs, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        d_inputs, 2 * want @ kernel, rtol=1e-4, atol=1e-3
    )
    rows = inputs.reshape(-1, inputs.shape[-1])
    np.testing.assert_allclose(
        d_kernel, 2 * (rows @ kernel.T).T @ rows, rtol=1e-4, atol=1e-3
    )


def built_dense(input_dim=12, units=20, rng=None, **kwargs):
    rng = rng or np.random.default_rng(0)
    kwargs.setdefault("activation", "relu")
    layer = keras.layers.Dense(units, **kwargs)
    layer.build((None, input_dim))
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer
