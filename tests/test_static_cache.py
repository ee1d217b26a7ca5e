"""The static (pre-allocated) self-attention key/value cache: same tokens as stock, sized once."""

import pytest
import torch

from app import fast_lm
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen, with_speedups


@pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
@pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
def test_static_cache_gives_stock_tokens(sizes, max_duration):
    stock = musicgen(sizes)
    fast = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True)
    expected = greedy_tokens(stock, 2.0, max_duration)
    assert torch.equal(greedy_tokens(fast, 2.0, max_duration), expected)


def test_buffer_is_allocated_once_for_the_whole_sequence():
    fast = with_speedups(musicgen(), cross_kv_cache=False, static_kv_cache=True)
    attention = fast.lm.transformer.layers[0].self_attn
    seen = []  # (buffer address, buffer length, filled length) after every decoding step
    fast.set_custom_progress_callback(lambda *_: seen.append((
        attention._streaming_state["static_k"].data_ptr(), attention._streaming_state["static_k"].shape[1],
        int(attention._streaming_state["static_length"]))))
    greedy_tokens(fast, 1.0, progress=True)
    steps = fast.lm.pattern_provider.get_pattern(int(fast.frame_rate)).num_sequence_steps
    assert attention.static_capacity == steps
    assert {(address, length) for address, length, _ in seen} == {(seen[0][0], steps)}  # time is dim 1 here
    assert [filled for *_, filled in seen] == list(range(steps - len(seen) + 1, steps + 1))


def test_cache_grows_past_its_capacity_with_stock_logits():
    stock = musicgen().lm
    fast = with_speedups(musicgen(), cross_kv_cache=False, static_kv_cache=True).lm
    for module in fast.modules():
        if hasattr(module, "static_capacity"):
            module.static_capacity = 3  # far less than the steps below: the buffer must grow, keeping its content
    torch.manual_seed(0)
    tokens = torch.randint(0, stock.card, (1, stock.num_codebooks, 12))
    conditions = {"description": (torch.randn(1, 1, 16), torch.ones(1, 1))}
    with torch.inference_mode(), stock.streaming(), fast.streaming():
        for start, stop in ((0, 5), (5, 6), (6, 12)):  # a prompt, then single steps, then a block
            chunk = tokens[..., start:stop]
            assert torch.equal(fast(chunk, [], condition_tensors=conditions),
                               stock(chunk, [], condition_tensors=conditions))
    assert fast_lm.GROWTH > 1
