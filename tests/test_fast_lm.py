"""Cross-attention key/value caching and MUSICGEN_PRECISION: same tokens as stock, real generations."""

import copy
import functools
import typing as tp

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.transformer import create_sin_embedding

from app import debug_models, fast_lm, huge_pages, int8_kernel, precision
from app.config import ConfigError, Settings
from tests.helpers import events, generate, skip_without_kernels

# A small random LM on audiocraft's `memory_efficient` attention path (scaled_dot_product_attention), as the
# real checkpoints use; the debug model takes the einsum path.
SMALL = {"dim": 64, "num_heads": 4, "num_layers": 3, "card": 400, "memory_efficient": True}


def musicgen(sizes: tp.Optional[tp.Dict[str, tp.Any]] = None) -> MusicGen:
    """A fresh copy of the debug model, or of one with an LM of these sizes (built once: the debug
    EnCodec's k-means initialisation takes seconds)."""
    return copy.deepcopy(_built(tuple(sorted(sizes.items())) if sizes else None))


@functools.cache
def _built(sizes: tp.Optional[tp.Tuple[tp.Tuple[str, tp.Any], ...]]) -> MusicGen:
    if sizes is None:
        return debug_models.build_musicgen()
    codec = copy.deepcopy(_built(None).compression_model)
    return MusicGen("small-random", codec, debug_models.build_lm(**dict(sizes)))


def greedy_tokens(mg: MusicGen, duration: float, max_duration: tp.Optional[float] = None,
                  progress: bool = False) -> torch.Tensor:
    """Tokens of a greedy (temperature 0) generation with CFG; `max_duration` shortens the window to
    take audiocraft's windowed extension (each window re-reads the last one as a prompt) cheaply."""
    if max_duration is not None:
        mg.max_duration = max_duration
    mg.set_generation_params(use_sampling=False, duration=duration, cfg_coef=3.0,
                             extend_stride=max_duration / 2 if max_duration else 18)
    with torch.inference_mode():
        return mg.generate(["90s rock", "calm piano"], progress=progress, return_tokens=True)[1]


def with_speedups(mg: MusicGen, **kwargs: tp.Any) -> MusicGen:
    fast = copy.deepcopy(mg)
    fast_lm.install(fast.lm, **kwargs)
    return fast


@pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
@pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
def test_cross_kv_cache_gives_stock_tokens(sizes, max_duration):
    stock = musicgen(sizes)
    fast = with_speedups(stock, cross_kv_cache=True)
    expected = greedy_tokens(stock, 2.0, max_duration)
    assert torch.equal(greedy_tokens(fast, 2.0, max_duration), expected)


def test_cross_kv_cache_projects_once_per_generation():
    fast = with_speedups(musicgen(), cross_kv_cache=True)
    modules = [m for m in fast.lm.modules() if hasattr(m, "cross_kv_computed")]
    assert len(modules) == len(fast.lm.transformer.layers)
    greedy_tokens(fast, 1.0)
    assert [m.cross_kv_computed for m in modules] == [1] * len(modules)
    greedy_tokens(fast, 1.0)  # a new generation (new conditioning) projects again, once
    assert [m.cross_kv_computed for m in modules] == [2] * len(modules)


def test_install_reports_what_it_reached_and_stock_is_untouched():
    mg = musicgen()
    fast = copy.deepcopy(mg)
    layers = len(mg.lm.transformer.layers)
    assert fast_lm.install(fast.lm, cross_kv_cache=True, static_kv_cache=True) == {
        "cross_kv_cache": layers, "static_kv_cache": layers, "packed_weights": 0, "lean_step": layers,
        "pair_attention": 0, "half_kv_cache": 0, "int8_kv_cache": 0, "whole_layer": 0, "whole_lm": 0, "huge_pages": 0}
    assert not any(hasattr(m, "cross_kv_computed") for m in mg.lm.modules())
    assert fast_lm.install(copy.deepcopy(mg).lm, cross_kv_cache=False) == {
        "cross_kv_cache": 0, "static_kv_cache": 0, "packed_weights": 0, "lean_step": 0, "pair_attention": 0,
        "half_kv_cache": 0, "int8_kv_cache": 0, "whole_layer": 0, "whole_lm": 0, "huge_pages": 0}
    # The debug model attends through audiocraft's einsum path, which the helper does not split.
    assert fast_lm.install(copy.deepcopy(mg).lm, True, True, pair_attention=True)["pair_attention"] == 0


def next_token_distributions(mg: MusicGen, steps: int = 16) -> torch.Tensor:
    """Log-probabilities at each step for the same (random) tokens fed one step at a time."""
    torch.manual_seed(0)
    lm = mg.lm
    tokens = torch.randint(0, lm.card, (1, lm.num_codebooks, steps))
    attributes, _ = mg._prepare_tokens_and_attributes(["90s rock"], None)
    null = lm.cfg_dropout.__class__(p=1.0)(copy.deepcopy(attributes))  # what LMModel.generate does for CFG
    conditions = lm.condition_provider(lm.condition_provider.tokenize(attributes + null))
    out = []
    with torch.inference_mode(), lm.streaming():
        for step in range(steps):
            x = tokens[..., step: step + 1].repeat(2, 1, 1)
            out.append(torch.log_softmax(lm(x, [], condition_tensors=conditions)[:1].float(), dim=-1))
    return torch.cat(out, dim=2)


def lowered(mg: MusicGen, name: str) -> MusicGen:
    """A copy of `mg` at precision `name` ("-packed": with packed weights, on by default; "-fbgemm": int8 on
    fbgemm's kernels, not app/int8_kernel.py's; "-fp16-cache": the self-attention cache in fp16, and with int8 on
    this service's kernels the whole-layer step: the CPU default; "-int8-cache": that cache in int8 instead), as
    MusicModel.load builds it."""
    low = copy.deepcopy(mg)
    suffixes = ("-packed", "-fbgemm", "-fp16-cache", "-int8-cache")
    packed, fbgemm, half, int8_cache = (name.endswith(suffix) for suffix in suffixes)
    for suffix in suffixes:
        name = name.removesuffix(suffix)
    assert precision.apply(low.lm, name, "cpu") == name
    int8 = name == "int8-dynamic"
    if packed or int8 or half or int8_cache:  # int8 weights are packed whatever MUSICGEN_PACKED_WEIGHTS says
        counts = fast_lm.install(low.lm, True, True, packed_weights=packed, int8_weights=int8,
                                 own_int8_kernel=not fbgemm, half_kv_cache=half or int8_cache,
                                 int8_kv_cache=int8_cache)
        assert counts["packed_weights"] > 0 or not (packed or int8)
        layers = len(low.lm.transformer.layers)
        assert counts["whole_layer"] == (layers if (half or int8_cache) and int8 else 0)
        assert counts["int8_kv_cache"] == (layers if int8_cache else 0)
    return low


def drift(reference: torch.Tensor, logp: torch.Tensor) -> tp.Tuple[float, float]:
    """Mean KL(reference || logp) and top-1 agreement of next-token log-probabilities."""
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    kl = (reference.exp() * (reference - logp)).sum(-1).mean()
    return float(kl), float((reference.argmax(-1) == logp.argmax(-1)).float().mean())


@pytest.mark.parametrize("name", ["bf16", "bf16-autocast", "int8-dynamic", "int8-dynamic-fbgemm", "bf16-packed",
                                  "bf16-autocast-packed", "int8-dynamic-fp16-cache", "int8-dynamic-int8-cache"])
def test_lower_precision_stays_close_to_fp32(name):
    if name.endswith("-cache"):
        skip_without_kernels("the cache stays fp32")
    stock = musicgen(SMALL)
    kl, agreement = drift(next_token_distributions(stock), next_token_distributions(lowered(stock, name)))
    assert kl < 0.01 and agreement > 0.9, (kl, agreement)


def sharpened(mg: MusicGen, factor: float) -> MusicGen:
    """Random weights give near-flat next-token distributions that hide errors; output heads scaled by `factor`
    make them peaked like a trained model's (a stand-in: trained weights are not reachable here)."""
    sharp = copy.deepcopy(mg)
    with torch.no_grad():
        for head in sharp.lm.linears:
            head.weight.mul_(factor)
    return sharp


@pytest.mark.parametrize("name", ["bf16-packed", "int8-dynamic", "int8-dynamic-fbgemm", "int8-dynamic-fp16-cache",
                                  "int8-dynamic-int8-cache"])
def test_lower_precision_stays_close_to_fp32_on_peaked_distributions(name):
    """The CPU defaults (int8-dynamic with VNNI, else bf16) on distributions as peaked as a trained model's: the
    most likely token keeps ~0.7 of the mass on average here, and the drift stays small."""
    if name.endswith("-cache"):
        skip_without_kernels("the cache stays fp32")
    stock = sharpened(musicgen(SMALL), 12.0)
    reference = next_token_distributions(stock)
    assert 0.3 < float(reference.exp().max(-1).values.mean()) < 0.9  # peaked, not one-hot
    kl, agreement = drift(reference, next_token_distributions(lowered(stock, name)))
    assert kl < 0.01 and agreement > 0.9, (kl, agreement)


def test_int8_reaches_every_product_a_step_runs():
    """audiocraft's fused attention projections are not nn.Linear: int8 must reach them too, leaving no dense
    weight a decoding step reads (the cross-attention keys/values are projected once per generation)."""
    lm = lowered(musicgen(SMALL), "int8-dynamic").lm
    stepped = [*lm.transformer.modules(), *lm.linears.modules()]
    assert not [m for m in stepped if type(m) is torch.nn.Linear or isinstance(m, fast_lm.PackedLinear)]
    int8 = [m for m in stepped if isinstance(m, fast_lm.Int8Linear)]
    assert len(int8) == 6 * len(lm.transformer.layers) + lm.num_codebooks
    for layer in lm.transformer.layers:
        assert isinstance(layer.self_attn.packed_in_proj, fast_lm.Int8Linear)
        assert isinstance(layer.cross_attention.packed_query, fast_lm.Int8Linear)
    assert {name.split(".")[-2] for name, _ in lm.transformer.named_parameters()} == {"norm1", "norm2", "norm_cross"}


def test_auto_precision_is_int8_where_the_cpu_has_vnni():
    expected = "int8-dynamic" if fast_lm.can_quantize() and torch.cpu._is_vnni_supported() else None
    if expected is None:
        pytest.skip("no VNNI on this CPU: auto is bf16 or fp32")
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("auto", "cuda") == "autocast"


def test_bf16_adds_positions_in_fp32():
    """In bf16 a position like 1501 would be rounded to 1500 (8-bit mantissa): the layers must see the
    fp32 sum of embeddings and positional embedding, rounded to bf16 once."""
    lm = musicgen().lm
    reference = copy.deepcopy(lm)
    assert precision.apply(lm, "bf16", "cpu") == "bf16"
    assert lm.transformer.layers[0].linear1.weight.dtype == torch.bfloat16
    assert lm.emb[0].weight.dtype == torch.float32
    seen = []
    lm.transformer.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    tokens = torch.randint(0, lm.card, (2, lm.num_codebooks, 1))
    conditions = {"description": (torch.randn(2, 1, 16), torch.ones(2, 1))}
    with torch.inference_mode(), lm.streaming():
        lm.transformer._streaming_state["offsets"] = torch.tensor([1501, 1501])
        logits = lm(tokens, [], condition_tensors=conditions)
        x = sum(reference.emb[k](tokens[:, k]) for k in range(lm.num_codebooks))
        positions = torch.full((1, 1, 1), 1501)
        expected = x + create_sin_embedding(positions, x.shape[-1], reference.transformer.max_period)
        assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], expected.to(torch.bfloat16))
    assert logits.dtype == torch.float32


def test_precision_setting_is_validated():
    assert Settings.from_env({"MUSICGEN_PRECISION": "int8-dynamic"}).precision == "int8-dynamic"
    with pytest.raises(ConfigError, match="MUSICGEN_PRECISION"):
        Settings.from_env({"MUSICGEN_PRECISION": "fp8"})
    assert precision.resolve("bf16", "cuda") == "autocast"  # audiocraft's own fp16 on CUDA


def test_server_runs_the_default_speedups(idle_server):
    """The shared test server runs with the defaults: cross and static caches, packed weights and the lean step
    on, precision auto."""
    with generate(idle_server.url, {"description": "drums", "duration": 2, "temperature": 0}) as response:
        assert response.status_code == 200
        last = list(events(response))[-1]
    assert last["event"] == "completed", last
    expected = precision.resolve("auto", "cpu")
    layers = len(musicgen().lm.transformer.layers)
    packed = 6 * layers + musicgen().lm.num_codebooks
    # On this service's int8 kernel, its weights go to huge pages (app/huge_pages.py), where the kernel has them.
    moved = packed if (expected == "int8-dynamic" and int8_kernel.load() is not None
                       and huge_pages._mapping(1) is not None) else 0
    assert (f"LM precision {expected}, decoding speed-ups {{'cross_kv_cache': {layers}, 'static_kv_cache': {layers}, "
            f"'packed_weights': {packed}, 'lean_step': {layers}, 'pair_attention': 0, 'half_kv_cache': 0, "
            f"'int8_kv_cache': 0, 'whole_layer': 0, 'whole_lm': 0, 'huge_pages': {moved}}}") in idle_server.output()
    # The debug model attends through audiocraft's einsum path, with heads of 4 floats: neither the pair's split nor
    # the fp16 cache takes it.
