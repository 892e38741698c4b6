"""keras_midl: the Matrix-Interpolated Dropout Layer (MID-L) for Keras 3.

`import keras_midl` gives the layer and the modules that need only Keras
and NumPy (`flops`, `selection`, `inspection`, `analysis`, `distribution`).
`keras_midl.tuning` (keras-tuner) and `keras_midl.plotting` (matplotlib)
are imported explicitly, as their dependencies are optional.
"""

from keras_midl import analysis
from keras_midl import callbacks
from keras_midl import config
from keras_midl import distribution
from keras_midl import flops
from keras_midl import ops
from keras_midl.convert import convert
from keras_midl.inspection import GateStatistics
from keras_midl.inspection import gate_statistics
from keras_midl.midl import MIDL
from keras_midl.midl_conv2d import MIDLConv2D

__version__ = "0.1.0"

__all__ = [
    "MIDL",
    "MIDLConv2D",
    "convert",
    "GateStatistics",
    "gate_statistics",
    "analysis",
    "callbacks",
    "distribution",
    "flops",
    "config",
    "ops",
    "__version__",
]
