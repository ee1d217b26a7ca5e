"""End to end at musicgen-small's size with a real-size EnCodec decoder, for scripts/bench.py.

`debug-small` has the real LM's size but a cheap EnCodec, which would hide the decoder's cost: here its codec is
replaced by transformers' EncodecModel built from facebook/encodec_32khz's configuration (random weights, the
real 58 M parameters; what audiocraft loads for the released checkpoints). The T5-base text encoder cannot be
downloaded either (debug-small conditions on a look-up table): a T5-base-sized encoder with random weights is
timed on a prompt apart and added. Settings are the service's defaults (threads included).

`clips_apart` runs them in a process of its own, as the service's worker is (what scripts/bench.py does, with the
defaults and on one torch thread):

    .venv/bin/python -m scripts.bench_e2e 10 30 --repeats=3   # the clips, on the settings in the environment
"""

import functools
import json
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import torch
from audiocraft.models.encodec import HFEncodecCompressionModel

from app import codec, threads
from app.audio import to_wav
from app.config import Settings
from app.model import MusicModel
from app.params import GenerationParams
from scripts.bench_threads import child_environment

# facebook/encodec_32khz's config.json, as transformers reads it.
ENCODEC_32KHZ = dict(audio_channels=1, chunk_length_s=None, codebook_dim=128, codebook_size=2048, compress=2,
                     dilation_growth_rate=2, hidden_size=128, kernel_size=7, last_kernel_size=7,
                     norm_type="weight_norm", normalize=False, num_filters=64, num_lstm_layers=2,
                     num_residual_layers=1, overlap=None, pad_mode="reflect", residual_kernel_size=3,
                     sampling_rate=32000, target_bandwidths=[2.2], trim_right_ratio=1.0,
                     upsampling_ratios=[8, 5, 4, 4], use_causal_conv=False, use_conv_shortcut=False)
ROOT = Path(__file__).resolve().parents[1]
# t5-base's encoder.
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)


def real_size_encodec(seed: int = 0) -> HFEncodecCompressionModel:
    from transformers import EncodecConfig, EncodecModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel(EncodecConfig(**ENCODEC_32KHZ)).eval()
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()  # zeros (the initial value) decode to silence
    return HFEncodecCompressionModel(model)


def use_real_size_encodec(model: MusicModel, precision: str) -> str:
    """Put the real-size EnCodec in `model` in the service's decoder `precision` (returned as applied), and plan its
    incremental decoding, which streams and clips decoded in pieces (app/model.py) run on: a plan measured on the
    codec it replaces would decode with that one."""
    model.musicgen.compression_model = real_size_encodec()
    applied = codec.apply(model.musicgen.compression_model, precision, "cpu")
    model.plan_streaming()
    return applied


def decoder_precisions(seconds: int = 10, reps: int = 3) -> tp.Dict[str, tp.Any]:
    """The real-size decoder in fp32 and in the service's default precision, round-robin on the same codes."""
    default = codec.resolve(Settings().decoder_precision, "cpu")
    variants = {"fp32": real_size_encodec(), default: real_size_encodec()}
    codec.apply(variants[default], default, "cpu")
    codes = torch.randint(0, 2048, (1, 4, 50 * seconds), generator=torch.Generator().manual_seed(1))
    times: tp.Dict[str, tp.List[float]] = {name: [] for name in variants}
    out = {}
    with torch.inference_mode():
        for _ in range(reps):
            for name, model in variants.items():
                t = time.perf_counter()
                out[name] = model.decode(codes)
                times[name].append(time.perf_counter() - t)
    error = float((out[default] - out["fp32"]).pow(2).mean() / out["fp32"].pow(2).mean())
    ratios = [f / d for f, d in zip(times["fp32"], times[default], strict=True)]
    return {"seconds": seconds, "parameters_m": round(sum(p.numel() for p in variants["fp32"].parameters()) / 1e6, 1),
            "default": default, "relative_squared_error": float(f"{error:.2e}"),
            "speedup": round(statistics.median(ratios), 2),
            "s_per_audio_s": {name: round(statistics.median(ts) / seconds, 3) for name, ts in times.items()}}


def t5_encoding(reps: int = 5) -> float:
    """Seconds to encode a 12-token prompt (and the CFG batch's empty one) with a t5-base-sized encoder."""
    from transformers import T5Config, T5EncoderModel
    model = T5EncoderModel(T5Config(**T5_BASE)).eval()
    tokens = torch.randint(0, T5_BASE["vocab_size"], (2, 12))
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=tokens)
            times.append(time.perf_counter() - t)
    return round(statistics.median(times[1:]), 3)


def _mark(marks: tp.Dict[str, float], policy: threads.CpuThreads, stage: str) -> None:
    """The time each stage last stepped (the last LM step ends the LM, the decoding step the decoding), and the
    threads' policy told of each step, as the service tells it."""
    marks[stage] = time.perf_counter()
    policy.on_step(stage)


def clips(durations: tp.Sequence[int], cpu_threads: int = Settings.cpu_threads,
          repeats: int = 1) -> tp.Dict[str, tp.Any]:
    """Compute time per stage of each clip, on the service's defaults with the real-size decoder; with `repeats`,
    the clips in turn that many times, each clip's figures those of its run of median total time, with every run's
    seconds per second of audio beside them (this machine's neighbours move a whole clip by 10-30 %)."""
    settings = Settings(model="debug-small", device="cpu", mbd_model="debug", cpu_threads=cpu_threads)
    before = torch.get_num_threads()
    policy = threads.CpuThreads(settings.cpu_threads)
    used = policy.apply()
    try:
        t5 = t5_encoding()
        model = MusicModel.from_settings(settings)
        decoder = use_real_size_encodec(model, settings.decoder_precision)
        model.generate(GenerationParams(description="warm", duration=1, seed=1), 1, lambda stage: None)
        runs: tp.Dict[str, tp.List[tp.Dict[str, tp.Any]]] = {f"{duration} s": [] for duration in durations}
        for duration in [duration for _ in range(repeats) for duration in durations]:
            marks: tp.Dict[str, float] = {}
            start = time.perf_counter()
            policy.begin()
            wav = model.generate(GenerationParams(description="90s rock song", duration=duration, seed=1234), 1234,
                                 functools.partial(_mark, marks, policy))
            generated = time.perf_counter()
            to_wav(wav, model.sample_rate, settings.normalize)
            lm, decode = marks["lm"] - start, marks["decode"] - marks["lm"]
            wav_s = time.perf_counter() - generated
            total = t5 + lm + decode + wav_s
            runs[f"{duration} s"].append({"t5_s": t5, "lm_s": round(lm, 2), "decode_s": round(decode, 2),
                                          "wav_s": round(wav_s, 3), "total_s": round(total, 2),
                                          "s_per_audio_s": round(total / duration, 3),
                                          "lm_ms_per_step": round(1000 * lm / model.lm_steps(duration), 1),
                                          # 1 where the threads policy found the cores shared during the clip
                                          "threads_at_end": policy.threads})
        out = {clip: {**sorted(each, key=lambda run: run["total_s"])[len(each) // 2],
                      "s_per_audio_s_runs": [run["s_per_audio_s"] for run in each]} for clip, each in runs.items()}
    finally:
        torch.set_num_threads(before)
    return {"threads": used, "shares_cores": policy.shares, "precision": settings.precision, "decoder": decoder,
            "clips": out}


def clips_apart(durations: tp.Sequence[int], env: tp.Mapping[str, str], repeats: int = 1) -> tp.Dict[str, tp.Any]:
    """`clips` in a process of its own, with `env` added to this one's environment, as the service runs: a process
    that loaded one model, not one that ran the benchmark's other sections first."""
    run = subprocess.run([sys.executable, "-m", "scripts.bench_e2e", *map(str, durations), f"--repeats={repeats}"],
                         cwd=ROOT, env=child_environment(env), capture_output=True, text=True, check=True)
    return {**json.loads(run.stdout.splitlines()[-1]), "environment": dict(env)}


if __name__ == "__main__":
    repeats = [int(arg.split("=")[1]) for arg in sys.argv[1:] if arg.startswith("--repeats=")]
    seconds = [int(arg) for arg in sys.argv[1:] if not arg.startswith("--")]
    print(json.dumps(clips(seconds, Settings.from_env().cpu_threads, *repeats)))
