"""Incremental EnCodec decoding: a clip's frames decoded as they arrive, each sample as the full decode gives it.

An EnCodec decoder (audiocraft's SEANet, or transformers' `EncodecDecoder` behind audiocraft's
`HFEncodecCompressionModel`) is a stack of non-causal convolutions with at most one LSTM. It is split there:
`head` (convolutions at the frame rate) -> `lstm` -> `body` (the upsampling convolutions, almost all the
cost). The convolution stacks see a finite neighbourhood, measured once per codec by perturbing one frame
(`Plan.of`), so a segment decoded with that much context on both sides equals the full decode; the LSTM's
memory is not finite, so it runs over the clip once, in order, carrying its state from segment to segment.
Every frame goes through `body` once plus its context (a few frames per segment), never the whole clip again.
The interleaved stereo codec decodes its left and right codebooks as two rows of one batch. A decoder converted
to bf16 (app/codec.py: hooks on the whole decoder cast its input and output) is run in its own dtype here too,
layer by layer, and returns fp32 as it does. `decode` runs a whole clip through the same pieces at once: on a CPU
a piece of a few seconds keeps the body's activations in the caches, where a long clip decoded whole streams them
through memory.
"""

import copy
import dataclasses
import typing as tp

import torch
from audiocraft.models.encodec import (
    CompressionModel,
    EncodecModel,
    HFEncodecCompressionModel,
    InterleaveStereoCompressionModel,
)

Layers = tp.List[torch.nn.Module]


def _run(layers: Layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _reach(layers: Layers, channels: int, device: torch.device) -> tp.Tuple[int, int, int]:
    """(left, right, upsampling): output frame f depends on input frames f - left .. f + right.

    Found by changing one input frame and seeing which outputs change, with a generator of its own: the
    global one belongs to the generation's seed. Measured in fp32 (on a copy of bf16 layers): bf16 rounding
    could hide the faint far end of a footprint."""
    if not layers:
        return 0, 0, 1
    if any(p.dtype != torch.float32 for layer in layers for p in layer.parameters()):
        layers = [copy.deepcopy(layer).float() for layer in layers]
    generator = torch.Generator(device).manual_seed(0)
    frames = 8
    while True:
        x = torch.randn(1, channels, frames, device=device, generator=generator)
        y = _run(layers, x)
        up, j = y.shape[-1] // frames, frames // 2
        bumped = x.clone()
        bumped[..., j] += 3 * torch.randn(channels, device=device, generator=generator)
        changed = (_run(layers, bumped) != y).any(dim=1)[0].nonzero()[:, 0]
        first, last = int(changed.min()) // up, int(changed.max()) // up
        if first > 0 and last < frames - 1:  # the footprint stayed clear of the probe's own padding
            return last - j, j - first, up
        frames *= 2


@dataclasses.dataclass
class Plan:
    """How to decode one codec incrementally (`Plan.of`)."""

    embed: tp.Callable[[torch.Tensor], torch.Tensor]  # codes [B, K, T] -> latent [B, D, T], frame by frame
    head: Layers
    lstm: tp.Optional[torch.nn.LSTM]
    skip: bool  # the LSTM's input is added to its output (audiocraft's `skip`; transformers' always)
    body: Layers
    head_reach: tp.Tuple[int, int]
    body_reach: tp.Tuple[int, int]
    hop: int  # samples per frame
    stereo: bool
    dtype: torch.dtype = torch.float32  # the decoder's weights' (bf16 after app/codec.py); audio comes out fp32

    @classmethod
    def of(cls, codec: CompressionModel) -> "Plan":
        """Split `codec`'s decoder and measure its reach: about half a second for the real 32 kHz EnCodec on
        one CPU thread, so once per loaded model."""
        mono, layers = _decoder_layers(codec)
        recurrent = [i for i, layer in enumerate(layers) if isinstance(getattr(layer, "lstm", None), torch.nn.LSTM)]
        if len(recurrent) > 1:
            raise NotImplementedError("streaming handles an EnCodec decoder with at most one LSTM")
        if recurrent:
            head, lstm, body = layers[:recurrent[0]], layers[recurrent[0]], layers[recurrent[0] + 1:]
        else:
            head, lstm, body = [], None, layers
        weight = next(p for layer in layers for p in layer.parameters())
        device, dtype = weight.device, weight.dtype
        with torch.no_grad(), _no_autocast(device):
            latent = mono.decode_latent(torch.zeros(1, mono.num_codebooks, 4, dtype=torch.long, device=device))
            h_left, h_right, h_up = _reach(head, latent.shape[1], device)
            b_left, b_right, hop = _reach(body, _run(head, latent.to(dtype)).shape[1], device)
        if h_up != 1:
            raise NotImplementedError("streaming expects the layers before the LSTM to keep the frame rate")
        return cls(mono.decode_latent, head, None if lstm is None else lstm.lstm, getattr(lstm, "skip", True), body,
                   (h_left, h_right), (b_left, b_right), hop, isinstance(codec, InterleaveStereoCompressionModel),
                   dtype)

    @property
    def lookahead(self) -> int:
        """Frames past a segment's end that must exist before it can be decoded exactly."""
        return self.head_reach[1] + self.body_reach[1]


def _decoder_layers(codec: CompressionModel) -> tp.Tuple[CompressionModel, Layers]:
    """The mono codec (stereo wraps one) and its decoder's layers, in the order they run."""
    if isinstance(codec, InterleaveStereoCompressionModel):
        if codec.per_timestep:
            raise NotImplementedError("streaming needs stereo codebooks interleaved per codebook, not per step")
        codec = codec.model
    if isinstance(codec, HFEncodecCompressionModel):
        if codec.model.config.chunk_length is not None:
            raise NotImplementedError("streaming needs an EnCodec that decodes the clip in one piece")
        layers = list(codec.model.decoder.layers)
    elif isinstance(codec, EncodecModel):
        layers = list(codec.decoder.model)
    else:
        raise NotImplementedError(f"streaming cannot decode with {type(codec).__name__}")
    if any(isinstance(module, torch.nn.GroupNorm) for layer in layers for module in layer.modules()):
        raise NotImplementedError("this EnCodec normalizes over time: it cannot decode piece by piece")
    return codec, layers


def _no_autocast(device: torch.device) -> tp.ContextManager:
    # Segments are decoded from inside the LM's loop, which audiocraft runs under fp16 autocast on CUDA;
    # the final decode it replaces runs outside it, in fp32.
    return torch.autocast(device_type=device.type, enabled=False)


def decode(plan: Plan, codes: torch.Tensor, piece_frames: int) -> torch.Tensor:
    """A whole clip's codes [B, K, frames] decoded `piece_frames` at a time: the full decode's audio [B, C, samples].

    The real 32 kHz EnCodec (bf16, two threads, 2-core Zen 4): a 30 s clip in 4 s pieces 1.5-1.7 s, decoded whole
    2.6-2.9 s; 10 s 0.55-0.6 s against 0.65-0.8 s. Its widest activation, 64 channels at 32 kHz, is 16 MB for
    4 s in bf16, about a CPU's last-level cache; decoded whole, a 30 s clip's is 120 MB."""
    decoder = IncrementalDecoder(plan, piece_frames)
    decoder.push(codes)
    decoder.finish()
    return decoder.clip()


class IncrementalDecoder:
    """Decodes one clip's frames, pushed in order, in segments of `chunk_frames` (the last one shorter).

    Frames pushed with `emit=False` (an audio prompt, before any generated frame) are decoded for the clip
    but not returned; the first returned segment starts right after them.
    """

    def __init__(self, plan: Plan, chunk_frames: int):
        self.plan = plan
        self.chunk = max(1, chunk_frames)
        self.codes: tp.Optional[torch.Tensor] = None  # [rows, K, frames]: stereo's right rows after the left
        self.emit_from = 0  # frames before it are never returned
        self.state: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]] = None  # the LSTM's (h, c)
        self.mid: tp.Optional[torch.Tensor] = None  # the body's input for frames [mid_start, mid_end)
        self.mid_start = self.mid_end = 0
        self.done = 0  # frames decoded
        self.pieces: tp.List[torch.Tensor] = []  # [B, channels, samples] each, in order

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else self.codes.shape[-1]

    def push(self, codes: torch.Tensor, emit: bool = True) -> tp.List[tp.Tuple[torch.Tensor, int]]:
        """Add the next frames `codes` [B, K, n]; returns the segments now decodable as (audio, first sample)."""
        if not emit:
            if self.emit_from < self.frames:
                raise ValueError("frames that are not to be emitted must come before all others")
            self.emit_from += codes.shape[-1]
        if self.plan.stereo:  # [B, 2K, n], codebooks interleaved left/right -> [2B, K, n]
            codes = torch.cat([codes[:, 0::2], codes[:, 1::2]])
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=-1)
        return self._advance(final=False)

    def finish(self) -> tp.List[tp.Tuple[torch.Tensor, int]]:
        """The remaining segments, up to the clip's end."""
        return self._advance(final=True)

    def clip(self) -> torch.Tensor:
        """Every segment decoded so far, prompt included: [B, channels, samples]."""
        return torch.cat(self.pieces, dim=-1)

    def _advance(self, final: bool) -> tp.List[tp.Tuple[torch.Tensor, int]]:
        out = []
        limit = self.frames if final else self.frames - self.plan.lookahead
        while self.done < limit:
            end = self.done + self.chunk
            if self.done < self.emit_from:
                end = min(end, self.emit_from)
            if end > limit and not final:
                break
            end = min(end, self.frames)
            with torch.no_grad(), _no_autocast(self.codes.device):
                audio = self._decode(self.done, end, final)
            self.pieces.append(audio)
            if self.done >= self.emit_from:
                out.append((audio, self.done * self.plan.hop))
            self.done = end
        return out

    def _decode(self, start: int, end: int, final: bool) -> torch.Tensor:
        plan = self.plan
        self._run_lstm(self.frames if final else end + plan.body_reach[1])
        left = max(self.mid_start, start - plan.body_reach[0])
        right = min(self.mid_end, end + plan.body_reach[1])
        audio = _run(plan.body, self.mid[..., left - self.mid_start:right - self.mid_start]).float()
        audio = audio[..., (start - left) * plan.hop:(end - left) * plan.hop]
        keep = max(self.mid_start, end - plan.body_reach[0])  # the next segment's left context onwards
        self.mid, self.mid_start = self.mid[..., keep - self.mid_start:], keep
        if plan.stereo:  # [2B, 1, samples] -> [B, 2, samples]
            audio = torch.cat(audio.chunk(2), dim=1)
        return audio

    def _run_lstm(self, upto: int) -> None:
        """Extend the body's input to frame `upto`: the head over those frames (with its context), then the LSTM."""
        if upto <= self.mid_end:
            return
        plan = self.plan
        left, right = max(0, self.mid_end - plan.head_reach[0]), min(self.frames, upto + plan.head_reach[1])
        latent = plan.embed(self.codes[..., left:right]).to(plan.dtype)
        x = _run(plan.head, latent)[..., self.mid_end - left:upto - left]
        if plan.lstm is not None:
            y, self.state = plan.lstm(x.permute(2, 0, 1), self.state)
            x = (y + x.permute(2, 0, 1) if plan.skip else y).permute(1, 2, 0)
        self.mid = x if self.mid is None else torch.cat([self.mid, x], dim=-1)
        self.mid_end = upto
