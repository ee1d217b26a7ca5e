"""A steady level for audio streamed while it is made, which cannot wait for the whole clip.

The final clip is normalized over the whole of it (app/audio.py; by default audiocraft's loudness
normalization: one gain to -16 LUFS, then tanh soft clipping). A stream knows only the music so far, so:
- **Measure**: the integrated loudness of the clip so far, as ITU-R BS.1770 and torchaudio (which audiocraft
  calls) measure it: K-weighting, 400 ms blocks every 100 ms, the absolute (-70 LUFS) and relative (-10 LU)
  gates. It is kept incrementally: each chunk is filtered after a short stretch of the audio before it (so the
  filters run as over the whole clip) and adds its 100 ms energies; the gates then apply to all blocks so far.
  On the last chunk it is the final clip's own figure.
- **Gain**: the first chunk starts at its target gain; then the gain moves towards the target by at most
  `RISE_DB_PER_S` up and `FALL_DB_PER_S` down, linearly in dB sample by sample, so it is continuous from chunk
  to chunk (no jumps) and converges to the final normalization's gain. Audio under audiocraft's energy floor
  (RMS 2e-3, which its normalization leaves as it is) keeps unity gain.
- **Limit**: tanh, the final clip's own soft clip: every sample stays inside full scale (no clipping), and where
  the gains agree the stream equals the final clip.
With MUSICGEN_NORMALIZE=clip the final clip keeps the model's level and so does the stream (limited to full
scale). `peak` and `rms` normalize the final clip to levels the stream cannot know early; it uses loudness.
"""

import math
import typing as tp

import torch
from torchaudio.functional import highpass_biquad, treble_biquad

HEADROOM_DB = 16.0  # app/audio.py's DEMO_LOUDNESS: the final clip's target is -16 LUFS
ENERGY_FLOOR = 2e-3  # audiocraft's normalize_loudness leaves quieter clips alone
RISE_DB_PER_S = 3.0  # a quiet opening must not be amplified to the clip's level all at once
FALL_DB_PER_S = 20.0  # a limiter's fast attack: a loud entry is brought down within a second or two
PREROLL_SECONDS = 0.5  # K-weighting's filters settle (to float precision) within tens of ms


class Leveler:
    """Levels a stream's chunks, given in order as [channels, samples] floats (returned on the CPU); see the
    module docstring."""

    def __init__(self, sample_rate: int, strategy: str = "loudness", headroom_db: float = HEADROOM_DB):
        self.sample_rate = sample_rate
        self.strategy = strategy
        self.headroom_db = headroom_db
        self.step = round(round(0.4 * sample_rate) / 4)  # torchaudio's block hop; a block is 4 hops
        self.tail: tp.Optional[torch.Tensor] = None  # the raw audio before the next chunk, for the filters
        self.pending: tp.Optional[torch.Tensor] = None  # K-weighted samples short of a whole hop
        self.energies: tp.List[torch.Tensor] = []  # [channels, hops] mean squares, 100 ms each
        self.square_sum = 0.0
        self.samples = 0
        self.gain_db: tp.Optional[float] = None  # at the end of the last chunk

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = torch.nan_to_num(chunk.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.strategy == "clip":
            return chunk.clamp(-1, 1)
        self._measure(chunk)
        target = self._target_db()
        start = self.gain_db if self.gain_db is not None else (target if target is not None else 0.0)
        end = start
        if target is not None:
            seconds = chunk.shape[-1] / self.sample_rate
            end = start + min(max(target - start, -FALL_DB_PER_S * seconds), RISE_DB_PER_S * seconds)
        self.gain_db = end
        frames = chunk.shape[-1]
        ramp = start + (end - start) * torch.arange(1, frames + 1, dtype=torch.float64) / frames
        return torch.tanh(chunk * torch.pow(10.0, ramp / 20).to(chunk))

    def loudness(self) -> tp.Optional[float]:
        """Integrated loudness (LUFS) of the audio so far; None before a whole 400 ms block, or all gated out."""
        if len(self.energies) == 0 or sum(e.shape[-1] for e in self.energies) < 4:
            return None
        blocks = torch.cat(self.energies, dim=-1).unfold(-1, 4, 1).mean(-1)  # [channels, blocks]
        block_lufs = -0.691 + 10 * torch.log10(blocks.sum(0))
        gated = block_lufs > -70.0  # the absolute gate
        if not bool(gated.any()):
            return None
        relative = -0.691 + 10 * math.log10(float(blocks[:, gated].mean(-1).sum())) - 10
        gated &= block_lufs > relative  # the relative gate, measured over the blocks that passed the first
        return -0.691 + 10 * math.log10(float(blocks[:, gated].mean(-1).sum()))

    def _measure(self, chunk: torch.Tensor) -> None:
        frames = chunk.shape[-1]
        x = chunk.double() if self.tail is None else torch.cat([self.tail, chunk.double()], dim=-1)
        weighted = treble_biquad(x, self.sample_rate, 4.0, 1500.0, 1 / math.sqrt(2))
        weighted = highpass_biquad(weighted, self.sample_rate, 38.0, 0.5)[..., x.shape[-1] - frames:]
        self.tail = x[..., -round(PREROLL_SECONDS * self.sample_rate):]
        if self.pending is not None:
            weighted = torch.cat([self.pending, weighted], dim=-1)
        whole = weighted.shape[-1] // self.step * self.step
        if whole:
            self.energies.append(weighted[..., :whole].unflatten(-1, (-1, self.step)).square().mean(-1))
        self.pending = weighted[..., whole:]
        self.square_sum += float(chunk.double().square().sum())
        self.samples += chunk.numel()

    def _target_db(self) -> tp.Optional[float]:
        if self.samples and math.sqrt(self.square_sum / self.samples) < ENERGY_FLOOR:
            return 0.0
        level = self.loudness()
        return None if level is None else -self.headroom_db - level
