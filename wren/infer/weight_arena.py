"""One contiguous, huge-page-backed block of memory for a model's weights on the CPU.

A CPU decode step streams every weight from memory once, so its speed is the memory bandwidth the
reads achieve. Loaded normally, each weight is its own allocation in 4 KiB pages: streaming a
100 MB model then walks about 25,000 page-table entries per token, and a TLB miss stalls the
stream at each one. Copied end to end into one block that the kernel backs with 2 MiB pages
(`MADV_HUGEPAGE`; transparent huge pages in "madvise" mode, the common default), the same reads
touch about 50 pages, and the small preset's compiled decode step got about a fifth faster
(benchmarks/RESULTS.md). Where huge pages cannot be asked for, the weights are left as they are.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line


def huge_pages_supported() -> bool:
    """Whether this system lets a process ask for transparent huge pages (Linux built with them)."""
    return (
        hasattr(mmap, "MADV_HUGEPAGE")
        and hasattr(mmap, "MAP_ANONYMOUS")
        and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    )


def pack_weights(model: nn.Module) -> bool:
    """Move the CPU model's parameters and buffers, in module order, into one huge-page block.

    Values, sharing (tied weights) and shapes are unchanged; only where the bytes live changes.
    Returns False, changing nothing, where huge pages cannot be requested or the model is not on
    the CPU, or already packed (its tensors are views of one block, which `_packable` leaves
    alone): a second engine over the same model copies nothing. For inference: training
    afterwards works, but gains nothing from it.
    """
    tensors = _packable(model)
    if not tensors or not huge_pages_supported():
        return False
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
    # Private, not shared: transparent huge pages apply to private anonymous memory.
    block = mmap.mmap(-1, offsets[-1] + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(block, dtype=torch.uint8)  # keeps `block` alive as long as any view
    start = -raw.data_ptr() % HUGE_PAGE  # huge pages cover only 2 MiB-aligned ranges
    with torch.no_grad():
        for tensor, offset, size in zip(tensors, offsets, sizes, strict=False):
            place = raw[start + offset : start + offset + size].view(tensor.dtype).view(tensor.shape)
            place.copy_(tensor)
            tensor.data = place
    return True


def _packable(model: nn.Module) -> list[torch.Tensor]:
    """Every distinct CPU tensor of the model that owns its whole storage, in module order."""
    seen: set[int] = set()
    tensors = []
    for module in model.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                continue  # a tied weight: moving it once moves every module's reference
            seen.add(storage.data_ptr())
            # A view of a larger storage, or a strided tensor, stays put: moving only it would
            # break the sharing, and it is rare in a loaded model.
            whole = tensor.is_contiguous() and tensor.numel() * tensor.element_size() == storage.nbytes()
            if whole and tensor.storage_offset() == 0:
                tensors.append(tensor)
    return tensors
