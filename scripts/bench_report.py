"""docs/benchmarks.md (tables) and docs/benchmarks.png (plots) from scripts/bench.py's results."""

import typing as tp
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from app.pair_attention import MIN_KEYS  # noqa: E402
from scripts.bench_lm import BF16_DEFAULT, DEFAULT  # noqa: E402


def _table(header: tp.Sequence[str], rows: tp.Iterable[tp.Sequence[tp.Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


SECTIONS = ("cpu", "contention", "lm_steps", "peaked_drift", "long_context", "decoder", "real_codec_clips",
            "one_thread_clips", "streaming", "debug_durations", "end_to_end", "service")


def write_report(r: tp.Dict[str, tp.Any], md: Path, png: Path) -> None:
    """From scripts/bench.py's results, fresh or read back from benchmarks.json (where keys are strings); a run
    that stopped early (benchmarks.partial.json) gives the sections it reached."""
    for curves in (r.get("decode_costs", {}).get("seconds_per_audio_second", {}), r.get("debug_durations", {})):
        for name, curve in curves.items():
            curves[name] = {int(d): value for d, value in curve.items()}
    m = r["machine"]
    missing = [name for name in SECTIONS if name not in r]
    parts = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench`" + (" --quick" if r["quick"] else "") + f" in {r.get('wall_seconds', '?')} s. "
        f"Machine: {m['host']}, CPU {m['cpu']}, {m['cores']} cores (shared with other work), torch {m['torch']} "
        f"with {m['torch_threads']} thread(s) in the decoding-step sections, Python {m['python']}, AVX512-BF16 "
        f"{m['cpu_bf16']}, AMX {m['amx']}; CPU family {m.get('cpu_family')} model {m.get('cpu_model')} stepping "
        f"{m.get('cpu_stepping')}, flags {', '.join(m.get('cpu_flags') or [])}; transparent huge pages "
        f"`{m.get('transparent_hugepages')}`; OMP_WAIT_POLICY {m.get('omp_wait_policy')}; "
        f"THP_MEM_ALLOC_ENABLE {m.get('thp_mem_alloc_enable')}; {m['date']}. No GPU. "
        "Load (`uptime`) at the start and after each section:",
        "",
        "```", *r["uptime"], "```",
        "",
        "Absolute times move with the neighbours' load; the ratios are of figures measured side by side "
        "(interleaved step by step or request by request) and move much less.",
        "",
        *([f"**This run stopped before these sections: {', '.join(missing)}.**", ""] if missing else []),
        *_cpu_part(r),
        *_lm_part(r),
        *_peaked_part(r),
        *_long_context_part(r),
        *_contention_part(r),
        *_real_codec_part(r),
        *_one_thread_part(r),
        *_streaming_part(r),
        *_service_parts(r),
        f"![plots]({png.name})",
        "",
        "GPU figures (CUDA graph against stock audiocraft, written by `scripts/gpu_check`): "
        "[benchmarks-gpu.md](benchmarks-gpu.md).",
        "",
    ]
    md.write_text("\n".join(parts))
    _plot(r, png)


def _lm_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "lm_steps" not in r:
        return []
    steps = r["lm_steps"]
    floor = steps["floor"]
    return [
        f"## LM decoding step, musicgen-small size (random weights, CFG batch 2), {steps['steps']} steps "
        "round-robin",
        "",
        "Speed-up: median over steps of stock's time / the variant's time at the same step; \"/ default\": the "
        f"median over steps of the variant's time / the default's ({DEFAULT}). Drift: next-token "
        "distributions (after CFG) vs stock fp32 for the same inputs at every step: mean KL(fp32 || variant) "
        "and top-1 agreement. Random weights give flat distributions (stock's mean top-1 probability: "
        f"{steps['stock_mean_top1_probability']}), where the top-1 token flips on tiny changes; trained weights are "
        "more peaked. transformers' decoder has its own random weights (speed only).",
        "",
        _table(["variant", "ms/step (median)", "p90", "steps/s", "x stock", "/ default", "mean KL", "top-1 agreement"],
               [[name, v["ms_per_step"], v["ms_p90"], v["steps_per_s"], v["speedup_vs_stock"],
                 v.get("time_over_default", "-"), v.get("mean_kl", "-"), v.get("top1_agreement", "-")]
                for name, v in steps["variants"].items()]),
        "",
        f"Memory-bandwidth floor: {floor['ms_per_step']} ms/step in bf16 ({floor['bf16_weight_mb']} MB of bf16 "
        f"weights read per step at {floor['read_gb_s']} GB/s, the rate of a plain sum over 512 MB in this run), "
        f"{floor.get('int8_ms_per_step', '-')} ms/step in int8. The service's CPU default where the CPU has VNNI "
        f"({DEFAULT}) runs at {_x(steps, DEFAULT, floor['ms_per_step'])}x the bf16 floor and "
        f"{steps['variants'][DEFAULT]['speedup_vs_stock']}x stock's steps/s; the default where bf16 is native but "
        f"VNNI is not ({BF16_DEFAULT}) at {_x(steps, BF16_DEFAULT, floor['ms_per_step'])}x the bf16 floor.",
        "",
    ]


def _long_context_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "long_context" not in r or "decode_costs" not in r:
        return []
    probe = r["long_context"]
    pair = probe.get("pair_attention")
    split = [] if pair is None else [
        "With the fp32 key/value cache (MUSICGEN_HALF_KV_CACHE=0: the fp16 cache's own kernel takes attention "
        "otherwise), self-attention splits the CFG pair across two cores once the context passes "
        f"{MIN_KEYS} steps (app/pair_attention.py). That and \"{pair['one_core']}\" stepping in turn, {pair['steps']} "
        "steps at each context; the last column is the median over steps of one core's time / the pair's:",
        "",
        _table(["context", "cores", "pair ms/step", "one core ms/step", "one core / pair"],
               [[context, phase.replace("_", " "), v["pair_ms"], v["one_core_ms"], v["one_core_over_pair"]]
                for phase in ("quiet", "with_hogs") for context, v in pair[phase].items()]),
        ""]
    int8_cache = _threads_comparison(
        probe.get("int8_cache"), "The default's self-attention cache in int8 (app/int8_kv_cache.py) and in fp16",
        "the fp16 cache's time / the int8 cache's", ["int8 ms/step", "fp16 ms/step", "fp16 / int8"])
    whole_lm = _threads_comparison(
        probe.get("whole_lm"), "The default's LM step in one call (app/lean_lm.py) and its layers' steps called one "
        "by one under audiocraft's LM", "the layers' time / the whole step's",
        ["whole step ms/step", "layers ms/step", "layers / whole"])
    return [
        f"## Long context: prefill {probe['context']} steps, then single steps there",
        "",
        f"Every variant prefilled, then {probe.get('steps', '-')} single steps of each in turn (step i of every "
        "variant, then step i + 1); the median step past the first two, which warm the new caches.",
        "",
        _table(["variant", "prefill ms/token", f"ms/step at {probe['context']}"],
               [[name, v["prefill_ms_per_token"], v["ms_per_step_at_context"]]
                for name, v in probe["variants"].items()]),
        "",
        *int8_cache,
        *whole_lm,
        *split,
        "## LM seconds per second of audio, musicgen-small size, 1 to 60 s (extrapolated; plot, left)",
        "",
        r["decode_costs"]["method"].strip().replace("\n    ", " "),
        "",
        _table(["variant", *[f"{d} s" for d in (1, 10, 30, 60)]],
               [[name, *[curve[d] for d in (1, 10, 30, 60)]]
                for name, curve in r["decode_costs"]["seconds_per_audio_second"].items()]),
        "",
    ]


def _threads_comparison(c: tp.Optional[tp.Dict[str, tp.Any]], what: str, ratio: str,
                        columns: tp.List[str]) -> tp.List[str]:
    """A `threads_comparison` (scripts/bench_lm.py) as a paragraph and a table."""
    if c is None:
        return []
    return [
        f"{what} (\"{c['other']}\"), stepping in turn (which goes first alternates), {c['steps']} steps at each "
        "context, on this run's threads and on every core (a whole clip's threads where nothing else runs); the last "
        f"column is the median over steps of {ratio}:",
        "",
        _table(["context", "threads", *columns],
               [[context, key.split("_")[0], v["default_ms"], v["other_ms"], v["other_over_default"]]
                for key in sorted(k for k in c if k.endswith("_threads")) for context, v in c[key].items()]),
        ""]


def _service_parts(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    parts: tp.List[str] = []
    if "debug_durations" in r:
        parts += [
            "## Debug model, bare, seconds of compute per second of audio (measured; plot, middle)",
            "",
            _table(["decoder", *[f"{d} s" for d in r["debug_durations"]["EnCodec"]]],
                   [[name, *curve.values()] for name, curve in r["debug_durations"].items()]),
            "",
        ]
    if "end_to_end" in r:
        parts += [
            "## End to end through gunicorn + SSE / bare `MusicModel.generate` (same model, settings, parameters)",
            "",
            _table(["model, duration", "bare s", "served s", "served - bare s", "ratio (median)", "ratio (max)"],
                   [[k, v["bare_s"], v["served_s"], v["overhead_s"], v["ratio"], v["ratio_max"]]
                    for k, v in r["end_to_end"].items()]),
            "",
        ]
    if "service" in r:
        svc = r["service"]
        parts += [
            "## Service latencies (debug model)",
            "",
            _table(["figure", "value"], [
                [f"503 while busy, {svc['busy_503']['n']} tries", f"p50 {svc['busy_503']['p50_ms']} ms, "
                 f"p99 {svc['busy_503']['p99_ms']} ms, max {svc['busy_503']['max_ms']} ms"],
                [f"POST to `start` event, {svc['time_to_start']['n']} tries",
                 f"p50 {svc['time_to_start']['p50_ms']} ms, p99 {svc['time_to_start']['p99_ms']} ms"],
                [f"disconnect to slot free, {svc['disconnect_to_free']['n']} tries",
                 f"median {svc['disconnect_to_free']['median_s']} s, max {svc['disconnect_to_free']['max_s']} s "
                 f"(keep-alive {svc['disconnect_to_free']['keepalive_s']} s)"],
                [f"worker RSS over {svc['rss_mib']['n']} sequential requests",
                 f"first {svc['rss_mib']['first']} MiB, after 5 {svc['rss_mib']['after_5']} MiB, "
                 f"last {svc['rss_mib']['last']} MiB: drift {100 * svc['rss_mib']['drift_after_warmup']:.1f} % "
                 "(GPU memory: no GPU here)"],
            ]),
            "",
        ]
    return parts


def _x(steps: tp.Dict[str, tp.Any], name: str, floor_ms: float) -> str:
    return f"{steps['variants'][name]['ms_per_step'] / floor_ms:.2f}"


def _cpu_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    """Why the same code runs at different speeds on different machines: the kernels and their read rates."""
    if "cpu" not in r:
        return []
    cpu, rates = r["cpu"], r["cpu"]["rates"]
    kernels = ", ".join(f"{kind}: `{impl}`" for kind, impl in cpu["onednn"]["kernels"].items())
    return [
        "## The CPU, its kernels and how fast they read weights (1 thread, round-robin)",
        "",
        f"oneDNN dispatches to {cpu['onednn']['isa']}; kernels (ONEDNN_VERBOSE): {kernels}. The service's int8 "
        "products run PyTorch's x86 dynamic quantization's maths on the service's own AVX512-VNNI kernel "
        "(app/int8_kernel.py) where it builds, else on fbgemm's kernels (VNNI where the CPU has it), not "
        "oneDNN's: oneDNN's own int8 path (above) ran slower per call in this service's 2-row products.",
        "",
        f"The 6 products of each of {rates['layers']} layers with distinct weights ({rates['weights_mb']['bf16']} MB "
        f"in bf16, {rates['weights_mb']['int8']} MB in int8), 2 rows (the CFG pair), streamed from memory as a "
        "decoding step reads them, and the same kernels on one layer's weights run as many times (hot: in the "
        f"cache, what the kernel computes at when memory is not in the way). A plain sum read {rates['sum_gb_s']} "
        "GB/s in this run.",
        "",
        _table(["kernel", "ms", "weights read GB/s", "share of the sum's rate"],
               [[name, v["ms"], v["gb_s"], v["share_of_sum_rate"]] for name, v in rates["products"].items()]),
        "",
    ]


def _peaked_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "peaked_drift" not in r:
        return []
    p = r["peaked_drift"]
    return [
        f"## Drift on peaked distributions (output heads x {p['head_scale']}), {p['steps']} steps",
        "",
        "Random weights give near-flat distributions, which hide errors; scaling the output heads makes them "
        f"peaked like a trained model's (stock's mean top-1 probability here: {p['stock_mean_top1_probability']}). "
        "It sharpens the output only: the activation outliers of trained weights are not modelled.",
        "",
        _table(["variant", "mean KL vs fp32", "top-1 agreement"],
               [[name, v["mean_kl"], v["top1_agreement"]] for name, v in p["variants"].items()]),
        "",
    ]


def _contention_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "contention" not in r:
        return []
    c = r["contention"]
    rows = [[name, c["torch_threads"][name], c["seconds"]["quiet"][name], c["seconds"]["contended"][name],
             c["contended_over_best_quiet"][name]] for name in c["seconds"]["quiet"]]
    return [
        f"## Under contention: a {c['clip_seconds']} s {c['model']} clip, quiet and with a CPU hog on each of the "
        f"{c['cores']} cores",
        "",
        f"Each setting in its own process (OpenMP reads its wait policy once), generating on one long-lived thread "
        f"as the service does; medians of {c['rounds']} round(s), round-robin. A run is stopped at "
        f"{c['cap_seconds']} s (a collapsing setting would take minutes): that figure means \"at least\". A fair "
        "share of the cores is half, so 2x the quiet time is what sharing costs; the goal is at most 2.5x.",
        "",
        _table(["setting", "torch threads", "quiet s", "with hogs s", "with hogs / best quiet"], rows),
        "",
    ]


def _real_codec_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "real_codec_clips" not in r:
        return []
    d, c = r["decoder"], r["real_codec_clips"]
    return [
        "## End to end with a real-size EnCodec decoder (musicgen-small-sized LM)",
        "",
        f"transformers' EncodecModel from facebook/encodec_32khz's configuration, random weights "
        f"({d['parameters_m']} M parameters). Its decoder on {d['seconds']} s of tokens, fp32 vs the service's "
        f"default ({d['default']}), round-robin: {d['speedup']}x faster, relative squared error "
        f"{d['relative_squared_error']}; seconds per second of audio: "
        + ", ".join(f"{name} {v}" for name, v in d["s_per_audio_s"].items()) + ".",
        "",
        "Whole clips in a process of their own, as the service's worker, with its defaults "
        f"(LM {c['precision']}, decoder {c['decoder']}, {c['threads']} torch "
        f"thread(s){' while no other process uses the cores' if c.get('shares_cores') else ''}) and that decoder. "
        "debug-small conditions on a look-up table: the text encoding is a t5-base-sized encoder (random weights) "
        "timed apart on a 12-token prompt and added. The clips run in turn; each row is a clip's run of median total "
        "time, the next column every run's compute per audio second. The last column: the torch threads at the "
        "clip's end (1 where the threads policy found another process on the cores during the clip and went on on "
        "one thread).",
        "",
        _table(["clip", "text (T5-base size) s", "LM s", "LM ms/step", "EnCodec s", "WAV s", "total s",
                "compute s per audio s", "every run", "threads at the end"],
               [[k, v["t5_s"], v["lm_s"], v["lm_ms_per_step"], v["decode_s"], v["wav_s"], v["total_s"],
                 v["s_per_audio_s"], ", ".join(map(str, v.get("s_per_audio_s_runs", [v["s_per_audio_s"]]))),
                 v.get("threads_at_end", "-")] for k, v in c["clips"].items()]),
        "",
    ]


def _one_thread_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "one_thread_clips" not in r or "real_codec_clips" not in r:
        return []
    runs = {"1 thread": r["one_thread_clips"], "defaults": r["real_codec_clips"]}
    rows = [[name, run["threads"], clip, v["lm_ms_per_step"], v["decode_s"], v["total_s"], v["s_per_audio_s"]]
            for name, run in runs.items() for clip, v in run["clips"].items()]
    speedups = {clip: round(v["total_s"] / runs["defaults"]["clips"][clip]["total_s"], 2)
                for clip, v in runs["1 thread"]["clips"].items()}
    return [
        "### The same clips on one torch thread",
        "",
        "`MUSICGEN_CPU_THREADS=1`, in a process of its own as the defaults' run above, after it, on cores nothing "
        "else used (the defaults took every core, OpenMP's threads spinning between products). The defaults' "
        "speed-up over one thread, total time: " + ", ".join(f"{clip} {x}x" for clip, x in speedups.items()) + ".",
        "",
        _table(["setting", "torch threads", "clip", "LM ms/step", "EnCodec s", "total s", "compute s per audio s"],
               rows),
        "",
    ]


def _streaming_part(r: tp.Dict[str, tp.Any]) -> tp.List[str]:
    if "streaming" not in r:
        return []
    c = r["streaming"]
    return [
        "## Audio while it is made (`stream_audio`)",
        "",
        f"The same whole jobs (musicgen-small-sized LM, real-size EnCodec, LM {c['precision']}, decoder "
        f"{c['decoder']}, {c['threads']} torch thread(s)"
        f"{' while no other process uses the cores' if c.get('shares_cores') else ''}; text encoding not included) "
        "with and without streaming, "
        f"alternating, same seed, {c['repeats']} repeat(s): time to the first audio event and to the finished "
        "WAV. The cost is the median paired ratio of the times to the WAV, less one (goal: at most 5 %).",
        "",
        _table(["clip", "first audio s", "WAV, streamed s", "WAV, not streamed s", "chunks", "cost of streaming"],
               [[k, v["first_audio_s"], v["completed_streamed_s"], v["completed_plain_s"], v["chunks"],
                 f"{100 * v['streaming_cost']:+.1f} %"] for k, v in c["clips"].items()]),
        "",
    ]


def _plot(r: tp.Dict[str, tp.Any], png: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for name, curve in r.get("decode_costs", {}).get("seconds_per_audio_second", {}).items():
        axes[0].plot([int(d) for d in curve], list(curve.values()), label=name)
    axes[0].axhline(1.0, color="grey", linestyle=":", label="real time")
    axes[0].set(title="musicgen-small size: LM s per s of audio\n(extrapolated)", xlabel="duration (s)",
                ylabel="seconds per second of audio")
    for name, curve in r.get("debug_durations", {}).items():
        axes[1].plot([int(d) for d in curve], list(curve.values()), marker="o", label=name)
    axes[1].set(title="debug model, bare: s per s of audio\n(measured)", xlabel="duration (s)")
    variants = r.get("lm_steps", {}).get("variants", {})
    axes[2].barh(list(variants), [v["steps_per_s"] for v in variants.values()])
    axes[2].set(title="decoding steps/s, musicgen-small size", xlabel="steps per second")
    axes[2].invert_yaxis()
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
