"""LM decoding-step benchmarks at musicgen-small's size (random weights), for scripts/bench.py.

Every variant decodes the same tokens with the same conditioning, one step at a time in audiocraft's
streaming mode with the CFG batch of 2, round-robin (step i of every variant, then step i+1), so
each variant's time is compared with stock's time at the same step under the same load.
"""

import contextlib
import copy
import os
import statistics
import time
import typing as tp

import torch
from audiocraft.models.lm import LMModel

from app import debug_models, fast_lm, lean_lm, precision
from app.config import Settings
from app.model import Speedups
from scripts.bench_threads import hogs

CFG_COEF = 3.0
STOCK = "audiocraft fp32 (stock)"
FP32_PACKED = "fp32 + cross-KV + static KV + packed"
BF16_DEFAULT = "bf16 + cross-KV + static KV + packed"  # the service's CPU default where bf16 is native, no VNNI
DEFAULT = "int8-dynamic + cross-KV + static KV"  # the service's CPU default where the CPU has VNNI (always packed)
# The default with its lean step in Python instead of one C++ call per layer (app/lean_step.py's whole-layer step):
# the other variants below run that Python step too (the whole-layer step needs both of the service's kernels).
DEFAULT_PYTHON_LAYER = DEFAULT + ", lean step in Python"
# The default with its layers' C++ steps called one by one under audiocraft's LM and transformer instead of the LM's
# whole step in one call (app/lean_lm.py).
DEFAULT_LAYERS_UNDER_AUDIOCRAFT = DEFAULT + ", layers' steps under audiocraft's LM"
# The default with its int8 weights and key/value caches in 4 kB pages instead of 2 MB ones (app/huge_pages.py).
DEFAULT_SMALL_PAGES = DEFAULT + ", 4 kB pages"
# The default with its int8 products on fbgemm's kernels instead of app/int8_kernel.py's (MUSICGEN_INT8_KERNEL=0).
DEFAULT_FBGEMM = DEFAULT + ", fbgemm's int8 kernels"
# The default with its self-attention cache in fp16 (app/half_attention.py) instead of app/int8_kv_cache.py's int8
# (MUSICGEN_INT8_KV_CACHE=0).
DEFAULT_FP16_CACHE = DEFAULT + ", fp16 key/value cache"
# The default with its self-attention cache in fp32 instead of app/half_attention.py's fp16 (MUSICGEN_HALF_KV_CACHE=0).
DEFAULT_FP32_CACHE = DEFAULT + ", fp32 key/value cache"
# The fp32-cache default without app/lean_step.py (audiocraft's layer forward over fast_lm's caches): what the lean
# step saves (compared with DEFAULT_FP32_CACHE: outside the lean step an fp16 cache is converted at every step).
DEFAULT_STOCK_LAYER = DEFAULT_FP32_CACHE + ", stock layer forward"
# The fp32-cache default's self-attention over long contexts on one core (app/pair_attention.py off), paired with it
# (the pair splits attention over an fp32 cache only).
DEFAULT_ONE_CORE = DEFAULT_FP32_CACHE + ", attention on one core"
# Whether the service splits attention across two cores here (a generation on one thread, a second core free).
PAIR_ATTENTION = Speedups.from_settings(Settings()).parallel_attention
HALF_KV_CACHE = Speedups.from_settings(Settings()).half_kv_cache
INT8_KV_CACHE = Speedups.from_settings(Settings()).int8_kv_cache


def _shared_copy(lm: LMModel) -> LMModel:
    """A second module tree that shares `lm`'s weights (own streaming state, own forwards)."""
    return copy.deepcopy(lm, memo={id(p): p for p in lm.parameters()})


def audiocraft_variants(head_scale: float = 1.0) -> tp.Dict[str, LMModel]:
    """Every variant, sharing stock's weights where they are not converted; `head_scale` sharpens the output
    heads of all of them (`sharpen`)."""
    stock = sharpen(debug_models.build_lm(**debug_models.SMALL_LM), head_scale)
    cross = _shared_copy(stock)
    fast_lm.install(cross, cross_kv_cache=True)
    both = _shared_copy(stock)
    fast_lm.install(both, cross_kv_cache=True, static_kv_cache=True)
    autocast = copy.deepcopy(stock)
    precision.apply(autocast, "bf16-autocast", "cpu")
    fast_lm.install(autocast, cross_kv_cache=True, static_kv_cache=True)
    bf16 = copy.deepcopy(stock)
    precision.apply(bf16, "bf16", "cpu")
    bf16_fast = _shared_copy(bf16)  # shares the bf16 weights; hooks and class come along with the copy
    fast_lm.install(bf16_fast, cross_kv_cache=True, static_kv_cache=True)
    int8 = _int8_default(stock, PAIR_ATTENTION)
    int8_python_layer = _int8_default(stock, PAIR_ATTENTION, whole_layer=False)
    int8_layers = _int8_default(stock, PAIR_ATTENTION, whole_lm=False)
    int8_small_pages = _int8_default(stock, PAIR_ATTENTION, in_huge_pages=False)
    int8_fbgemm = _int8_default(stock, PAIR_ATTENTION, own_kernel=False)
    int8_fp16_cache = _int8_default(stock, PAIR_ATTENTION, int8_kv_cache=False)
    int8_fp32_cache = _int8_default(stock, PAIR_ATTENTION, half_kv_cache=False)
    int8_stock_layer = copy.deepcopy(stock)
    precision.apply(int8_stock_layer, "int8-dynamic", "cpu")
    fast_lm.install(int8_stock_layer, cross_kv_cache=True, static_kv_cache=True, int8_weights=True, lean_step=False)
    fp32_packed = copy.deepcopy(stock)  # packing makes new tensors (and a packed LM cannot be copied)
    fast_lm.install(fp32_packed, cross_kv_cache=True, static_kv_cache=True, packed_weights=True)
    bf16_packed = copy.deepcopy(stock)
    precision.apply(bf16_packed, "bf16", "cpu")
    fast_lm.install(bf16_packed, cross_kv_cache=True, static_kv_cache=True, packed_weights=True)
    return {STOCK: stock, "fp32 + cross-KV cache": cross, "fp32 + cross-KV + static KV": both,
            FP32_PACKED: fp32_packed,
            "bf16-autocast + cross-KV + static KV": autocast,
            "bf16 (stock attention)": bf16, "bf16 + cross-KV + static KV": bf16_fast, BF16_DEFAULT: bf16_packed,
            DEFAULT: int8, DEFAULT_LAYERS_UNDER_AUDIOCRAFT: int8_layers, DEFAULT_PYTHON_LAYER: int8_python_layer,
            DEFAULT_SMALL_PAGES: int8_small_pages,
            DEFAULT_FBGEMM: int8_fbgemm, DEFAULT_FP16_CACHE: int8_fp16_cache,
            DEFAULT_FP32_CACHE: int8_fp32_cache, DEFAULT_STOCK_LAYER: int8_stock_layer}


def _int8_default(stock: LMModel, pair_attention: bool, own_kernel: bool = True,
                  half_kv_cache: bool = HALF_KV_CACHE, whole_layer: bool = True, in_huge_pages: bool = True,
                  int8_kv_cache: bool = INT8_KV_CACHE, whole_lm: bool = True) -> LMModel:
    int8 = copy.deepcopy(stock)
    precision.apply(int8, "int8-dynamic", "cpu")
    fast_lm.install(int8, cross_kv_cache=True, static_kv_cache=True, int8_weights=True, pair_attention=pair_attention,
                    own_int8_kernel=own_kernel, half_kv_cache=half_kv_cache, whole_layer=whole_layer,
                    in_huge_pages=in_huge_pages, int8_kv_cache=int8_kv_cache, whole_lm=whole_lm)
    return int8


def sharpen(lm: LMModel, factor: float) -> LMModel:
    """Random weights give near-flat next-token distributions, which hide errors; output heads scaled by
    `factor` give peaked ones like a trained model's (a stand-in: no trained weights are reachable here)."""
    if factor != 1.0:
        with torch.no_grad():
            for head in lm.linears:
                head.weight.mul_(factor)
    return lm


def conditions(lm: LMModel) -> tp.Dict[str, tp.Any]:
    """The CFG batch's conditioning (a description, then the null one), as LMModel.generate builds it."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    attributes = [ConditioningAttributes(text={"description": "90s rock song with electric guitar"}),
                  ConditioningAttributes(text={"description": None})]
    return lm.condition_provider(lm.condition_provider.tokenize(attributes))


def transformers_variants() -> tp.Dict[str, tp.Any]:
    """Hugging Face's MusicGen decoder at the same size (random weights, built offline from a config)."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    sizes = debug_models.SMALL_LM
    config = MusicgenDecoderConfig(vocab_size=sizes["card"], max_position_embeddings=2048, hidden_size=sizes["dim"],
                                   num_hidden_layers=sizes["num_layers"], num_attention_heads=sizes["num_heads"],
                                   ffn_dim=4 * sizes["dim"], num_codebooks=4, audio_channels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        fp32 = MusicgenForCausalLM(config).eval()
    return {"transformers fp32": fp32, "transformers bf16": copy.deepcopy(fp32).to(torch.bfloat16)}


class _HFStepper:
    """One step of transformers' decoder with its own KV cache (cross-attention keys computed once)."""

    def __init__(self, model: tp.Any, text_length: int = 12):
        self.model, self.past = model, None
        dtype = next(model.parameters()).dtype
        self.encoder = torch.randn(2, text_length, model.config.hidden_size, generator=torch.Generator().manual_seed(5),
                                   dtype=torch.float32).to(dtype)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.repeat(2, 1, 1).reshape(-1, tokens.shape[-1])  # [CFG batch * codebooks, T]
        out = self.model(input_ids=ids, encoder_hidden_states=self.encoder, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits


def _cfg_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """In float64, so that a KL of 1e-8 (packing's reordered sums) does not come out negative from rounding."""
    cond, uncond = logits.double().split(1, dim=0)
    return torch.log_softmax(uncond + (cond - uncond) * CFG_COEF, dim=-1)[:, :, -1]  # [1, K, card]


def bandwidth_floor(lm: LMModel) -> tp.Dict[str, float]:
    """The least time a step can take: the bytes of bf16 weights one step reads (all of the transformer and output
    heads but the cross-attention keys/values, projected once per generation) over the memory read rate
    measured by summing a 512 MB tensor."""
    weights = sum(p.numel() for module in (lm.transformer, lm.linears) for p in module.parameters())
    weights -= sum(2 * layer.cross_attention.embed_dim ** 2 for layer in lm.transformer.layers)
    big = torch.ones(128 * 1024 * 1024)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t)
    read_gb_s = big.numel() * 4 / statistics.median(times) / 1e9
    return {"bf16_weight_mb": round(weights * 2 / 1e6), "read_gb_s": round(read_gb_s, 1),
            "ms_per_step": round(weights * 2 / (read_gb_s * 1e9) * 1000, 1),
            "int8_ms_per_step": round(weights / (read_gb_s * 1e9) * 1000, 1)}


def lm_step_comparison(steps: int) -> tp.Dict[str, tp.Any]:
    """ms/step of each variant, its speed-up over stock (median of per-step ratios) and, for audiocraft's
    variants, the drift of next-token distributions from stock fp32 (mean KL, top-1 agreement)."""
    ours = audiocraft_variants()
    theirs = transformers_variants()
    cond = conditions(ours[STOCK])
    torch.manual_seed(0)
    tokens = torch.randint(0, debug_models.SMALL_LM["card"], (1, 4, steps))
    times: tp.Dict[str, tp.List[float]] = {name: [] for name in [*ours, *theirs]}
    kl: tp.Dict[str, tp.List[float]] = {name: [] for name in ours}
    top1: tp.Dict[str, tp.List[float]] = {name: [] for name in ours}
    top_p: tp.List[float] = []  # how peaked stock's distributions are (random weights: nearly flat)
    hf = {name: _HFStepper(model) for name, model in theirs.items()}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for lm in ours.values():
            stack.enter_context(lm.streaming())
        for step in range(steps):
            x = tokens[..., step: step + 1]
            reference = None
            for name, lm in ours.items():
                t = time.perf_counter()
                logits = lm(x.repeat(2, 1, 1), [], condition_tensors=cond)
                times[name].append(time.perf_counter() - t)
                logp = _cfg_log_probs(logits)
                if reference is None:
                    reference = logp
                    top_p.append(float(logp.exp().max(-1).values.mean()))
                kl[name].append(float((reference.exp() * (reference - logp)).sum(-1).mean()))
                top1[name].append(float((reference.argmax(-1) == logp.argmax(-1)).float().mean()))
            for name, stepper in hf.items():
                t = time.perf_counter()
                stepper(x)
                times[name].append(time.perf_counter() - t)
    skip = min(2, steps // 4)  # the first steps allocate and warm the kernels
    out = {}
    for name, ts in times.items():
        ts = ts[skip:]
        ratios = [s / t for s, t in zip(times[STOCK][skip:], ts, strict=True)]
        over_default = [t / d for t, d in zip(ts, times[DEFAULT][skip:], strict=True)]
        out[name] = {"ms_per_step": round(1000 * statistics.median(ts), 1),
                     "ms_p90": round(1000 * sorted(ts)[int(0.9 * (len(ts) - 1))], 1),
                     "steps_per_s": round(1 / statistics.median(ts), 2),
                     "speedup_vs_stock": round(statistics.median(ratios), 2),
                     "time_over_default": round(statistics.median(over_default), 3)}
        if name in kl:
            out[name]["mean_kl"] = float(f"{statistics.fmean(kl[name]):.2e}")
            out[name]["top1_agreement"] = round(statistics.fmean(top1[name]), 4)
    return {"steps": steps, "stock_mean_top1_probability": round(statistics.fmean(top_p), 4),
            "floor": bandwidth_floor(ours[STOCK]), "variants": out}


def long_context_probe(context: int, steps: int) -> tp.Dict[str, tp.Any]:
    """Prefill `context` steps at once (what a window past 30 s does with its prompt), then time single steps
    there, round-robin: the per-step cost grows with the context (attention; stock also copies its KV cache each
    step)."""
    variants = audiocraft_variants()
    chosen = {name: variants[name] for name in (STOCK, "fp32 + cross-KV + static KV", FP32_PACKED,
                                                "bf16 + cross-KV + static KV", BF16_DEFAULT, DEFAULT,
                                                DEFAULT_LAYERS_UNDER_AUDIOCRAFT, DEFAULT_PYTHON_LAYER,
                                                DEFAULT_SMALL_PAGES, DEFAULT_FBGEMM,
                                                DEFAULT_FP16_CACHE, DEFAULT_FP32_CACHE, DEFAULT_STOCK_LAYER)}
    cond = conditions(variants[STOCK])
    torch.manual_seed(1)
    tokens = torch.randint(0, debug_models.SMALL_LM["card"], (2, 4, context + steps))
    out: tp.Dict[str, tp.Any] = {"context": context, "steps": steps,
                                 "variants": _at_context(chosen, cond, tokens, context)}
    if PAIR_ATTENTION:
        one_core = _int8_default(variants[STOCK], pair_attention=False, half_kv_cache=False)
        out["pair_attention"] = pair_attention_comparison(variants[DEFAULT_FP32_CACHE], one_core, cond)
    if INT8_KV_CACHE:
        out["int8_cache"] = threads_comparison(variants[DEFAULT], variants[DEFAULT_FP16_CACHE], DEFAULT_FP16_CACHE,
                                               cond)
    if lean_lm.installed(variants[DEFAULT]):
        out["whole_lm"] = threads_comparison(variants[DEFAULT], variants[DEFAULT_LAYERS_UNDER_AUDIOCRAFT],
                                             DEFAULT_LAYERS_UNDER_AUDIOCRAFT, cond)
    return out


def threads_comparison(default: LMModel, other: LMModel, other_name: str, cond: tp.Dict[str, tp.Any],
                       contexts: tp.Sequence[int] = (250, 750, 1400), steps: int = 40) -> tp.Dict[str, tp.Any]:
    """The default and `other` (the variant `other_name`) stepping in turn at each context (paired per step), on this
    run's threads and on every core (a whole clip's threads where nothing else runs): median ms/step and the median
    of `other`'s time / the default's."""
    out: tp.Dict[str, tp.Any] = {"steps": steps, "other": other_name}
    threads = torch.get_num_threads()
    for count in sorted({threads, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(count)
        try:
            out[f"{count}_threads"] = {}
            for context in contexts:
                medians, ratio = _interleaved({"default": default, "other": other}, cond, context, steps)
                out[f"{count}_threads"][context] = {**medians, "other_over_default": ratio}
        finally:
            torch.set_num_threads(threads)
    return out


def pair_attention_comparison(paired: LMModel, one_core: LMModel, cond: tp.Dict[str, tp.Any],
                              contexts: tp.Sequence[int] = (600, 1400), steps: int = 30) -> tp.Dict[str, tp.Any]:
    """The default with and without app/pair_attention.py, stepping in turn at each context (paired per step),
    quiet and with a CPU hog on every core: median ms/step and the median of one core's time / the pair's."""
    out: tp.Dict[str, tp.Any] = {"steps": steps, "one_core": DEFAULT_ONE_CORE}
    for phase in ("quiet", "with_hogs"):
        with hogs(len(os.sched_getaffinity(0))) if phase == "with_hogs" else contextlib.nullcontext():
            out[phase] = {}
            for context in contexts:
                medians, ratio = _interleaved({"pair": paired, "one_core": one_core}, cond, context, steps)
                out[phase][context] = {**medians, "one_core_over_pair": ratio}
    return out


def _interleaved(lms: tp.Dict[str, LMModel], cond: tp.Dict[str, tp.Any], context: int,
                 steps: int) -> tp.Tuple[tp.Dict[str, float], float]:
    """Two LMs prefilled with `context` tokens, then stepping in turn (which goes first alternates): each one's
    median ms/step, and the median over steps of the second's time / the first's."""
    tokens = torch.randint(0, debug_models.SMALL_LM["card"], (2, 4, context + steps),
                           generator=torch.Generator().manual_seed(context))
    _, times = _stepped(lms, cond, tokens, context, alternate=True)
    first, second = times.values()
    ratios = [b / a for a, b in zip(first, second, strict=True)]
    return ({f"{name}_ms": round(1000 * statistics.median(ts), 1) for name, ts in times.items()},
            round(statistics.median(ratios), 3))


def _at_context(lms: tp.Dict[str, LMModel], cond: tp.Dict[str, tp.Any], tokens: torch.Tensor,
                context: int) -> tp.Dict[str, tp.Dict[str, float]]:
    """Each LM's prefill time a token and median step at `context`, stepping round-robin, past the first steps,
    which warm the new caches."""
    prefill, times = _stepped(lms, cond, tokens, context)
    skip = min(2, (tokens.shape[-1] - context) // 4)
    return {name: {"prefill_ms_per_token": round(1000 * prefill[name] / context, 2),
                   "ms_per_step_at_context": round(1000 * statistics.median(times[name][skip:]), 1)} for name in lms}


def _stepped(lms: tp.Dict[str, LMModel], cond: tp.Dict[str, tp.Any], tokens: torch.Tensor, context: int,
             alternate: bool = False) -> tp.Tuple[tp.Dict[str, float], tp.Dict[str, tp.List[float]]]:
    """Prefill the first `context` tokens into each LM, then the rest one step at a time, round-robin (step i of
    every LM, then step i + 1; with `alternate`, in reverse order every other step): each one's prefill time and
    step times, in seconds."""
    steps = tokens.shape[-1] - context
    prefill: tp.Dict[str, float] = {}
    times: tp.Dict[str, tp.List[float]] = {name: [] for name in lms}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for name, lm in lms.items():
            for module in lm.modules():
                if hasattr(module, "static_capacity"):
                    module.static_capacity = context + steps
            stack.enter_context(lm.streaming())
            t = time.perf_counter()
            lm(tokens[..., :context], [], condition_tensors=cond)
            prefill[name] = time.perf_counter() - t
        for i in range(context, context + steps):
            for name, lm in list(lms.items())[::-1 if alternate and i % 2 == 0 else 1]:
                t = time.perf_counter()
                lm(tokens[..., i: i + 1], [], condition_tensors=cond)
                times[name].append(time.perf_counter() - t)
    return prefill, times


def decode_costs(lm_steps: tp.Dict[str, tp.Any], probe: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Extrapolated LM seconds per second of audio at musicgen-small's size, 1 to 60 s.

    Per-step cost c(p) = c0 + slope * p, with c0 the short-context median (steps near 0) and the slope
    from the probe at `context`; each window past 30 s adds its prompt's prefill. The step schedule is
    the service's own (MusicModel.lm_steps), on a 50 Hz model with audiocraft's 30 s windows, 18 s stride.
    """
    frame_rate, max_duration, stride = 50, 30.0, 18.0
    curves: tp.Dict[str, tp.Dict[int, float]] = {}
    for name, at_context in probe["variants"].items():
        c0 = lm_steps["variants"][name]["ms_per_step"] / 1000
        slope = max(0.0, at_context["ms_per_step_at_context"] / 1000 - c0) / probe["context"]
        prefill = at_context["prefill_ms_per_token"] / 1000
        curve = {}
        for duration in range(1, 61):
            total = 0.0
            for prompt, length in _windows(duration, frame_rate, max_duration, stride):
                steps = length + 4  # the delay pattern's extra steps
                total += prefill * prompt + sum(c0 + slope * p for p in range(prompt, steps))
            curve[duration] = round(total / duration, 3)
        curves[name] = curve
    return {"seconds_per_audio_second": curves, "method": decode_costs.__doc__}


def _windows(duration: float, frame_rate: int, max_duration: float, stride: float) -> tp.List[tp.Tuple[int, int]]:
    """(prompt frames, window frames) of each window, as MusicModel.lm_steps walks them."""
    total, stride_frames = int(duration * frame_rate), int(stride * frame_rate)
    windows, offset, prompt = [], 0, 0
    while offset + prompt < total:
        length = int(min(duration - offset / frame_rate, max_duration) * frame_rate)
        windows.append((prompt, length))
        if duration <= max_duration:
            break
        prompt, offset = length - stride_frames, offset + stride_frames
    return windows


def peaked_drift(steps: int, head_scale: float) -> tp.Dict[str, tp.Any]:
    """Drift from fp32 of the lower-precision CPU defaults on peaked distributions (output heads x `head_scale`):
    the same tokens, one step at a time, as in `lm_step_comparison`."""
    chosen = {name: lm for name, lm in audiocraft_variants(head_scale).items()
              if name in (STOCK, BF16_DEFAULT, "bf16-autocast + cross-KV + static KV", DEFAULT, DEFAULT_PYTHON_LAYER,
                          DEFAULT_FP16_CACHE, DEFAULT_FP32_CACHE)}
    cond = conditions(chosen[STOCK])
    torch.manual_seed(0)
    tokens = torch.randint(0, debug_models.SMALL_LM["card"], (1, 4, steps))
    kl: tp.Dict[str, tp.List[float]] = {name: [] for name in chosen if name != STOCK}
    top1: tp.Dict[str, tp.List[float]] = {name: [] for name in kl}
    top_p = []
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for lm in chosen.values():
            stack.enter_context(lm.streaming())
        for step in range(steps):
            x = tokens[..., step: step + 1].repeat(2, 1, 1)
            reference = _cfg_log_probs(chosen[STOCK](x, [], condition_tensors=cond))
            top_p.append(float(reference.exp().max(-1).values.mean()))
            for name in kl:
                logp = _cfg_log_probs(chosen[name](x, [], condition_tensors=cond))
                kl[name].append(float((reference.exp() * (reference - logp)).sum(-1).mean()))
                top1[name].append(float((reference.argmax(-1) == logp.argmax(-1)).float().mean()))
    return {"steps": steps, "head_scale": head_scale, "stock_mean_top1_probability": round(statistics.fmean(top_p), 3),
            "variants": {name: {"mean_kl": float(f"{statistics.fmean(kl[name]):.2e}"),
                                "top1_agreement": round(statistics.fmean(top1[name]), 4)} for name in kl}}
