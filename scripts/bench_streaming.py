#!/usr/bin/env python
"""What streaming audio costs: incremental decoding (app/stream_decode.py) plus levelling (app/stream_level.py)
against the one final EnCodec decode it replaces, on the real-size 32 kHz EnCodec (transformers' EncodecModel as
facebook/encodec_32khz is configured, random weights, codebooks filled), on one thread.

    .venv/bin/python scripts/bench_streaming.py            # 10 s and 30 s mono, 10 s stereo, 3 repeats (~5 min)
    .venv/bin/python scripts/bench_streaming.py --quick    # 1 repeat

`streaming_costs()` (decoding alone) and `streamed_clips()` (whole jobs at musicgen-small size, with and without
streaming) are sections scripts/bench.py calls. Frames are pushed one at a time, as the LM
completes them; full and streamed decodes alternate (the cores are shared: paired ratios, not absolute times).
The job-time figure assumes an LM that takes `lm_seconds` per second of audio: 1.0 is real time (20 ms/step at
50 Hz), 3.2 is the default speed-ups measured on this machine (64 ms/step).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import torch  # noqa: E402
from audiocraft.data.audio_utils import normalize_audio  # noqa: E402
from audiocraft.models.encodec import InterleaveStereoCompressionModel  # noqa: E402

from app import codec as codec_precision  # noqa: E402
from app.audio import DEMO_LOUDNESS  # noqa: E402
from app.stream_decode import IncrementalDecoder, Plan  # noqa: E402
from app.stream_level import Leveler  # noqa: E402
from scripts.bench_e2e import real_size_encodec, use_real_size_encodec  # noqa: E402


def real_size_codec(stereo: bool = False) -> tp.Any:
    """facebook/encodec_32khz's architecture at full size with random weights (scripts/bench_e2e.py), mono or as
    the interleaved stereo codec."""
    codec = real_size_encodec().eval()
    return InterleaveStereoCompressionModel(codec) if stereo else codec


def _stream(plan: Plan, codes: torch.Tensor, rate: int, frame_rate: int) -> tp.Dict[str, tp.Any]:
    decoder, leveler = IncrementalDecoder(plan, frame_rate), Leveler(rate)
    stalls, level_seconds, chunks = [], 0.0, []
    started = time.perf_counter()
    for t in range(codes.shape[-1] + 1):
        before = time.perf_counter()
        segments = decoder.push(codes[..., t:t + 1]) if t < codes.shape[-1] else decoder.finish()
        for audio, _ in segments:
            level_start = time.perf_counter()
            chunks.append(leveler(audio[0]))
            level_seconds += time.perf_counter() - level_start
        if segments:
            stalls.append(time.perf_counter() - before)
    return {"seconds": time.perf_counter() - started, "level_seconds": level_seconds, "stalls": stalls,
            "clip": decoder.clip(), "streamed": torch.cat(chunks, dim=-1)}


def _figures(full: torch.Tensor, streamed: tp.Dict[str, tp.Any], hop: int, frame_rate: int,
             rate: int) -> tp.Dict[str, float]:
    clip, out = streamed["clip"], streamed["streamed"]
    half = out.shape[-1] // 2
    error = (clip - full).pow(2).sum().clamp_min(1e-30)
    step = out.diff(dim=-1).abs()
    boundaries = range(frame_rate * hop, out.shape[-1], frame_rate * hop)
    # a seam's jump against the largest other sample-to-sample change in the second around it (1 = as large)
    seams = [float((step[..., b - 1] / torch.cat([step[..., max(0, b - 16000):b - 1], step[..., b:b + 16000]],
                                                  dim=-1).amax(dim=-1)).max()) for b in boundaries]
    final = normalize_audio(clip[0], strategy="loudness", sample_rate=rate, **DEMO_LOUDNESS)  # app/audio.py's
    return {"max_abs_diff_vs_full_decode": float((clip - full).abs().max()),
            "snr_db_vs_full_decode": round(10 * math.log10(float(full.pow(2).sum() / error)), 1),
            "worst_seam_jump_over_local_max_step": round(max(seams), 3),
            "stream_peak": round(float(out.abs().max()), 4),
            "levelled_stream_vs_final_normalized_snr_db": round(10 * math.log10(
                float(final.pow(2).sum() / (final - out).pow(2).sum().clamp_min(1e-30))), 1),
            "levelled_stream_vs_final_normalized_last_half_snr_db": round(10 * math.log10(
                float(final[..., half:].pow(2).sum() / (final - out)[..., half:].pow(2).sum().clamp_min(1e-30))), 1)}


def streaming_costs(durations: tp.Sequence[float] = (10, 30), stereo_durations: tp.Sequence[float] = (10,),
                    repeats: int = 3, lm_seconds: tp.Sequence[float] = (1.0, 3.2),
                    decoder_precision: str = "fp32") -> tp.Dict[str, tp.Any]:
    """Per case: seconds of one full decode and of streaming (decode + level), their ratio, the longest stall of
    the LM at a chunk, exactness and seam figures, and the added share of a whole job's time. `decoder_precision`
    as MUSICGEN_DECODER_PRECISION (app/codec.py; `auto` is bf16 where the CPU has it natively)."""
    results: tp.Dict[str, tp.Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "cases": {},
                                     "decoder_precision": decoder_precision}
    for stereo, cases in ((False, durations), (True, stereo_durations)):
        if not cases:
            continue
        codec = real_size_codec(stereo)
        results["decoder_precision"] = codec_precision.apply(codec, decoder_precision, "cpu")
        started = time.perf_counter()
        plan = Plan.of(codec)
        results["plan_seconds"] = round(time.perf_counter() - started, 3)
        frame_rate, rate = int(codec.frame_rate), codec.sample_rate
        for duration in cases:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                codes = torch.randint(0, codec.cardinality, (1, codec.num_codebooks, int(duration * frame_rate)))
            fulls, streams = [], []
            with torch.inference_mode():
                for _ in range(repeats):
                    started = time.perf_counter()
                    full = codec.decode(codes)
                    fulls.append(time.perf_counter() - started)
                    streamed = _stream(plan, codes, rate, frame_rate)
                    streams.append(streamed)
            full_s = statistics.median(fulls)
            stream_s = statistics.median(s["seconds"] for s in streams)
            added = stream_s - full_s
            results["cases"][f"{'stereo' if stereo else 'mono'} {duration:g} s"] = {
                "full_decode_s": round(full_s, 3), "streaming_s": round(stream_s, 3),
                "of_which_level_s": round(statistics.median(s["level_seconds"] for s in streams), 3),
                "ratio": round(stream_s / full_s, 3),
                "ratios_per_repeat": [round(s["seconds"] / f, 3) for s, f in zip(streams, fulls, strict=True)],
                "longest_stall_s": round(max(max(s["stalls"]) for s in streams), 3),
                "added_share_of_job": {f"lm {lm:g} s/s": round(added / (lm * duration + full_s), 4)
                                       for lm in lm_seconds},
                **_figures(full, streams[-1], plan.hop, frame_rate, rate)}
    return results


def streamed_clips(durations: tp.Sequence[int] = (10, 30), repeats: int = 1) -> tp.Dict[str, tp.Any]:
    """Whole jobs as the service runs them (debug-small: musicgen-small's LM size; the real-size EnCodec; the
    service's defaults and threads), each clip with and without `stream_audio`, alternating, same seed (streaming
    draws no random numbers: the same music): time to first audio and to the finished WAV, and the cost of
    streaming as the paired ratio of the times to the WAV. The text encoder is not included (the same for both)."""
    from app import threads
    from app.audio import pcm16, to_wav
    from app.config import Settings
    from app.model import MusicModel
    from app.params import GenerationParams

    settings = Settings(model="debug-small", device="cpu", mbd_model="debug")
    before = torch.get_num_threads()
    policy = threads.CpuThreads(settings.cpu_threads)
    used = policy.apply()
    try:
        model = MusicModel.from_settings(settings)
        decoder = use_real_size_encodec(model, settings.decoder_precision)
        model.generate(GenerationParams(description="warm", duration=1), 1, lambda stage: None)
        out: tp.Dict[str, tp.Any] = {}
        for duration in durations:
            params = GenerationParams(description="90s rock song", duration=duration, seed=1234)
            runs: tp.Dict[str, tp.List[tp.Dict[str, float]]] = {"plain": [], "streamed": []}
            for _ in range(repeats):
                for kind in runs:
                    runs[kind].append(_job(model, params, settings.normalize, kind == "streamed", policy, pcm16,
                                           to_wav))
            plain, streamed = runs["plain"], runs["streamed"]
            ratios = [s["completed_s"] / p["completed_s"] for s, p in zip(streamed, plain, strict=True)]
            out[f"{duration} s"] = {
                "first_audio_s": round(statistics.median(s["first_audio_s"] for s in streamed), 2),
                "completed_streamed_s": round(statistics.median(s["completed_s"] for s in streamed), 2),
                "completed_plain_s": round(statistics.median(p["completed_s"] for p in plain), 2),
                "chunks": streamed[-1]["chunks"],
                "streaming_cost": round(statistics.median(ratios) - 1, 4),
                "ratios_per_repeat": [round(r, 4) for r in ratios]}
    finally:
        torch.set_num_threads(before)
    return {"threads": used, "shares_cores": policy.shares, "precision": settings.precision, "decoder": decoder,
            "repeats": repeats, "clips": out}


def _job(model: tp.Any, params: tp.Any, level: str, stream: bool, policy: tp.Any, pcm16: tp.Callable[..., bytes],
         to_wav: tp.Callable[..., bytes]) -> tp.Dict[str, float]:
    """One job to its WAV; streamed, its chunks converted to the events' 16-bit PCM as the service does; the threads'
    policy (app/threads.py) told of it as the service tells it."""
    started = time.perf_counter()
    policy.begin()
    first: tp.List[float] = []

    def on_audio(chunk: torch.Tensor, start: int) -> None:
        pcm16(chunk)
        first.append(time.perf_counter() - started)

    extra = {"on_audio": on_audio, "level": level} if stream else {}
    wav = model.generate(params, params.seed, policy.on_step, **extra)
    to_wav(wav, model.sample_rate, level)
    return {"completed_s": time.perf_counter() - started, "first_audio_s": first[0] if first else float("nan"),
            "chunks": len(first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--decoder-precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--durations", type=float, nargs="*", default=[10, 30], help="mono clips, seconds")
    parser.add_argument("--stereo-durations", type=float, nargs="*", default=[10], help="stereo clips, seconds")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = streaming_costs(args.durations, args.stereo_durations, repeats=1 if args.quick else 3,
                              decoder_precision=args.decoder_precision)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
