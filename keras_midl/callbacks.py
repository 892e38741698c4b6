"""Training callbacks for models with MIDL layers.

`KRatioWarmup` starts training with every MIDL layer at a high `k_ratio`
(by default 1: the layer computes its Dense full path for every neuron) and
lowers it linearly to each layer's own `k_ratio` over the first epochs, so
that the kernel learns as a Dense layer's would before the gate takes
neurons away.

A layer's `k` is a static size of the traced training step, so each change
rebuilds Keras's compiled train, test and predict functions (one trace per
distinct `k`, at most `epochs + 1`).

Example:

>>> model = keras.Sequential([
...     keras.Input((8,)),
...     keras_midl.MIDL(16, k_ratio=0.25, activation="relu"),
...     keras.layers.Dense(2, activation="softmax"),
... ])
>>> model.compile("adam", "sparse_categorical_crossentropy")
>>> x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
>>> y = (x[:, 0] > 0).astype("int32")
>>> warmup = keras_midl.callbacks.KRatioWarmup(epochs=3)
>>> _ = model.fit(x, y, epochs=4, callbacks=[warmup], verbose=0)
>>> warmup.history   # k_ratio of each epoch: 1 -> 0.25 over 3 epochs
[[1.0], [0.75], [0.5], [0.25]]
>>> model.layers[0].k_ratio
0.25
"""

import keras

from keras_midl._checks import is_integer
from keras_midl._checks import is_number
from keras_midl.midl import MIDL
from keras_midl.midl_conv2d import MIDLConv2D


def _midl_layers(model):
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (MIDL, MIDLConv2D)):
            yield layer


class KRatioWarmup(keras.callbacks.Callback):
    """Lowers every MIDL layer's `k_ratio` from `start` to its own value
    (MIDLConv2D layers included).

    At the beginning of epoch `e` (counted from 0) each MIDL layer of the
    model gets

    ```
    k_ratio(e) = target + (start - target) * max(0, 1 - e / epochs)
    ```

    where `target` is the layer's `k_ratio` when training begins: `start`
    at epoch 0, `target` from epoch `epochs` on. When training ends (also
    early), every layer is back at its target, so the trained model is
    the one that was built.

    Example:

    >>> warmup = keras_midl.callbacks.KRatioWarmup(epochs=5, start=1.0)
    >>> # model.fit(x, y, epochs=10, callbacks=[warmup])

    Args:
        epochs: Positive integer, the epochs over which `k_ratio` falls.
        start: `k_ratio` of the first epoch, in `(0, 1]`; a layer whose
            target is above it starts at its target.
        verbose: `1` prints the new values at each change.

    Attributes:
        history: One list per epoch begun, the `k_ratio` of each MIDL layer.
    """

    def __init__(self, epochs, start=1.0, verbose=0):
        super().__init__()
        if not is_integer(epochs) or epochs < 1:
            raise ValueError(
                "Received an invalid value for `epochs`, expected a positive "
                f"integer. Received: epochs={epochs!r}"
            )
        if not is_number(start) or not 0 < start <= 1:
            raise ValueError(
                "Received an invalid value for `start`, expected a number in "
                f"(0, 1]. Received: start={start!r}"
            )
        self.epochs = epochs
        self.start = float(start)
        self.verbose = verbose
        self.history = []
        self._targets = None

    def on_train_begin(self, logs=None):
        layers = list(_midl_layers(self.model))
        if not layers:
            raise ValueError(
                f"KRatioWarmup found no MIDL layer in model "
                f"{self.model.name!r}: there is no k_ratio to warm up."
            )
        self._targets = [(layer, layer.k_ratio) for layer in layers]
        self.history = []

    def k_ratios(self, epoch):
        """The `k_ratio` of each MIDL layer at the beginning of `epoch`."""
        remaining = max(0.0, 1.0 - epoch / self.epochs)
        return [
            round(target + (max(self.start, target) - target) * remaining, 6)
            for _, target in self._targets
        ]

    def on_epoch_begin(self, epoch, logs=None):
        values = self.k_ratios(epoch)
        self._set(values)
        self.history.append(values)
        if self.verbose:
            print(f"KRatioWarmup: epoch {epoch + 1}, k_ratio {values}")

    def on_train_end(self, logs=None):
        self._set([target for _, target in self._targets])

    def _set(self, values):
        changed = False
        for (layer, _), value in zip(self._targets, values):
            if layer.k_ratio != value:
                layer.k_ratio = value
                changed = True
        if changed:
            # `k` is static in the traced steps: trace them again.
            self.model.make_train_function(force=True)
            self.model.make_test_function(force=True)
            self.model.make_predict_function(force=True)
