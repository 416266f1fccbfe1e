"""Which backends the op tests parametrize over on this machine."""
import torch

from vpns_fast.ops import backend_report

# Interpreted Triton costs ~0.1 s a call on the CPU: those tests get a reduced matrix.
INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()


def backends_for(op: str) -> list[str]:
    """Every backend that implements ``op`` and can run on CPU tensors here."""
    return [name for name, r in backend_report().items() if op in r["ops"] and r["devices"]["cpu"]["available"]]
