"""The fp16 self-attention cache (MUSICGEN_HALF_KV_CACHE) and its kernel (app/half_attention.py): built here for
real, torch's attention over the same fp16 values, and whole generations close to the fp32 cache's."""

import copy

import pytest
import torch
from torch.nn import functional as F

from app import debug_models, fast_lm, half_attention
from app import precision as precision_module
from app.config import Settings
from app.model import Speedups
from tests.helpers import built_kernels
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen, next_token_distributions, with_speedups


@pytest.fixture(scope="module")
def kernel():
    return built_kernels("the cache stays fp32", half_attention.load)


# Keys in blocks of 16 (their scores summed in one register) and a tail of fewer: none, some, only a tail.
@pytest.mark.parametrize("depth,keys", [(64, 1), (64, 7), (64, 16), (64, 17), (64, 300), (64, 1400), (16, 5),
                                        (32, 40), (128, 3), (256, 33)])
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["plain", "peaked"])  # peaked: most weights underflow to 0
def test_it_attends_as_torch_does_over_the_same_values(kernel, depth, keys, spread):
    generator = torch.Generator().manual_seed(depth + keys)
    q = torch.randn(2, 4, 1, depth, generator=generator) * spread
    # A cache with room to spare, read through the view a step reads (`narrow`): strided over the spare rows.
    cache_k = (torch.randn(2, 4, keys + 9, depth, generator=generator) * 2).half()
    cache_v = torch.randn(2, 4, keys + 9, depth, generator=generator).half()
    k, v = cache_k.narrow(2, 0, keys), cache_v.narrow(2, 0, keys)
    torch_fp32 = F.scaled_dot_product_attention(q, k.float(), v.float())
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    got = half_attention.attend(q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), k, v)  # a strided query
    assert got.shape == torch_fp32.shape and got.dtype == torch.float32
    # As close to the exact result as torch's own fp32 attention, within rounding: peaked scores (hundreds) carry
    # absolute rounding errors of ~1e-5 into the weights in either.
    error, torch_error = (float((x.double() - exact).abs().max()) for x in (got, torch_fp32))
    assert error <= 2e-6 + 4 * torch_error, (error, torch_error)


def test_it_refuses_what_it_cannot_take(kernel):
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 3, 8).half()
    assert not half_attention.fits(8) and half_attention.fits(64) and not half_attention.fits(272)
    with pytest.raises(RuntimeError, match="depth a multiple of 16"):
        half_attention.attend(q, k, k)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 3, 16).half()
    with pytest.raises(RuntimeError, match="attend: shapes"):
        half_attention.attend(q, k, k[:, :, :2])
    with pytest.raises(RuntimeError, match="half, or int8 with scales"):
        half_attention.attend(q, k.float(), k.float())
    with pytest.raises(RuntimeError, match="float query"):
        half_attention.attend(q.half(), k, k)


def test_keys_and_values_beyond_fp16s_range_saturate_instead_of_poisoning_the_head(kernel):
    x = torch.tensor([[1e6, -1e6, 3.0, 0.5]])
    half, full = torch.zeros(2, 4, dtype=torch.float16), torch.zeros(2, 4)
    half_attention.store(half[:1], x)
    half_attention.store(full[1:], x)
    assert half[0].tolist() == [65504.0, -65504.0, 3.0, 0.5] and torch.equal(full[1], x[0])  # fp32: as it is
    q, kv = torch.ones(1, 1, 1, 16), torch.full((1, 1, 3, 16), 1e6).half()
    assert not torch.isfinite(kv).all()  # what a plain cast would store
    half_attention.store(kv, torch.full((1, 1, 3, 16), 1e6))
    assert torch.isfinite(half_attention.attend(q, kv, kv)).all()


def _cache_dtypes(mg) -> set:
    return {m._streaming_state["static_k"].dtype for m in mg.lm.modules()
            if "static_k" in getattr(m, "_streaming_state", {})}


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_next_tokens_stay_close_to_the_fp32_caches(kernel, precision):
    stock = musicgen(SMALL)  # heads of 16: the kernel's smallest
    precision_module.apply(stock.lm, precision, "cpu")
    full, half = copy.deepcopy(stock), copy.deepcopy(stock)
    int8 = precision == "int8-dynamic"
    assert fast_lm.install(full.lm, True, True, int8_weights=int8)["half_kv_cache"] == 0
    counts = fast_lm.install(half.lm, True, True, int8_weights=int8, half_kv_cache=True)
    assert counts["half_kv_cache"] == len(stock.lm.transformer.layers)
    plans = [layer.lean_plan for layer in half.lm.transformer.layers]
    assert all(p.self_attention.half and p.self_attention.pair is None for p in plans)
    reference = next_token_distributions(full)
    logp = next_token_distributions(half)
    kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
    assert abs(kl) < 1e-4, kl
    assert not torch.equal(reference, logp)  # not the same numbers: the fp16 cache and its kernel did run
    assert float((reference.argmax(-1) == logp.argmax(-1)).float().mean()) > 0.95


def test_whole_generations_with_a_prompt_and_windows(kernel):
    """Past the window (each window re-reads the last as a prompt: the stock forward over the fp16 cache), with
    the cache grown mid-generation: finite tokens, the caches in fp16, and greedy tokens mostly the fp32 cache's."""
    stock = musicgen(SMALL)
    full = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True)
    half = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True, half_kv_cache=True)
    expected = greedy_tokens(full, 2.0, max_duration=1.0)
    seen = []
    layer = half.lm.transformer.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(_cache_dtypes(half)))
    try:
        got = greedy_tokens(half, 2.0, max_duration=1.0)
    finally:
        handle.remove()
    assert seen and {torch.float16} == set().union(*seen)  # every window, prompts included, on the fp16 cache
    assert got.shape == expected.shape
    assert float((got == expected).float().mean()) > 0.9


def test_only_heads_it_takes_and_the_setting():
    debug = copy.deepcopy(debug_models.build_lm())  # heads of 4 floats, and audiocraft's einsum path
    assert fast_lm.install(debug, True, True, half_kv_cache=True)["half_kv_cache"] == 0
    assert Settings().half_kv_cache is True
    assert Settings.from_env({"MUSICGEN_HALF_KV_CACHE": "0"}).half_kv_cache is False
    assert Speedups.from_settings(Settings()).half_kv_cache is True
    assert Speedups().half_kv_cache is False and Speedups(half_kv_cache=True).on_cpu_only


def test_the_cache_is_fp16_during_a_generation(kernel):
    half = with_speedups(musicgen(SMALL), cross_kv_cache=True, static_kv_cache=True, half_kv_cache=True)
    seen = []
    layer = half.lm.transformer.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(_cache_dtypes(half)))
    try:
        greedy_tokens(half, 0.5)
    finally:
        handle.remove()
    assert seen and {torch.float16} == set().union(*seen)
