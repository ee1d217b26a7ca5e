"""Weights packed for oneDNN (MUSICGEN_PACKED_WEIGHTS): stock's logits and tokens, dense copies released."""

import copy

import pytest
import torch

from app import fast_lm
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen, with_speedups

ALL = {"cross_kv_cache": True, "static_kv_cache": True, "packed_weights": True}


@pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
def test_packed_logits_match_stock_within_float_rounding(sizes):
    """Packing changes the order of the sums only: a prompt block, then single steps, give stock's logits
    to float32 rounding."""
    stock = musicgen(sizes).lm
    fast = with_speedups(musicgen(sizes), **ALL).lm
    torch.manual_seed(0)
    tokens = torch.randint(0, stock.card, (2, stock.num_codebooks, 12))
    conditions = {"description": (torch.randn(2, 3, 16 if sizes is None else 64), torch.ones(2, 3))}
    with torch.inference_mode(), stock.streaming(), fast.streaming():
        for start, stop in ((0, 5), *((i, i + 1) for i in range(5, 12))):
            chunk = tokens[..., start:stop]
            expected = stock(chunk, [], condition_tensors=conditions)
            got = fast(chunk, [], condition_tensors=conditions)
            assert not torch.equal(got, expected) or sizes is None  # it did take the packed path
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
@pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
def test_packed_greedy_tokens_are_stocks(sizes, max_duration):
    stock = musicgen(sizes)
    expected = greedy_tokens(stock, 2.0, max_duration)
    assert torch.equal(greedy_tokens(with_speedups(stock, **ALL), 2.0, max_duration), expected)


def test_packing_replaces_every_weight_a_step_reads_and_keeps_no_dense_copy():
    lm = with_speedups(musicgen(SMALL), **ALL).lm
    layers = len(lm.transformer.layers)
    stepped = [*lm.transformer.modules(), *lm.linears.modules()]  # the conditioner runs once per generation
    assert not [m for m in stepped if type(m) is torch.nn.Linear]
    for layer in lm.transformer.layers:
        assert layer.self_attn.in_proj_weight is None and isinstance(layer.self_attn.packed_in_proj,
                                                                     fast_lm.PackedLinear)
        assert layer.cross_attention.in_proj_weight is None
        assert layer.cross_attention.key_value_weight.shape == (2 * SMALL["dim"], SMALL["dim"])
    packed = [m for m in lm.modules() if isinstance(m, fast_lm.PackedLinear)]
    assert len(packed) == 6 * layers + lm.num_codebooks
    # Nothing dense left behind: of the step's parameters only the layer norms remain.
    assert {name.split(".")[-2] for name, _ in lm.transformer.named_parameters()} == {"norm1", "norm2", "norm_cross"}
    assert not list(lm.linears.parameters())


def test_a_packed_lm_refuses_what_it_cannot_do_with_a_clear_error():
    lm = with_speedups(musicgen(), **ALL).lm
    tokens = torch.zeros(1, lm.num_codebooks, 3, dtype=torch.long)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="packed for streaming decoding only"):
        lm(tokens, [], condition_tensors={"description": (torch.randn(1, 1, 16), torch.ones(1, 1))})
    with pytest.raises(RuntimeError):
        copy.deepcopy(lm)


def test_packing_is_skipped_where_onednn_cannot_pack():
    assert not fast_lm.can_pack(torch.zeros(2, 2, dtype=torch.float16))
    assert not fast_lm.can_pack(torch.zeros(2, 2, device="meta"))
    assert fast_lm.can_pack(torch.zeros(2, 2))
