"""The lean single-token step (app/lean_step.py): bit-identical logits to the layer forward it replaces (fast_lm's
caches under audiocraft's StreamingTransformerLayer.forward), in every CPU precision, and its fallbacks."""

import collections
import contextlib
import copy
import typing as tp

import pytest
import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.conditioners import ConditioningAttributes
from audiocraft.modules.transformer import StreamingTransformerLayer

from app import debug_models, fast_lm, precision
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen, with_speedups

SIZES = {"debug": {}, "small-random": SMALL}  # einsum attention; scaled_dot_product_attention (memory_efficient)
PRECISIONS = [("fp32", False), ("fp32", True), ("bf16", True), ("bf16-autocast", False), ("int8-dynamic", True)]


def converted(built: LMModel, name: str, packed: bool, **install: bool) -> tp.Tuple[LMModel, tp.Dict[str, int]]:
    """A copy of `built` in precision `name` with both caches, sped up by `fast_lm.install(**install)`, and what
    that install reached."""
    if name == "int8-dynamic" and not fast_lm.can_quantize():
        pytest.skip("no fbgemm int8 kernels here")
    lm = copy.deepcopy(built)
    resolved = precision.apply(lm, name, "cpu")
    counts = fast_lm.install(lm, cross_kv_cache=True, static_kv_cache=True, packed_weights=packed,
                             int8_weights=resolved == "int8-dynamic", **install)
    return lm.eval(), counts


def pair(sizes: tp.Dict[str, tp.Any], name: str, packed: bool) -> tp.Tuple[LMModel, LMModel]:
    """The same LM twice, converted and sped up alike, the second with the lean step."""
    torch.manual_seed(0)
    built = debug_models.build_lm(**sizes)
    (plain, counts), (lean, lean_counts) = (converted(built, name, packed, lean_step=lean) for lean in (False, True))
    assert (counts["lean_step"], lean_counts["lean_step"]) == (0, len(lean.transformer.layers))
    return plain, lean


def conditions(lm: LMModel, description: str = "90s rock") -> tp.Dict[str, tp.Any]:
    """The CFG batch's conditioning, as LMModel.generate builds it."""
    attributes = [ConditioningAttributes(text={"description": description}),
                  ConditioningAttributes(text={"description": None})]
    return lm.condition_provider(lm.condition_provider.tokenize(attributes))


@pytest.fixture
def stock_calls(monkeypatch) -> tp.Counter[int]:
    """How many times audiocraft's own layer forward ran, per layer (by id): the lean step's fallbacks."""
    calls: tp.Counter[int] = collections.Counter()
    stock = StreamingTransformerLayer.forward

    def counted(self: StreamingTransformerLayer, *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        calls[id(self)] += 1
        return stock(self, *args, **kwargs)

    monkeypatch.setattr(StreamingTransformerLayer, "forward", counted)
    return calls


def fallbacks(lm: LMModel, calls: tp.Counter[int]) -> tp.List[int]:
    return [calls[id(layer)] for layer in lm.transformer.layers]


def decode(lms: tp.Sequence[LMModel], tokens: tp.List[torch.Tensor], conds: tp.List[tp.Dict[str, tp.Any]]) -> None:
    """Feed every LM the same blocks of tokens in one streaming session each; their logits must be equal."""
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for lm in lms:
            stack.enter_context(lm.streaming())
        for i, (x, cond) in enumerate(zip(tokens, conds, strict=True)):
            reference, *others = [lm(x, [], condition_tensors=cond) for lm in lms]
            for logits in others:
                assert torch.equal(logits, reference), f"block {i}: max diff {(logits - reference).abs().max()}"


def blocks(card: int, prompt: int, steps: int) -> tp.List[torch.Tensor]:
    """A prompt of `prompt` tokens (if any), then `steps` single tokens: the CFG batch of 2, 4 codebooks."""
    tokens = torch.randint(0, card, (2, 4, prompt + steps), generator=torch.Generator().manual_seed(1))
    return ([tokens[..., :prompt]] if prompt else []) + [tokens[..., i: i + 1] for i in range(prompt, prompt + steps)]


@pytest.mark.parametrize("name,packed", PRECISIONS, ids=[f"{n}{'-packed' if p else ''}" for n, p in PRECISIONS])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_lean_step_gives_bit_identical_logits(sizes, name, packed, stock_calls):
    plain, lean = pair(sizes, name, packed)
    cond = conditions(plain)
    # A 3-token prompt sizes the cache for 6 (fast_lm.GROWTH), then the cache grows at 6 and at 14: the prompt and
    # both growths go through the stock forward, every other step through the lean one.
    decode([plain, lean], blocks(plain.card, 3, 12), [cond] * 13)
    assert fallbacks(lean, stock_calls) == [3] * len(lean.transformer.layers)
    assert fallbacks(plain, stock_calls) == [13] * len(plain.transformer.layers)


def test_first_step_and_new_conditioning_take_the_stock_forward(stock_calls):
    plain, lean = pair(SMALL, "fp32", True)
    for lm in (plain, lean):
        for module in lm.modules():
            if hasattr(module, "static_capacity"):
                module.static_capacity = 32  # no growth within this test
    first, second = conditions(plain), conditions(plain, "calm piano")
    # Step 0 has no cache yet; step 4 brings another conditioning (its keys/values are projected then).
    decode([plain, lean], blocks(plain.card, 0, 8), [first] * 4 + [second] * 4)
    assert fallbacks(lean, stock_calls) == [2] * len(lean.transformer.layers)


def test_outside_streaming_the_stock_forward_runs(stock_calls):
    plain, lean = pair({}, "fp32", False)
    x = blocks(plain.card, 5, 0)[0]
    with torch.inference_mode():
        assert torch.equal(lean(x, [], condition_tensors=conditions(lean)),
                           plain(x, [], condition_tensors=conditions(plain)))
    assert fallbacks(lean, stock_calls) == [1] * len(lean.transformer.layers)


def test_a_copy_multiplies_by_its_own_weights():
    plain, lean = pair({}, "fp32", False)
    plain, lean = copy.deepcopy(plain), copy.deepcopy(lean)
    with torch.no_grad():
        for lm in (plain, lean):
            for layer in lm.transformer.layers:
                layer.linear1.weight.mul_(3)
                layer.self_attn.in_proj_weight.mul_(2)
    decode([plain, lean], blocks(plain.card, 2, 4), [conditions(plain)] * 5)


@pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
def test_greedy_generation_gives_the_same_tokens(max_duration):
    stock = musicgen()
    plain = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True, lean_step=False)
    lean = with_speedups(stock, cross_kv_cache=True, static_kv_cache=True)
    assert all(hasattr(layer, "lean_plan") for layer in lean.lm.transformer.layers)
    assert torch.equal(greedy_tokens(lean, 2.0, max_duration), greedy_tokens(plain, 2.0, max_duration))


def test_not_installed_without_the_static_cache_or_when_declined():
    stock = musicgen()
    assert fast_lm.install(copy.deepcopy(stock).lm, cross_kv_cache=True)["lean_step"] == 0
    assert fast_lm.install(copy.deepcopy(stock).lm, cross_kv_cache=False, static_kv_cache=True)["lean_step"] == 0
    assert fast_lm.install(copy.deepcopy(stock).lm, True, True, lean_step=False)["lean_step"] == 0


def test_layers_without_cross_attention(stock_calls):
    """debug-melody prepends its conditions to the input, as musicgen-melody does: no cross-attention in its layers."""
    mg = debug_models.build_musicgen("debug-melody")
    plain = with_speedups(mg, cross_kv_cache=True, static_kv_cache=True, lean_step=False)
    lean = with_speedups(mg, cross_kv_cache=True, static_kv_cache=True)
    assert all(layer.cross_attention is None and hasattr(layer, "lean_plan") for layer in lean.lm.transformer.layers)
    assert torch.equal(greedy_tokens(lean, 1.0), greedy_tokens(plain, 1.0))
    # Only the first step (the prepended conditions and the first token, no cache yet) and, since fast_lm sizes the
    # cache for the generated steps without those conditions, its one growth take the stock forward.
    assert fallbacks(lean.lm, stock_calls) == [2] * len(lean.lm.transformer.layers)
