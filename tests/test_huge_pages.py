"""Huge pages (app/huge_pages.py) for the int8 kernel's weights and each generation's key/value cache, on real
audiocraft: where they land (the kernel's own account, /proc/self/smaps), that nothing changes, and the fallback."""

import re
from pathlib import Path

import pytest
import torch

from app import fast_lm, huge_pages, int8_kernel, precision
from app.fast_lm import Int8Linear
from tests.helpers import built_kernels
from tests.test_fast_lm import greedy_tokens, musicgen

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_bytes(tensor: torch.Tensor) -> int:
    """Bytes of transparent huge pages in the mapping that holds `tensor`'s first byte (/proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        header = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if header:
            inside = int(header[1], 16) <= address < int(header[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.fixture(scope="module")
def thp():
    """Skipped where the kernel gives no huge pages to memory that asks for them (THP `never`, or not Linux)."""
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("this kernel gives no transparent huge pages")


def test_an_arena_carves_aligned_tensors_out_of_one_huge_page_mapping(thp):
    arena = huge_pages.Arena(expected=3)
    tensors = [arena.empty((2, 3, 1000, 64), torch.float16) for _ in range(3)]
    starts = [t.data_ptr() for t in tensors]
    assert starts[0] % huge_pages.PAGE == 0 and all(s % huge_pages.ALIGN == 0 for s in starts)
    assert starts[1] - starts[0] == starts[2] - starts[1] == 2 * 3 * 1000 * 64 * 2  # side by side, no overlap
    for i, t in enumerate(tensors):
        t.fill_(i)
    assert [float(t.float().mean()) for t in tensors] == [0.0, 1.0, 2.0]
    assert huge_bytes(tensors[0]) >= huge_pages.PAGE
    more = arena.empty((huge_pages.PAGE,), torch.uint8)  # past the first mapping: a new one
    assert more.data_ptr() % huge_pages.PAGE == 0 and not starts[0] <= more.data_ptr() <= starts[2]


def test_a_mapping_lives_while_any_tensor_carved_from_it_does(thp):
    arena = huge_pages.Arena()
    tensor = arena.empty((1000,), torch.float32).fill_(7)
    del arena
    assert float(tensor.sum()) == 7000.0


def test_gathered_copies_are_equal_and_side_by_side(thp):
    tensors = [torch.randint(-127, 127, (n, 64), dtype=torch.int8) for n in (1000, 33, 4096)]
    copies = huge_pages.gather(tensors)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(tensors, copies, strict=True))
    assert copies[1].data_ptr() - copies[0].data_ptr() == 1000 * 64
    assert huge_bytes(copies[0]) >= huge_pages.PAGE


def test_without_huge_pages_tensors_come_from_torch(monkeypatch):
    monkeypatch.setattr(huge_pages, "_mapping", lambda size: None)
    t = huge_pages.Arena(expected=4).empty((3, 5), torch.float16)
    assert t.shape == (3, 5) and t.dtype == torch.float16
    original = [torch.ones(4)]
    assert huge_pages.gather(original)[0] is original[0]


@pytest.fixture(scope="module")
def kernels():
    return built_kernels("the int8 products run on fbgemm, whose weights stay where it packs them",
                         int8_kernel.load)


def int8_musicgen(in_huge_pages: bool = True):
    mg = musicgen()
    precision.apply(mg.lm, "int8-dynamic", "cpu")
    counts = fast_lm.install(mg.lm, cross_kv_cache=True, static_kv_cache=True, int8_weights=True,
                             in_huge_pages=in_huge_pages)
    return mg, counts


def test_the_int8_kernels_weights_and_each_generations_caches_are_in_huge_pages(thp, kernels):
    """Every weight of the int8 kernel moves (counted); each window of a generation takes its caches from one
    huge-page mapping, gone with the call; the greedy tokens are those of the same LM without huge pages."""
    mg, counts = int8_musicgen()
    weights = [m for m in mg.lm.modules() if isinstance(m, Int8Linear)]
    assert counts["huge_pages"] == len(weights) == counts["packed_weights"] > 0
    assert all(huge_bytes(m.packed) >= huge_pages.PAGE for m in weights)

    caches = []  # per step: the huge page bytes of layer 0's key cache's mapping, and whether layer 1's shares it
    first, second = (layer.self_attn for layer in mg.lm.transformer.layers[:2])

    def look(*_):
        keys = first._streaming_state["static_k"]
        caches.append((huge_bytes(keys), 0 < second._streaming_state["static_k"].data_ptr() - keys.data_ptr()
                       < huge_pages.PAGE))
    mg.set_custom_progress_callback(look)
    tokens = greedy_tokens(mg, 2.0, max_duration=1.0, progress=True)  # windows: one generate call each
    assert len(caches) > 50 and all(huge >= huge_pages.PAGE and shared for huge, shared in caches)
    assert first.static_arena is None  # the arena went with the call

    plain, counts = int8_musicgen(in_huge_pages=False)
    assert counts["huge_pages"] == 0
    assert torch.equal(greedy_tokens(plain, 2.0, max_duration=1.0), tokens)
    # (Where the plain LM's weights land is torch's and the kernel's affair: under THP `always`, CI's, large blocks of
    # torch's get huge pages too, and even under `madvise` a fresh clone's run once found them in a mapping that had.)


def test_a_cache_made_outside_a_generation_is_in_huge_pages_too(thp, kernels):
    """Stepping the LM directly (as the benchmark does): each layer's keys and values share a mapping of their own."""
    mg, _ = int8_musicgen()
    conditions = {"description": (torch.randn(2, 1, 16), torch.ones(2, 1))}
    attention = mg.lm.transformer.layers[0].self_attn
    with torch.inference_mode(), mg.lm.streaming():
        mg.lm(torch.zeros(2, 4, 5, dtype=torch.long), [], condition_tensors=conditions)
        keys, values = attention._streaming_state["static_k"], attention._streaming_state["static_v"]
        assert huge_bytes(keys) >= huge_pages.PAGE and keys.data_ptr() % huge_pages.PAGE == 0
        assert values.data_ptr() - keys.data_ptr() == keys.numel() * keys.element_size()
