"""Tensors whose last byte is the last one before an inaccessible page (Linux): a kernel that reads even one float
past its input then crashes instead of reading a neighbour's memory unnoticed. Tests run the kernels on such
tensors in a child process, so that a crash fails the one test."""
import ctypes
import mmap

import torch

PAGE = mmap.PAGESIZE


def before_a_guard_page(values: torch.Tensor) -> tuple[torch.Tensor, mmap.mmap]:
    """A contiguous copy of ``values`` ending where a PROT_NONE page begins, and the mapping that holds it (keep it
    alive while the tensor is used)."""
    nbytes = values.numel() * values.element_size()
    pages = (nbytes + PAGE - 1) // PAGE
    mapping = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(base + pages * PAGE, PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    guarded = torch.frombuffer(mapping, dtype=values.dtype, count=values.numel(),
                               offset=pages * PAGE - nbytes).view(values.shape)
    guarded.copy_(values)
    assert guarded.data_ptr() + nbytes == base + pages * PAGE
    return guarded, mapping
