"""The int8 self-attention cache (MUSICGEN_INT8_KV_CACHE, app/int8_kv_cache.py) and its kernel, built here for real:
its rows and scales, torch's attention over the numbers it holds, the C++ writes equal to Python's, huge pages, and
whole generations close to the fp32 cache's."""

import copy

import pytest
import torch
from torch.nn import functional as F

from app import fast_lm, half_attention, huge_pages, int8_kv_cache
from app import precision as precision_module
from app.config import Settings
from app.model import Speedups
from tests.helpers import built_kernels
from tests.test_fast_lm import SMALL, drift, greedy_tokens, musicgen, next_token_distributions, sharpened
from tests.test_huge_pages import THP, huge_bytes


@pytest.fixture(scope="module")
def kernel():
    return built_kernels("the cache stays fp16 or fp32", half_attention.load)


def test_rows_are_their_nearest_multiples_of_their_own_scale():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [1e6, -3.0, 2.0, 1.0], [3.0, 1.5, -3.0, 0.01]])
    numbers, scales = int8_kv_cache.quantize(x)
    assert numbers.dtype == torch.int8 and scales.shape == (4,)
    assert numbers[0].tolist() == [127, -64, 32, 0] and float(scales[0]) == pytest.approx(1 / 127)  # -63.5: even
    assert numbers[1].tolist() == [0, 0, 0, 0] and float(scales[1]) == 0.0  # a row of zeros: no division by 0
    assert float(scales[2]) == pytest.approx(half_attention.LIMIT / 127)  # saturated at fp16's range, as that cache
    assert numbers[3].abs().max() == 127 and numbers[3].tolist()[3] == 0
    back = int8_kv_cache.dequantize(numbers, scales)
    inside = x.clamp(-half_attention.LIMIT, half_attention.LIMIT)
    assert ((back - inside).abs() <= scales[:, None] / 2 + 1e-7).all()  # within half a step of each row's scale


# Keys in blocks of 16 (their scores summed in one register) and a tail of fewer: none, some, only a tail.
@pytest.mark.parametrize("depth,keys", [(64, 1), (64, 7), (64, 16), (64, 17), (64, 300), (64, 1400), (16, 5),
                                        (128, 3), (256, 33)])
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["plain", "peaked"])
def test_it_attends_as_torch_does_over_the_numbers_the_cache_holds(kernel, depth, keys, spread):
    generator = torch.Generator().manual_seed(depth + keys)
    q = torch.randn(2, 4, 1, depth, generator=generator) * spread
    rows = [torch.randn(2, 4, keys + 9, depth, generator=generator) * scale for scale in (2.0, 1.0)]
    cache = [torch.full(r.shape, 99, dtype=torch.int8) for r in rows]  # room to spare: a strided view, as a step
    scales = [torch.full(r.shape[:-1], float("nan")) for r in rows]
    for c, s, r in zip(cache, scales, rows, strict=True):
        int8_kv_cache.store(c.narrow(2, 0, keys), s.narrow(2, 0, keys), r[:, :, :keys])
    (k, v), (ks, vs) = ([t.narrow(2, 0, keys) for t in pair] for pair in (cache, scales))
    held = [int8_kv_cache.dequantize(k, ks), int8_kv_cache.dequantize(v, vs)]
    torch_fp32 = F.scaled_dot_product_attention(q, *held)
    exact = F.scaled_dot_product_attention(q.double(), *(h.double() for h in held))
    got = int8_kv_cache.attend(q, k, ks, v, vs)
    assert got.shape == torch_fp32.shape and got.dtype == torch.float32
    error, torch_error = (float((x.double() - exact).abs().max()) for x in (got, torch_fp32))
    assert error <= 2e-6 + 4 * torch_error, (error, torch_error)
    # And near the attention over the rows themselves: ~1 % with plain scores, int8's rounding. (Scores of hundreds,
    # `peaked`, turn the rounding of a key into a different winner: what that does in a model, the drift tests say.)
    truth = F.scaled_dot_product_attention(q.double(), *(r[:, :, :keys].double() for r in rows))
    assert spread > 1 or float((got.double() - truth).norm() / truth.norm()) < 0.03


def test_it_refuses_what_it_cannot_take(kernel):
    q, k = torch.randn(1, 1, 1, 16), torch.zeros(1, 1, 3, 16, dtype=torch.int8)
    scales = torch.ones(1, 1, 3)
    assert int8_kv_cache.attend(q, k, scales, k, scales).shape == (1, 1, 1, 16)
    with pytest.raises(RuntimeError, match="an int8 cache needs its scales"):
        half_attention.attend(q, k, k)
    with pytest.raises(RuntimeError, match="an int8 cache needs its scales"):
        int8_kv_cache.attend(q, k, scales[..., :2], k, scales[..., :2])
    with pytest.raises(RuntimeError, match="keys and values alike"):
        int8_kv_cache.attend(q, k, scales, k.half(), None)


def int8_cache_musicgen(stock, int8_cache: bool = True, precision: str = "int8-dynamic"):
    mg = copy.deepcopy(stock)
    precision_module.apply(mg.lm, precision, "cpu")
    counts = fast_lm.install(mg.lm, True, True, int8_weights=precision == "int8-dynamic", half_kv_cache=True,
                             int8_kv_cache=int8_cache)
    return mg, counts


def _state(mg, layer: int = 1) -> dict:
    return mg.lm.transformer.layers[layer].self_attn._streaming_state


def test_the_kernels_write_is_torchs_bit_for_bit(kernel):
    """`write` (the kernel's `store_int8`, what every steady step runs) and `store` (torch's operators, a prompt's
    rows) give the same numbers and scales: rows of all sizes, a row of zeros, one beyond fp16's range, ties."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(2, 1, 3, 4, 64, generator=generator) * torch.tensor([1e-3, 1.0, 50.0]).view(1, 1, 3, 1, 1)
    rows[0, 0, 1, 2] = 0.0
    rows[1, 0, 2, 3, 5] = 1e6
    rows[1, 0, 0, 1] = torch.cat([torch.tensor([127.0]), torch.arange(63) - 30.5])  # scale 1, 63 ties
    for part in range(3):  # a step's projection's views: batch rows apart, each row's heads side by side
        x = rows[:, :, part].permute(0, 2, 1, 3)  # [b, h, 1, d]
        cache, scales = torch.zeros(2, 4, 5, 64, dtype=torch.int8), torch.zeros(2, 4, 5)
        int8_kv_cache.write(cache, scales, 3, x)
        expected, expected_scales = torch.zeros_like(cache), torch.zeros_like(scales)
        int8_kv_cache.store(expected.narrow(2, 3, 1), expected_scales.narrow(2, 3, 1), x)
        assert torch.equal(cache, expected) and torch.equal(scales, expected_scales)
    with pytest.raises(RuntimeError, match="at a position inside"):
        int8_kv_cache.write(cache, scales, 5, x)


def test_the_whole_layer_step_writes_the_rows_python_would(kernel):
    """The whole-layer step quantizes the new key and value in C++ (`store_int8`): the int8 numbers and scales of
    the rows its own products give, as `quantize` makes them, where nothing else is written."""
    mg, counts = int8_cache_musicgen(musicgen(SMALL))
    assert counts["int8_kv_cache"] == counts["whole_layer"] == len(mg.lm.transformer.layers)
    layer = mg.lm.transformer.layers[0]
    heads, dim = layer.self_attn.num_heads, layer.self_attn.embed_dim
    depth = dim // heads
    x = torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(1))
    cross = torch.randn(2, heads, 3, depth, generator=torch.Generator().manual_seed(2))
    caches = [torch.zeros(2, heads, 8, depth, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(2, heads, 8) for _ in range(2)]
    with torch.inference_mode():
        layer.lean_plan.whole.step(x, *caches, 3, cross, cross, *scales)
        normed = F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        projected = layer.self_attn.packed_in_proj(normed).view(2, 1, 3, heads, depth).permute(0, 3, 2, 1, 4)
    for part, (numbers, row_scales) in enumerate(zip(caches, scales, strict=True), start=1):
        expected, expected_scales = int8_kv_cache.quantize(projected[:, :, part])
        # The kernel's layer norm is its own (float rounding): a number may round the other way, no further.
        assert (numbers[:, :, 3:4].int() - expected.int()).abs().max() <= 1
        assert float((numbers[:, :, 3:4] != expected).float().mean()) < 0.05
        assert torch.allclose(row_scales[:, :, 3:4], expected_scales, rtol=1e-4)
        assert not numbers[:, :, :3].any() and not numbers[:, :, 4:].any() and not row_scales[:, :, 4:].any()


@pytest.mark.parametrize("sharpness", [1.0, 12.0], ids=["random", "peaked"])
def test_next_tokens_stay_close_to_the_fp16_and_fp32_caches(kernel, sharpness):
    """On int8 products (the CPU default): the int8 cache adds little to their drift from fp32 (KL 5.30e-4 against
    the fp16 cache's 5.26e-4 here on peaked distributions)."""
    stock = sharpened(musicgen(SMALL), sharpness)
    reference = next_token_distributions(stock)
    (int8, _), (fp16, _) = (int8_cache_musicgen(stock, flag) for flag in (True, False))
    int8_drift, fp16_drift = (drift(reference, next_token_distributions(mg)) for mg in (int8, fp16))
    assert int8_drift[0] < 1.2 * fp16_drift[0] + 1e-5 and int8_drift[1] > 0.9, (int8_drift, fp16_drift)
    assert not torch.equal(next_token_distributions(int8), next_token_distributions(fp16))  # it did run


def _cache_dtypes(mg) -> set:
    return {(m._streaming_state["static_k"].dtype, m._streaming_state["static_k_scale"].dtype)
            for m in mg.lm.modules() if "static_k" in getattr(m, "_streaming_state", {})}


def test_whole_generations_with_a_prompt_windows_and_a_grown_cache(kernel):
    """Each window re-reads the last as a prompt (the stock forward, over the numbers the int8 cache holds), the
    cache grows mid-generation: int8 throughout, and greedy tokens mostly the fp16 cache's. On fp32 products: with
    int8 ones the first token flips within a step or two from either cache, and sends the rest elsewhere (random
    weights' flat distributions; the drift tests above measure how far the distributions move)."""
    stock = musicgen(SMALL)
    (int8, _), (fp16, _) = (int8_cache_musicgen(stock, flag, "fp32") for flag in (True, False))
    expected = greedy_tokens(fp16, 2.0, max_duration=1.0)
    seen = []
    handle = int8.lm.transformer.layers[0].register_forward_hook(lambda *_: seen.append(_cache_dtypes(int8)))
    try:
        got = greedy_tokens(int8, 2.0, max_duration=1.0)
    finally:
        handle.remove()
    assert seen and {(torch.int8, torch.float32)} == set().union(*seen)
    assert got.shape == expected.shape and float((got == expected).float().mean()) > 0.75


def test_an_fp32_lm_keeps_it_too(kernel):
    """Without int8 products (bf16 where the CPU lacks VNNI does not build the kernel; fp32 here): the Python lean
    step over the int8 cache, close to the fp16 cache's tokens."""
    stock = musicgen(SMALL)
    (int8, counts), (fp16, _) = (int8_cache_musicgen(stock, flag, "fp32") for flag in (True, False))
    assert counts["int8_kv_cache"] == counts["lean_step"] > 0 and counts["whole_layer"] == 0
    kl, agreement = drift(next_token_distributions(fp16), next_token_distributions(int8))
    assert kl < 1e-3 and agreement > 0.9, (kl, agreement)


def test_the_caches_and_their_scales_are_in_one_huge_page_mapping(kernel):
    if huge_pages._mapping(1) is None or not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    mg, _ = int8_cache_musicgen(musicgen(SMALL))
    spans = []

    def look(*_):
        states = [layer.self_attn._streaming_state for layer in mg.lm.transformer.layers]
        tensors = [state[name] for state in states for name in ("static_k", "static_v", "static_k_scale",
                                                                "static_v_scale")]
        starts = [t.data_ptr() for t in tensors]
        spans.append((max(starts) - min(starts), huge_bytes(tensors[-1])))
    mg.set_custom_progress_callback(look)
    greedy_tokens(mg, 1.0, progress=True)
    assert spans and all(span < huge_pages.PAGE and huge >= huge_pages.PAGE for span, huge in spans)


def test_the_setting():
    assert Settings().int8_kv_cache is True
    assert Settings.from_env({"MUSICGEN_INT8_KV_CACHE": "0"}).int8_kv_cache is False
    assert Speedups.from_settings(Settings()).int8_kv_cache is True
    assert Speedups().int8_kv_cache is False and Speedups(int8_kv_cache=True).on_cpu_only
    debug = copy.deepcopy(musicgen().lm)  # heads of 4 floats: neither compact cache takes them
    assert fast_lm.install(debug, True, True, half_kv_cache=True, int8_kv_cache=True)["int8_kv_cache"] == 0
