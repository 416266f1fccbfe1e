"""What this process runs on: versions, devices, threads and the backends with their status.
One description for `vpns info` and for the `env` block of every results.json."""
from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vpns_fast import ops
from vpns_fast._version import __version__


def _cpuinfo_field(name: str) -> str | None:
    """The first processor's ``name`` field in /proc/cpuinfo (Linux), None where there is none to read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), for measurements read later on another machine."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_vendor() -> str:
    """The processor's vendor as the CPU names itself ("GenuineIntel", "AuthenticAMD"; Linux: /proc/cpuinfo), ""
    where it cannot be read: for engine defaults measured on one vendor's CPUs and not the other's."""
    return _cpuinfo_field("vendor_id") or ""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the machine ran out of memory (Python's MemoryError, torch's CPU allocator or
    CUDA's out-of-memory error), a limit of the machine and not a fault of the input."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def available_memory_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (``MemAvailable`` in /proc/meminfo, Linux);
    None where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_text(size_bytes: float) -> str:
    """``size_bytes`` for a message: GiB with one decimal from 1 GiB, whole MiB below (a refusal had read "about
    0.0 GiB; 0.0 GiB are available")."""
    return f"{size_bytes / 2**30:.1f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of the leaf modules' tensors in one forward."""

    outputs: int  # every leaf's output, summed: what a forward with autograd on holds until it ends
    largest_layer: int  # the largest input + output of one leaf: what a forward without autograd holds at least


def layer_bytes(module: torch.nn.Module, forward: Callable[[], object]) -> LayerBytes:
    """:class:`LayerBytes` of ``module``'s leaf modules in ``forward()`` (a call that runs ``module``), counted by
    forward hooks and run without autograd; the hooks are removed after. One count for every memory estimate:
    ``vpns_fast.deploy``'s batch sizes and the FLOP count of ``density_report``."""
    outputs = largest = 0

    def record(leaf, inputs, output):
        nonlocal outputs, largest
        tensors = {t.untyped_storage().data_ptr(): t for t in inputs if isinstance(t, torch.Tensor)}
        read = sum(t.numel() * t.element_size() for t in tensors.values())
        written = 0  # an in-place op's or a view's output is its input's memory, not more (ResNet's ReLUs)
        if isinstance(output, torch.Tensor) and output.untyped_storage().data_ptr() not in tensors:
            written = output.numel() * output.element_size()
        outputs += written
        largest = max(largest, read + written)

    handles = [m.register_forward_hook(record) for m in module.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return LayerBytes(outputs, largest)


def describe() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"unavailable ({exc.__class__.__name__})"
    return {
        "vpns_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "forced_backend": ops.forced_backend(),
        "backends": ops.backend_report(),
    }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU thread count set to ``threads`` (None: left as it is) inside the block and given back after it,
    whatever the block did: a command or benchmark run inside a process that goes on (tests, notebooks) leaves
    that process's count as it found it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without it is a clear error."""
    if not isinstance(name, (str, torch.device)):
        # deploy(model, example) reached torch.device(tensor), whose TypeError listed torch.device's overloads
        hint = (" (an example input? pass its shape as example_input_size=tuple(x.shape))"
                if isinstance(name, torch.Tensor) else "")
        raise TypeError(f"device: expected auto, cpu, cuda or cuda:N (a str or torch.device), got "
                        f"{type(name).__name__}{hint}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # mps, xpu, meta: no engine of the package runs there
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {str(name)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for but CUDA is not available")
    return device
