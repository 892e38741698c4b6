"""keras_midl: the Matrix-Interpolated Dropout Layer (MID-L) for Keras 3."""

from keras_midl import selection
from keras_midl.inspection import GateStatistics
from keras_midl.inspection import gate_statistics
from keras_midl.midl import MIDL

__version__ = "0.1.0"

__all__ = [
    "MIDL",
    "GateStatistics",
    "gate_statistics",
    "selection",
    "__version__",
]
