"""Audio heard while it is made: the LM's tokens turned into seamless PCM chunks as the LM samples them.

audiocraft's LM reports only (step, total) while it generates. `TokenTap` sees the tokens themselves by
wrapping two methods of one LM instance (as app/fast_lm.py does, without patching the package):
`generate`, to learn each call's prompt and length, and `_sample_next_token`, which returns every step's
tokens after classifier-free guidance. With the codebook delay pattern, sequence step s holds codebook k of
frame s - delay_k, so a frame is complete a few steps after it starts; the LM's own pattern maps steps to
frames. Past 30 s MusicGen calls `generate` once per window with the clip's last frames as the prompt:
each window's new frames are placed after everything before them, and prompt frames (the window's, and an
audio prompt's) are never streamed twice. At the end of every window the frames seen are checked against the
tokens the LM returns.

`AudioStream` feeds complete frames to app/stream_decode.py's incremental decoder and hands each decoded
chunk, levelled (app/stream_level.py), to a callback; it also stands in for MusicGen's final decode
(`generate_audio`), returning the clip assembled from the same decoded chunks instead of decoding it again.
Without a stream, `final_decode` stands in for that decode with another: the clip decoded in pieces, say.
"""

import contextlib
import dataclasses
import inspect
import typing as tp

import torch
from audiocraft.models.lm import LMModel
from audiocraft.models.musicgen import MusicGen

from .stream_decode import IncrementalDecoder, Plan
from .stream_level import Leveler

OnFrames = tp.Callable[[torch.Tensor, int, bool], None]  # (codes [B, K, n], first frame in the clip, generated)
OnAudio = tp.Callable[[torch.Tensor, int], None]  # (chunk [channels, samples] float, first sample in the clip)
Decode = tp.Callable[[torch.Tensor], torch.Tensor]  # tokens [B, K, frames] -> audio [B, channels, samples]

_GENERATE = inspect.signature(LMModel.generate)


@dataclasses.dataclass
class _Window:
    """One `LMModel.generate` call: its frames, the order the steps fill them in, and what was reported."""

    prompt: tp.Optional[torch.Tensor]
    prompt_frames: int
    length: int
    offset: int  # where the window's frame 0 sits in the clip
    step: int  # the next sequence step to be sampled
    writes: tp.Dict[int, tp.Tuple[tp.List[int], tp.List[int]]]  # step -> (codebooks, frames) it samples
    complete: tp.Dict[int, int]  # step -> frames complete once it is sampled
    codes: tp.Optional[torch.Tensor] = None  # [B, K, length], allocated at the first step
    reported: int = 0


class TokenTap:
    """Reports the clip's frames to `on_frames` as they complete, while installed on `lm` (`with`)."""

    def __init__(self, lm: LMModel, on_frames: OnFrames):
        self.lm = lm
        self.on_frames = on_frames
        self.frames: tp.List[torch.Tensor] = []  # the clip so far, as reported
        self.window: tp.Optional[_Window] = None
        self._saved: tp.Dict[str, tp.Any] = {}

    def __enter__(self) -> "TokenTap":
        for name, wrapper in (("generate", self._generate), ("_sample_next_token", self._sample)):
            self._saved[name] = self.lm.__dict__.get(name)  # an instance attribute (fast_lm's), or None
            setattr(self.lm, name, _calling(getattr(self.lm, name), wrapper))
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(self.lm, name)
            else:
                setattr(self.lm, name, saved)
        self._saved.clear()

    @property
    def tokens(self) -> torch.Tensor:
        """The clip's tokens so far, [B, K, T] (an audio prompt's included, as audiocraft returns them)."""
        return torch.cat(self.frames, dim=-1)

    def _generate(self, generate: tp.Callable[..., torch.Tensor], *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        call = _GENERATE.bind(self.lm, *args, **kwargs)
        call.apply_defaults()
        self.window = self._begin(call.arguments["prompt"], call.arguments["max_gen_len"])
        try:
            out = generate(*args, **kwargs)
            self._check(self.window, out)
        finally:
            self.window = None
        return out

    def _begin(self, prompt: tp.Optional[torch.Tensor], length: int) -> _Window:
        known = sum(frames.shape[-1] for frames in self.frames)
        prompt_frames = 0 if prompt is None else prompt.shape[-1]
        if known == 0 and prompt_frames:  # an audio prompt: decoded into the clip, never streamed
            self._report(prompt, 0, generated=False)
            known = prompt_frames
        elif known and (prompt is None or prompt_frames > known
                        or not torch.equal(prompt, self.tokens[..., known - prompt_frames:])):
            raise RuntimeError("streaming: this LM call's prompt is not the end of the clip so far")
        pattern = self.lm.pattern_provider.get_pattern(length)
        first = pattern.get_first_step_with_timesteps(prompt_frames)
        writes, last_step = {}, [first] * length
        for step in range(first, len(pattern.layout)):
            coords = [c for c in pattern.layout[step] if prompt_frames <= c.t < length]
            writes[step] = ([c.q for c in coords], [c.t for c in coords])
            for c in coords:
                last_step[c.t] = max(last_step[c.t], step)
        complete, ready = {}, prompt_frames
        for step in writes:
            while ready < length and last_step[ready] <= step:
                ready += 1
            complete[step] = ready
        return _Window(prompt, prompt_frames, length, known - prompt_frames, first, writes, complete,
                       reported=prompt_frames)

    def _sample(self, sample: tp.Callable[..., torch.Tensor], *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        token = sample(*args, **kwargs)  # [B, K, 1], after CFG
        window = self.window
        if window is None or window.step not in window.writes:
            return token
        if window.codes is None:
            window.codes = torch.full((token.shape[0], token.shape[1], window.length), -1, dtype=torch.long,
                                      device=token.device)
            if window.prompt is not None:
                window.codes[..., :window.prompt_frames] = window.prompt
        codebooks, frames = window.writes[window.step]
        if codebooks:
            window.codes[:, codebooks, frames] = token[:, codebooks, 0]
        ready = window.complete[window.step]
        window.step += 1
        if ready > window.reported:
            new, window.reported = window.codes[..., window.reported:ready], ready
            self._report(new, window.offset + ready - new.shape[-1], generated=True)
        return token

    def _report(self, codes: torch.Tensor, start: int, generated: bool) -> None:
        self.frames.append(codes)
        self.on_frames(codes, start, generated)

    def _check(self, window: _Window, out: torch.Tensor) -> None:
        new = window.length - window.prompt_frames
        if window.reported != window.length or window.codes is None or \
                not torch.equal(window.codes[..., window.prompt_frames:], out[..., out.shape[-1] - new:]):
            raise RuntimeError("streaming: the tokens seen while sampling differ from those the LM returned")


def _calling(method: tp.Callable[..., tp.Any], wrapper: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    """`wrapper(method, *args, **kwargs)` as a plain function (what an instance attribute must be)."""
    def call(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        return wrapper(method, *args, **kwargs)
    return call


@contextlib.contextmanager
def final_decode(musicgen: MusicGen, decode: Decode) -> tp.Iterator[None]:
    """Inside this block `musicgen`'s final decode (`generate_audio`, which every generate method ends with) is
    `decode`."""
    saved = musicgen.__dict__.get("generate_audio")
    musicgen.generate_audio = decode
    try:
        yield
    finally:
        if saved is None:
            del musicgen.generate_audio
        else:
            musicgen.generate_audio = saved


class AudioStream:
    """While installed on `musicgen` (`with`), streams its next generation's audio to `on_audio` as it is made.

    `on_audio(chunk, start)` gets each chunk levelled ([channels, samples] float on the CPU, inside full scale;
    `start` in samples from the clip's start, an audio prompt included): the first once `chunk_seconds` of
    music exist, then every `chunk_seconds`, contiguous, the last one shorter. It is called on the generating
    thread, from inside the LM's loop: raising there stops the generation. MusicGen's own final decode is
    replaced by the clip assembled from the same decoded chunks (not levelled: app/audio.py normalizes it).
    One clip at a time (batch 1).
    """

    def __init__(self, musicgen: MusicGen, on_audio: OnAudio, chunk_seconds: float = 1.0,
                 plan: tp.Optional[Plan] = None, normalize: str = "loudness"):
        self.musicgen = musicgen
        self.on_audio = on_audio
        self.plan = plan if plan is not None else Plan.of(musicgen.compression_model)
        self.decoder = IncrementalDecoder(self.plan, round(chunk_seconds * musicgen.frame_rate))
        self.leveler = Leveler(musicgen.sample_rate, normalize)
        self.tap = TokenTap(musicgen.lm, self._on_frames)
        self._installed = contextlib.ExitStack()

    def __enter__(self) -> "AudioStream":
        self._installed.enter_context(self.tap)
        self._installed.enter_context(final_decode(self.musicgen, self._generate_audio))
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self._installed.__exit__(*exc)

    def _on_frames(self, codes: torch.Tensor, start: int, generated: bool) -> None:
        if codes.shape[0] != 1:
            raise ValueError("streaming decodes one clip at a time")
        self._send(self.decoder.push(codes, emit=generated))

    def _send(self, segments: tp.List[tp.Tuple[torch.Tensor, int]]) -> None:
        for audio, start in segments:
            self.on_audio(self.leveler(audio[0]), start)

    def _generate_audio(self, tokens: torch.Tensor) -> torch.Tensor:
        """MusicGen.generate_audio's stand-in: the rest of the stream, then the whole clip from its chunks."""
        if not torch.equal(tokens, self.tap.tokens):
            raise RuntimeError("streaming: the clip's tokens differ from the ones streamed")
        self._send(self.decoder.finish())
        return self.decoder.clip()
