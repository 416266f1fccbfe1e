"""The benchmark cases by name. Each module has NAME, OP_NAME, DESCRIPTION, ``configs(device,
sizes, dtypes)`` and the shared setup factory ``setup(config, device, compile_baselines=...)``."""
from bench.cases import conv, infer, masked, prompt, slim, sparse_isa, threshold, train_step

CASES = {module.NAME: module for module in (threshold, prompt, masked, conv, train_step, infer, slim, sparse_isa)}
