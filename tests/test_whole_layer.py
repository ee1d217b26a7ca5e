"""The whole-layer step (app/lean_step.py's `whole_layer`, app/csrc/lean_layer.cpp): a layer's decoding step in one
C++ call where it runs on this service's int8 kernel and fp16 cache. Built here for real: next tokens within
rounding of the Python lean step's, the cache written as that step writes it, every steady step taken by it,
what it refuses, and the default server on it."""

import copy
import typing as tp

import pytest
import torch
from torch.nn import functional as F

from app import debug_models, fast_lm, half_attention, huge_pages, int8_kv_cache, lean_step, precision
from tests.helpers import Server, built_kernels, events, generate
from tests.test_fast_lm import SMALL, drift, greedy_tokens, musicgen, next_token_distributions, sharpened
from tests.test_lean_step import conditions


@pytest.fixture(scope="module")
def kernels():
    return built_kernels("the lean step runs in Python", half_attention.load)


class Counted:
    """A whole step (a layer's, or the LM's: tests/test_lean_lm.py), counted."""

    def __init__(self, whole: tp.Any):
        self.whole, self.calls = whole, 0

    def step(self, *args: tp.Any) -> torch.Tensor:
        self.calls += 1
        return self.whole.step(*args)


def int8_default(stock, whole_layer: bool = True, activation: tp.Any = None, **install: tp.Any):
    """A copy of `stock` (a MusicGen) as the CPU default builds it but with the fp16 cache (`int8_kv_cache=True`:
    the default's int8 one) and the layers' steps under audiocraft's LM (app/lean_lm.py's whole step off, so that
    the layers' steps are called from Python, as these tests count them): int8 products on this service's kernel."""
    mg = copy.deepcopy(stock)
    if activation is not None:
        for layer in mg.lm.transformer.layers:
            layer.activation = activation
    precision.apply(mg.lm, "int8-dynamic", "cpu")
    install = {"whole_lm": False, **install}
    counts = fast_lm.install(mg.lm, True, True, int8_weights=True, half_kv_cache=True, whole_layer=whole_layer,
                             **install)
    return mg, counts


def counted(mg) -> tp.List[Counted]:
    """Count every layer's whole steps from now on."""
    plans = []
    for layer in mg.lm.transformer.layers:
        layer.lean_plan = layer.lean_plan._replace(whole=Counted(layer.lean_plan.whole))
        plans.append(layer.lean_plan.whole)
    return plans


CACHES = pytest.mark.parametrize("int8_cache", [False, True], ids=["fp16-cache", "int8-cache"])


@CACHES
@pytest.mark.parametrize("activation", [F.relu, F.gelu], ids=["relu", "gelu"])
@pytest.mark.parametrize("sharpness", [1.0, 12.0], ids=["random", "peaked"])
def test_next_tokens_are_the_python_steps_within_rounding(kernels, activation, sharpness, int8_cache):
    stock = sharpened(musicgen(SMALL), sharpness)
    (whole, counts), (python, python_counts) = (int8_default(stock, flag, activation, int8_kv_cache=int8_cache)
                                                for flag in (True, False))
    layers = len(stock.lm.transformer.layers)
    assert (counts["whole_layer"], python_counts["whole_layer"]) == (layers, 0)
    steps = counted(whole)
    reference, logp = next_token_distributions(python), next_token_distributions(whole)
    # No capacity announced: step 0 and the cache's growths at 2, 4 and 8 (fast_lm.GROWTH) take the stock forward,
    # every other step one call per layer.
    assert [plan.calls for plan in steps] == [12] * layers
    kl, agreement = drift(reference, logp)
    assert abs(kl) < 1e-6 and agreement > 0.95, (kl, agreement)


def cache_after(mg, steps: int) -> tp.Tuple[torch.Tensor, torch.Tensor, tp.List[int]]:
    """A middle layer's self-attention keys and values after `steps` single steps (an int8 cache's as the fp32
    numbers it holds), and every layer's length."""
    lm = mg.lm
    tokens = torch.randint(0, lm.card, (2, lm.num_codebooks, steps), generator=torch.Generator().manual_seed(0))
    cond = conditions(lm)
    with torch.inference_mode(), lm.streaming():
        for step in range(steps):
            lm(tokens[..., step: step + 1], [], condition_tensors=cond)
        state = lm.transformer.layers[1].self_attn._streaming_state
        lengths = [int(layer.self_attn._streaming_state["static_length"]) for layer in lm.transformer.layers]
        keys, values = state["static_k"], state["static_v"]
        if keys.dtype == int8_kv_cache.DTYPE:
            keys, values = (int8_kv_cache.dequantize(state[name], state[name + "_scale"])
                            for name in ("static_k", "static_v"))
        return keys.clone(), values.clone(), lengths


@CACHES
def test_it_writes_the_cache_as_the_python_step_does(kernels, int8_cache):
    stock = musicgen(SMALL)
    (whole, _), (python, _) = (int8_default(stock, flag, int8_kv_cache=int8_cache) for flag in (True, False))
    assert {layer.self_attn.static_kv_dtype for layer in whole.lm.transformer.layers} == {
        int8_kv_cache.DTYPE if int8_cache else half_attention.DTYPE}
    (keys, values, lengths), (python_keys, python_values, python_lengths) = (cache_after(mg, 6)
                                                                             for mg in (whole, python))
    assert lengths == python_lengths == [6] * len(lengths)
    for got, expected in ((keys, python_keys), (values, python_values)):
        assert not torch.equal(got[:, :, :6], torch.zeros_like(got[:, :, :6]))
        got, expected = got[:, :, :6].float(), expected[:, :, :6].float()
        assert torch.allclose(got, expected, atol=0.02, rtol=0.01), (got - expected).abs().max()


@CACHES
def test_generations_with_a_prompt_windows_and_a_grown_cache(kernels, int8_cache):
    """Each window re-reads the last as a prompt (the stock forward), the cache grows mid-generation: the whole
    step takes every steady step and greedy tokens stay the Python step's."""
    stock = musicgen(SMALL)
    (whole, _), (python, _) = (int8_default(stock, flag, int8_kv_cache=int8_cache) for flag in (True, False))
    expected = greedy_tokens(python, 2.0, max_duration=1.0)
    steps = counted(whole)
    got = greedy_tokens(whole, 2.0, max_duration=1.0)
    assert all(plan.calls > 50 for plan in steps)
    assert got.shape == expected.shape and float((got == expected).float().mean()) > 0.9


def test_only_layers_on_both_kernels_take_it(kernels):
    stock = musicgen(SMALL)
    assert int8_default(stock, own_int8_kernel=False)[1]["whole_layer"] == 0  # fbgemm's products
    assert int8_default(stock, whole_layer=False)[1]["whole_layer"] == 0
    fp32_cache = copy.deepcopy(stock)
    precision.apply(fp32_cache.lm, "int8-dynamic", "cpu")
    assert fast_lm.install(fp32_cache.lm, True, True, int8_weights=True)["whole_layer"] == 0
    fp32 = copy.deepcopy(stock)  # fp32 products (oneDNN's), fp16 cache
    assert fast_lm.install(fp32.lm, True, True, packed_weights=True, half_kv_cache=True)["whole_layer"] == 0
    debug = copy.deepcopy(musicgen())  # heads of 4 floats, and audiocraft's einsum path
    precision.apply(debug.lm, "int8-dynamic", "cpu")
    assert fast_lm.install(debug.lm, True, True, int8_weights=True, half_kv_cache=True)["whole_layer"] == 0
    assert lean_step.whole(int8_default(stock)[0].lm) == len(stock.lm.transformer.layers)


def test_it_refuses_what_it_cannot_take(kernels):
    mg, _ = int8_default(musicgen(SMALL))
    layer = mg.lm.transformer.layers[0]
    whole, heads = layer.lean_plan.whole, layer.self_attn.num_heads
    dim, depth = layer.self_attn.embed_dim, layer.self_attn.embed_dim // heads
    keys = torch.zeros(2, heads, 8, depth, dtype=torch.float16)
    cross = torch.zeros(2, heads, 3, depth)
    x = torch.randn(2, 1, dim)
    assert whole.step(x, keys, keys.clone(), 7, cross, cross).shape == (2, 1, dim)
    with pytest.raises(RuntimeError, match="the cache's shape"):
        whole.step(x, keys, keys.clone(), 8, cross, cross)  # no room left at 8
    with pytest.raises(RuntimeError, match="half, or int8 with scales"):
        whole.step(x, keys.float(), keys.float(), 0, cross, cross)
    int8_keys, scales = torch.zeros(keys.shape, dtype=torch.int8), torch.zeros(keys.shape[:-1])
    assert whole.step(x, int8_keys, int8_keys.clone(), 7, cross, cross, scales, scales.clone()).shape == (2, 1, dim)
    with pytest.raises(RuntimeError, match="an int8 cache needs its scales"):
        whole.step(x, int8_keys, int8_keys.clone(), 0, cross, cross)
    with pytest.raises(RuntimeError, match="an int8 cache needs its scales"):  # scales of another length
        whole.step(x, int8_keys, int8_keys.clone(), 0, cross, cross, scales[..., :3], scales[..., :3])
    with pytest.raises(RuntimeError, match="cross-attention keys and values where"):
        whole.step(x, keys, keys.clone(), 0, None, None)
    with pytest.raises(RuntimeError, match=r"float \[batch, 1, dim\]"):
        whole.step(x.repeat(1, 2, 1), keys, keys.clone(), 0, cross, cross)
    products = [module.product_args for module in (layer.self_attn.packed_in_proj, layer.self_attn.out_proj,
                                                   layer.linear1, layer.linear2)]
    norm = (torch.ones(dim), torch.zeros(dim), 1e-5)

    def built(heads: int = heads, activation: str = "relu", first: tp.Any = norm) -> tp.Any:
        return kernels.Layer(heads, activation, first, *products[:2], None, None, None, norm, *products[2:])

    assert built() is not None  # a layer without cross-attention
    with pytest.raises(RuntimeError, match="Layer: shapes"):  # three heads of 64 / 3 floats
        built(heads=3)
    with pytest.raises(RuntimeError, match="Layer: shapes"):  # a norm's weight of another size
        built(first=(torch.ones(dim + 16), None, 1e-5))
    with pytest.raises(RuntimeError, match="relu or gelu"):
        built(activation="tanh")


def test_a_row_whose_mean_is_exactly_zero_is_normalized_as_any_other(kernels):
    """Its layer norms divide by the row's deviation: a row of mean 0 (+1, -1, ...) must not be taken for one of
    deviation 0. The same row nudged off a mean of 0 gives the same output, within int8 rounding."""
    mg, _ = int8_default(musicgen(SMALL))
    layer = mg.lm.transformer.layers[0]
    heads, dim = layer.self_attn.num_heads, layer.self_attn.embed_dim
    x = torch.tensor([1.0, -1.0]).repeat(dim // 2).expand(2, 1, dim).contiguous()
    assert float(x.sum()) == 0.0
    nudged = x.clone()
    nudged[..., 0] += 1e-3
    cross = torch.randn(2, heads, 3, dim // heads, generator=torch.Generator().manual_seed(0))
    out = [layer.lean_plan.whole.step(row, torch.zeros(2, heads, 4, dim // heads, dtype=torch.float16),
                                      torch.zeros(2, heads, 4, dim // heads, dtype=torch.float16), 0, cross, cross)
           for row in (x, nudged)]
    assert torch.allclose(out[0], out[1], atol=0.05 * float(out[1].abs().max())), (out[0] - out[1]).abs().max()


def test_a_cache_beyond_fp16s_range_saturates(kernels):
    mg, _ = int8_default(musicgen(SMALL))
    layer = mg.lm.transformer.layers[0]
    with torch.no_grad():  # keys and values of ~1e6: beyond fp16's 65504
        layer.self_attn.packed_in_proj.scales.mul_(1e6)
    heads, dim = layer.self_attn.num_heads, layer.self_attn.embed_dim
    keys = torch.zeros(2, heads, 4, dim // heads, dtype=torch.float16)
    values, cross = keys.clone(), torch.zeros(2, heads, 3, dim // heads)
    out = layer.lean_plan.whole.step(torch.randn(2, 1, dim), keys, values, 0, cross, cross)
    assert torch.isfinite(out).all() and torch.isfinite(keys).all() and torch.isfinite(values).all()
    assert float(keys[:, :, 0].abs().max()) == half_attention.LIMIT


def test_the_default_server_decodes_musicgen_small_on_it(kernels):
    """debug-small (musicgen-small's sizes) served with the defaults: every layer on the whole step."""
    layers = debug_models.SMALL_LM["num_layers"]
    with Server(env={"MUSICGEN_MODEL": "debug-small"}) as server:
        server.wait()
        with generate(server.url, {"description": "drums", "duration": 1, "temperature": 0}) as response:
            assert response.status_code == 200
            last = list(events(response))[-1]
        assert last["event"] == "completed", last
        moved = 6 * layers + 4 if huge_pages._mapping(1) is not None else 0  # + the 4 output heads
        assert (f"'half_kv_cache': {layers}, 'int8_kv_cache': {layers}, 'whole_layer': {layers}, 'whole_lm': 1, "
                f"'huge_pages': {moved}}}") in server.output()
