"""Registers the ops that the C++ extension (``csrc/``) implements as the ``cpp`` backend."""
