"""docs/benchmarks.md (tables) and docs/benchmarks.png (plots) from scripts/bench.py's results."""

import typing as tp
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts.bench_lm import DEFAULT  # noqa: E402


def _table(header: tp.Sequence[str], rows: tp.Iterable[tp.Sequence[tp.Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(r: tp.Dict[str, tp.Any], md: Path, png: Path) -> None:
    """From scripts/bench.py's results, fresh or read back from benchmarks.json (where keys are strings)."""
    for curves in (r["decode_costs"]["seconds_per_audio_second"], r["debug_durations"]):
        for name, curve in curves.items():
            curves[name] = {int(d): value for d, value in curve.items()}
    m = r["machine"]
    steps, probe, svc = r["lm_steps"], r["long_context"], r["service"]
    floor = steps["floor"]
    parts = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench.py`" + (" --quick" if r["quick"] else "") + f" in {r['wall_seconds']} s. "
        f"Machine: {m['host']}, CPU {m['cpu']}, {m['cores']} cores (shared with other work), torch {m['torch']} "
        f"with {m['torch_threads']} thread(s), Python {m['python']}, AVX512-BF16 {m['cpu_bf16']}, AMX {m['amx']}; "
        f"{m['date']}. No GPU. Load (`uptime`) at the start and after each section:",
        "",
        "```", *r["uptime"], "```",
        "",
        "Absolute times move with the neighbours' load; the ratios are of figures measured side by side "
        "(interleaved step by step or request by request) and move much less.",
        "",
        f"## LM decoding step, musicgen-small size (random weights, CFG batch 2), {steps['steps']} steps "
        "round-robin",
        "",
        "Speed-up: median over steps of stock's time / the variant's time at the same step. Drift: next-token "
        "distributions (after CFG) vs stock fp32 for the same inputs at every step: mean KL(fp32 || variant) "
        "and top-1 agreement. Random weights give flat distributions (stock's mean top-1 probability: "
        f"{steps['stock_mean_top1_probability']}), where the top-1 token flips on tiny changes; trained weights are "
        "more peaked. transformers' decoder has its own random weights (speed only).",
        "",
        _table(["variant", "ms/step (median)", "p90", "steps/s", "x stock", "mean KL", "top-1 agreement"],
               [[name, v["ms_per_step"], v["ms_p90"], v["steps_per_s"], v["speedup_vs_stock"],
                 v.get("mean_kl", "-"), v.get("top1_agreement", "-")] for name, v in steps["variants"].items()]),
        "",
        f"Memory-bandwidth floor: {floor['ms_per_step']} ms/step ({floor['bf16_weight_mb']} MB of bf16 weights read "
        f"per step at {floor['read_gb_s']} GB/s, the rate of a plain sum over 512 MB in this run); the service's CPU "
        f"default ({DEFAULT}) runs at {steps['variants'][DEFAULT]['ms_per_step'] / floor['ms_per_step']:.1f}x "
        "the floor.",
        "",
        f"## Long context: prefill {probe['context']} steps, then single steps there",
        "",
        _table(["variant", "prefill ms/token", f"ms/step at {probe['context']}"],
               [[name, v["prefill_ms_per_token"], v["ms_per_step_at_context"]]
                for name, v in probe["variants"].items()]),
        "",
        "## LM seconds per second of audio, musicgen-small size, 1 to 60 s (extrapolated; plot, left)",
        "",
        r["decode_costs"]["method"].strip().replace("\n    ", " "),
        "",
        _table(["variant", *[f"{d} s" for d in (1, 10, 30, 60)]],
               [[name, *[curve[d] for d in (1, 10, 30, 60)]]
                for name, curve in r["decode_costs"]["seconds_per_audio_second"].items()]),
        "",
        "## Debug model, bare, seconds of compute per second of audio (measured; plot, middle)",
        "",
        _table(["decoder", *[f"{d} s" for d in r["debug_durations"]["EnCodec"]]],
               [[name, *curve.values()] for name, curve in r["debug_durations"].items()]),
        "",
        "## End to end through gunicorn + SSE / bare `MusicModel.generate` (same model, settings, parameters)",
        "",
        _table(["model, duration", "bare s", "served s", "served - bare s", "ratio (median)", "ratio (max)"],
               [[k, v["bare_s"], v["served_s"], v["overhead_s"], v["ratio"], v["ratio_max"]]
                for k, v in r["end_to_end"].items()]),
        "",
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
        f"![plots]({png.name})",
        "",
    ]
    md.write_text("\n".join(parts))
    _plot(r, png)


def _plot(r: tp.Dict[str, tp.Any], png: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for name, curve in r["decode_costs"]["seconds_per_audio_second"].items():
        axes[0].plot([int(d) for d in curve], list(curve.values()), label=name)
    axes[0].axhline(1.0, color="grey", linestyle=":", label="real time")
    axes[0].set(title="musicgen-small size: LM s per s of audio\n(extrapolated)", xlabel="duration (s)",
                ylabel="seconds per second of audio")
    for name, curve in r["debug_durations"].items():
        axes[1].plot([int(d) for d in curve], list(curve.values()), marker="o", label=name)
    axes[1].set(title="debug model, bare: s per s of audio\n(measured)", xlabel="duration (s)")
    variants = r["lm_steps"]["variants"]
    axes[2].barh(list(variants), [v["steps_per_s"] for v in variants.values()])
    axes[2].set(title="decoding steps/s, musicgen-small size", xlabel="steps per second")
    axes[2].invert_yaxis()
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
