#!/usr/bin/env python
"""Benchmark the service against bare audiocraft, side by side in one run; writes docs/benchmarks.{md,png,json}.

    scripts/bench            # the full run (65 minutes on 2 cores at a load of 5-15), after setting up .venv
    scripts/bench --quick    # a smoke run, fewer steps and repeats

Every comparison is a ratio or a distribution of figures measured in the same run, interleaved where
possible (the cores are shared, so absolute times move with the neighbours' load; ratios of paired
measurements move much less). Nothing here is a pass/fail gate.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the decoding-step comparisons (OMP_NUM_THREADS), default 1, so that "
                             "they compare kernels, not thread scaling; the end-to-end, contention and server "
                             "sections run the service's own setting (MUSICGEN_CPU_THREADS)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where benchmarks.md/.png/.json go")
    parser.add_argument("--report-from", metavar="JSON",
                        help="only write benchmarks.md/.png from a run's results (benchmarks.json, or the "
                             "benchmarks.partial.json of a run that stopped early)")
    return parser.parse_args()


ARGS = parse_args()
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)  # before torch is imported

import torch  # noqa: E402

from app import fast_lm  # noqa: E402
from scripts.bench_cpu import cpu_identity, cpu_section  # noqa: E402
from scripts.bench_e2e import clips_apart, decoder_precisions  # noqa: E402
from scripts.bench_lm import decode_costs, lm_step_comparison, long_context_probe, peaked_drift  # noqa: E402
from scripts.bench_report import write_report  # noqa: E402
from scripts.bench_service import debug_durations, end_to_end, service_latencies  # noqa: E402
from scripts.bench_streaming import streamed_clips  # noqa: E402
from scripts.bench_threads import contention  # noqa: E402


def machine() -> tp.Dict[str, tp.Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    identity = cpu_identity()
    return {"host": platform.node(), "cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_family": identity.get("cpu family"), "cpu_model": identity.get("model"),
            "cpu_stepping": identity.get("stepping"), "cpu_flags": identity.get("flags"),
            "transparent_hugepages": identity.get("transparent_hugepages"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "torch_threads": ARGS.threads, "python": platform.python_version(),
            "cpu_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    if ARGS.report_from:
        out = Path(ARGS.out)
        write_report(json.loads(Path(ARGS.report_from).read_text()), out / "benchmarks.md", out / "benchmarks.png")
        return
    torch.set_num_threads(ARGS.threads)
    quick = ARGS.quick
    started = time.monotonic()
    results: tp.Dict[str, tp.Any] = {"machine": machine(), "quick": quick, "uptime": [uptime()]}
    print(json.dumps(results["machine"]), "\n", uptime(), flush=True)

    partial = Path(ARGS.out) / "benchmarks.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn: tp.Callable[[], tp.Any]) -> None:
        t = time.monotonic()
        results[name] = fn()
        gc.collect()  # the section's models: a later section's processes need the memory
        fast_lm.return_freed_memory()
        results["uptime"].append(uptime())
        partial.write_text(json.dumps(results, indent=1, default=str))  # kept if a later section fails
        print(f"== {name} ({time.monotonic() - t:.0f} s) {results['uptime'][-1]}", flush=True)
        print(json.dumps(results[name], default=str)[:1500], flush=True)

    section("cpu", cpu_section)
    section("contention", lambda: contention(rounds=1 if quick else 3))  # processes of their own: run while small
    section("lm_steps", lambda: lm_step_comparison(steps=12 if quick else 100))
    section("peaked_drift", lambda: peaked_drift(steps=8 if quick else 40, head_scale=8.0))
    section("long_context", lambda: long_context_probe(context=96 if quick else 600, steps=4 if quick else 12))
    results["decode_costs"] = decode_costs(results["lm_steps"], results["long_context"])
    section("decoder", lambda: decoder_precisions(seconds=2 if quick else 10))
    section("real_codec_clips", lambda: clips_apart([2] if quick else [10, 30], {}, 1 if quick else 3))
    section("one_thread_clips", lambda: clips_apart([2] if quick else [10, 30], {"MUSICGEN_CPU_THREADS": "1"}))
    section("streaming", lambda: streamed_clips([2] if quick else [10, 30], repeats=1 if quick else 2))
    section("debug_durations", lambda: debug_durations([1, 5] if quick else [1, 5, 10, 20, 30, 45, 60]))
    section("end_to_end", lambda: end_to_end(
        {"debug": [1, 5] if quick else [1, 5, 10], "debug-small": [1] if quick else [1, 2]},
        repeats=1 if quick else 3))
    section("service", lambda: service_latencies(busy_tries=30 if quick else 200, start_tries=5 if quick else 20,
                                                 disconnects=2 if quick else 5, rss_requests=10 if quick else 50))
    results["wall_seconds"] = round(time.monotonic() - started)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(results, out / "benchmarks.md", out / "benchmarks.png")
    partial.unlink()
    print(f"wrote {out / 'benchmarks.md'} and benchmarks.png in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
