"""Short scripts a user copies.

Run from the repository root as `python -m examples.<name>`.
"""
