"""Self-attention over long contexts on two cores (app/pair_attention.py): bit-identical to one call, in the lean
step and in whole generations, with errors reaching the caller, and on only where it can pay."""

import threading

import pytest
import torch
from torch.nn import functional as F

from app import debug_models, pair_attention, threads
from app.config import Settings
from app.model import Speedups
from app.pair_attention import MIN_KEYS, PairAttention
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen, with_speedups
from tests.test_lean_step import blocks, conditions, converted, decode


@pytest.fixture(autouse=True)
def one_thread():
    """The caller runs one torch thread, as a generation does where it shares the cores (app/threads.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cache(batch: int, keys: int, heads: int = 4, dim: int = 16, capacity: int = 1600) -> torch.Tensor:
    """The first `keys` steps of a static cache ("b h t d"), a view as the lean step reads it."""
    return torch.randn(batch, heads, capacity, dim).narrow(2, 0, keys)


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("keys", [MIN_KEYS, 1500])
def test_split_across_two_threads_is_bit_identical_to_one_call(batch, keys):
    q, k, v = torch.randn(batch, 4, 1, 16), cache(batch, keys), cache(batch, keys)
    with torch.inference_mode():
        assert torch.equal(PairAttention()(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_wanted_only_for_a_batch_to_split_over_a_long_context_on_one_thread():
    q = torch.randn(2, 4, 1, 16)
    assert PairAttention.wanted(q, cache(2, MIN_KEYS))
    assert not PairAttention.wanted(q, cache(2, MIN_KEYS - 1))
    assert not PairAttention.wanted(q[:1], cache(1, 2 * MIN_KEYS))
    torch.set_num_threads(2)  # torch's own threads split it
    assert not PairAttention.wanted(q, cache(2, 2 * MIN_KEYS))


def test_the_helper_takes_the_second_half(monkeypatch):
    """Quiet cores: the helper wakes within the caller's half (~1 ms here) and claims its job."""
    runners = []
    sdpa = F.scaled_dot_product_attention

    def recorded(*args):
        runners.append(threading.current_thread().name)
        return sdpa(*args)

    monkeypatch.setattr(pair_attention.F, "scaled_dot_product_attention", recorded)
    pair = PairAttention()
    q, k, v = torch.randn(2, 16, 1, 64), cache(2, 1500, 16, 64), cache(2, 1500, 16, 64)  # musicgen-small's heads
    for _ in range(50):
        pair(q, k, v)
    assert "pair-attention" in runners
    assert all(t.daemon for t in threading.enumerate() if t.name == "pair-attention")


def test_a_helper_that_never_gets_a_core_does_not_hold_the_step_up(monkeypatch):
    """Another process holding the second core: the caller, done with its half, takes the other one too."""
    monkeypatch.setattr(PairAttention, "_serve", lambda self: threading.Event().wait())
    q, k, v = torch.randn(2, 4, 1, 16), cache(2, MIN_KEYS), cache(2, MIN_KEYS)
    assert torch.equal(PairAttention()(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_an_error_in_the_second_half_reaches_the_caller_and_the_helper_goes_on(monkeypatch):
    q, k, v = torch.randn(2, 4, 1, 16), cache(2, MIN_KEYS), cache(2, MIN_KEYS)
    sdpa = F.scaled_dot_product_attention

    def fails_on_the_second_half(query, *args):
        if query.data_ptr() == q[1:].data_ptr():
            raise RuntimeError("second half failed")
        return sdpa(query, *args)

    pair = PairAttention()
    monkeypatch.setattr(pair_attention.F, "scaled_dot_product_attention", fails_on_the_second_half)
    with pytest.raises(RuntimeError, match="second half failed"):
        pair(q, k, v)
    monkeypatch.setattr(pair_attention.F, "scaled_dot_product_attention", sdpa)
    assert torch.equal(pair(q, k, v), sdpa(q, k, v))


def counting(monkeypatch) -> list:
    """Count the calls that split (through the shared helper)."""
    calls = []
    split = PairAttention.__call__

    def counted(self, q, k, v):
        calls.append(k.shape[2])
        return split(self, q, k, v)

    monkeypatch.setattr(PairAttention, "__call__", counted)
    return calls


@pytest.mark.parametrize("name", ["fp32", "int8-dynamic"])
def test_lean_step_logits_stay_bit_identical_past_the_threshold(name, monkeypatch):
    torch.manual_seed(0)
    built = debug_models.build_lm(**SMALL)
    (one, counts), (two, paired) = (converted(built, name, True, pair_attention=pair) for pair in (False, True))
    assert (counts["pair_attention"], paired["pair_attention"]) == (0, len(two.transformer.layers))
    calls = counting(monkeypatch)
    decode([one, two], blocks(one.card, MIN_KEYS - 2, 6), [conditions(one)] * 7)
    # A prompt of MIN_KEYS - 2 steps, then 6 single steps over MIN_KEYS - 1 to MIN_KEYS + 4 keys: from MIN_KEYS on,
    # every layer's self-attention splits.
    assert calls == [keys for keys in range(MIN_KEYS, MIN_KEYS + 5) for _ in two.transformer.layers]


def test_greedy_generation_gives_the_same_tokens(monkeypatch):
    stock = musicgen(SMALL)
    one = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True)
    two = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True, pair_attention=True)
    calls = counting(monkeypatch)
    duration = (MIN_KEYS + 50) / stock.frame_rate  # past the threshold
    assert torch.equal(greedy_tokens(two, duration), greedy_tokens(one, duration))
    assert calls  # it did split


def test_on_by_default_only_where_a_generation_may_run_one_thread_and_a_second_core_exists():
    assert Settings().parallel_attention is True
    assert Settings.from_env({"MUSICGEN_PARALLEL_ATTENTION": "0"}).parallel_attention is False
    two_cores = threads.available_cores() >= 2
    assert Speedups.from_settings(Settings()).parallel_attention is two_cores  # one thread while the cores are shared
    assert Speedups.from_settings(Settings(cpu_threads=1)).parallel_attention is two_cores
    assert Speedups.from_settings(Settings(cpu_threads=2)).parallel_attention is False  # torch's threads split it
    assert Speedups.from_settings(Settings(parallel_attention=False)).parallel_attention is False
    assert Speedups().parallel_attention is False  # stock audiocraft unless asked
