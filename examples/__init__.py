"""Short, standalone scripts a user copies.

Each imports only `keras_midl`, Keras, NumPy, the standard library and
public libraries (scikit-learn, TensorFlow Datasets). Run one as
`python examples/<name>.py`, or from the repository root as
`python -m examples.<name>`.
"""
