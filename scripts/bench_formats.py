#!/usr/bin/env python3
"""Bytes and encoding time of a 30 s clip in each output format (the README's table), as a markdown table.

Two kinds of clip, mono and stereo: what the `debug` model generates (random weights: noise-like, the
hardest case for the lossy coders) and a synthetic piece (chords, plucked notes, a little noise), closer to
music. Real MusicGen output cannot be generated here (no weights); WAV and FLAC sizes barely depend on it,
MP3 and Ogg (variable bit rate) do. Usage: `.venv/bin/python scripts/bench_formats.py`
"""

import math
import sys
import time
import typing as tp
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.audio import ENCODINGS, encode  # noqa: E402
from app.model import MusicModel  # noqa: E402
from app.params import GenerationParams  # noqa: E402

SECONDS = 30
RATE = 32000


def synthetic(channels: int) -> torch.Tensor:
    t = torch.arange(SECONDS * RATE) / RATE
    rows = []
    for c in range(channels):
        chord = sum(0.12 * torch.sin(2 * math.pi * f * (1 + 0.003 * c) * t) for f in (220, 277.2, 329.6, 440))
        pluck = 0.3 * torch.exp(-8 * (t % 0.5)) * torch.sin(2 * math.pi * 880 * t)
        rows.append(chord + pluck + 0.01 * torch.randn(len(t), generator=torch.Generator().manual_seed(c)))
    return torch.stack(rows)


def generated(name: str) -> torch.Tensor:
    model = MusicModel.load(name, "cpu", "debug")
    return model.generate(GenerationParams("a test clip", duration=SECONDS), 0, lambda stage: None)


def main() -> None:
    torch.set_num_threads(1)
    clips: tp.Dict[str, torch.Tensor] = {
        "debug model, mono": generated("debug"), "debug model, stereo": generated("debug-stereo"),
        "synthetic, mono": synthetic(1), "synthetic, stereo": synthetic(2)}
    print(f"| 30 s clip | {' | '.join(ENCODINGS)} |")
    print("|---|" + "---|" * len(ENCODINGS))
    for what, wav in clips.items():
        cells = []
        for format in ENCODINGS:
            started = time.perf_counter()
            size = len(encode(wav, RATE, format, "loudness"))
            cells.append(f"{size / 1e6:.2f} MB ({size * 8 / SECONDS / 1000:.0f} kbit/s, "
                         f"{time.perf_counter() - started:.1f} s)")
        print(f"| {what} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
