"""Kernels of vpns_fast, installed as ``vpns_fast.kernels``.

Each file holds one idea: its plain-PyTorch reference (``<op>_ref``, the definition of
correct), then its accelerated kernels and launchers as they are added. Kernels know nothing
of training: they take tensors and return tensors.
"""
