"""CPU tensors in transparent huge pages: what a decoding step streams through, in 2 MB pages instead of 4 kB.

A step at musicgen-small size reads ~340 MB of int8 weights and, over a 30 s clip's context, up to ~290 MB of
fp16 keys and values, in runs of a few kB scattered over that span: with 4 kB pages nearly every run costs a page
walk. In 2 MB pages (the kernel's transparent huge pages, asked for with `madvise(MADV_HUGEPAGE)` on memory mapped
here, 2 MB-aligned, before anything touches it) a step ran 3-9 % faster (paired, musicgen-small's size, two
threads, 250-1400 steps of context: the cache alone 3-8 %, with the weights 5-9 %). The numbers do not change.

torch's own allocator can be told to do this for every block of 2 MB or more (THP_MEM_ALLOC_ENABLE), but that
includes the EnCodec decoder's large short-lived blocks, which then fault in 2 MB at a time (README, "What was
tried"). Here only long-lived tensors, or a generation's cache, are placed in huge pages. Where the platform has
no `MADV_HUGEPAGE`, or the kernel refuses it, tensors come from torch's allocator as before; where THP is set to
`never` the mapping keeps 4 kB pages.
"""

import math
import mmap
import typing as tp

import torch

PAGE = 2 << 20  # bytes in a huge page (x86-64)
ALIGN = 64  # each tensor in a mapping starts on a cache line


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _mapping(size: int) -> tp.Optional[torch.Tensor]:
    """`size` bytes (rounded up to whole huge pages) of fresh anonymous memory starting on a huge page, as a uint8
    tensor that keeps the mapping alive; None where huge pages cannot be asked for."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return None
    size = _round_up(size, PAGE)
    memory = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # + PAGE: room to align
    try:
        memory.madvise(advice)
    except OSError:  # a kernel built without THP
        memory.close()
        return None
    whole = torch.frombuffer(memory, dtype=torch.uint8)
    start = -whole.data_ptr() % PAGE
    return whole[start:start + size]


def _carve(mapping: torch.Tensor, offset: int, shape: tp.Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    size = math.prod(shape) * dtype.itemsize
    return mapping[offset:offset + size].view(dtype).view(shape)


class Arena:
    """Tensors carved one after another out of huge-page mappings.

    The first mapping holds `expected` times the first size asked for (a generation's caches: one per layer for
    keys and one for values, all alike, and int8 ones' scales, a fraction of them), later ones whatever is asked.
    A mapping is unmapped once the arena and every tensor carved from it are gone. Without huge pages, `empty` is
    `torch.empty`.
    """

    def __init__(self, expected: float = 1, size: int = 0):
        self.expected = max(1.0, expected)
        self.mapping: tp.Optional[torch.Tensor] = _mapping(size) if size else None  # `size` bytes: mapped now
        self.used = 0

    def empty(self, shape: tp.Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        size = _round_up(math.prod(shape) * dtype.itemsize, ALIGN)
        if self.mapping is None or self.used + size > self.mapping.numel():
            mapping = _mapping(math.ceil(size * (self.expected if self.mapping is None else 1)))
            if mapping is None:
                return torch.empty(shape, dtype=dtype)
            self.mapping, self.used = mapping, 0
        tensor = _carve(self.mapping, self.used, shape, dtype)
        self.used += size
        return tensor


def gather(tensors: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
    """Copies of `tensors` (contiguous, on the CPU) side by side in one huge-page mapping; the tensors themselves
    where huge pages cannot be asked for."""
    if not tensors:
        return []
    arena = Arena(size=sum(_round_up(t.numel() * t.element_size(), ALIGN) for t in tensors))
    if arena.mapping is None:
        return list(tensors)
    return [arena.empty(t.shape, t.dtype).copy_(t) for t in tensors]
