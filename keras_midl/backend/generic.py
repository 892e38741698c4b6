"""The backend functions for a backend without a module of its own (such
as NumPy's): no native kernel and nothing compiled; `keras.ops` only."""


def in_trace(inputs):
    """Whether the call is traced; never on this backend."""
    return False


def exporting():
    """Whether a tracing exporter records the call; never here."""
    return False


def native_forward(inputs, weights, k):
    """The native kernel does not run on this backend."""
    return None


def compiled_gathered(inputs, weights, k):
    """Nothing is compiled on this backend."""
    return None


def read_value(value):
    """The value as it is."""
    return value


def compile_layer_call(call):
    """Nothing is compiled on this backend."""
    return None


def compiled_selection(select, scores):
    """The training selection as it is."""
    return select(scores)
