"""MIDL's ops, written with `keras.ops` only.

* `keras_midl.ops.selection`: the top-k mask and the straight-through
  estimators (`topk_mask`, `straight_through`, `straight_through_mix`).
* `keras_midl.ops.gathered`: the gathered inference path, the full path of
  the selected neurons only.
* `keras_midl.ops.gathered_conv`: the gathered inference path of
  `MIDLConv2D`, each example convolved with its selected filters only.
* `keras_midl.ops.dispatch`: which inference path a layer takes, and
  where the native kernel runs.
"""

from keras_midl.ops import dispatch
from keras_midl.ops import gathered
from keras_midl.ops import gathered_conv
from keras_midl.ops import selection
from keras_midl.ops.selection import kth_largest
from keras_midl.ops.selection import straight_through
from keras_midl.ops.selection import straight_through_mix
from keras_midl.ops.selection import topk_mask

__all__ = [
    "dispatch",
    "gathered",
    "gathered_conv",
    "kth_largest",
    "selection",
    "straight_through",
    "straight_through_mix",
    "topk_mask",
]
