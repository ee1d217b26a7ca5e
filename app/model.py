"""A loaded MusicGen (and, once needed, MultiBand Diffusion), made fast, and the one way the service runs it.

Where the weights come from is app/weights.py; how each speed-up works is in its own module (precision, fast_lm,
codec, cuda_graph). Everything here runs on the generation thread.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import typing as tp

import torch
from audiocraft.data.audio_utils import convert_audio
from audiocraft.models import MusicGen
from audiocraft.models.encodec import InterleaveStereoCompressionModel
from audiocraft.models.multibanddiffusion import MultiBandDiffusion
from audiocraft.modules.conditioners import ChromaStemConditioner

from . import codec as decoder_codec
from . import cuda_graph as graph_decoding
from . import debug_models, fast_lm, stream_decode, threads
from . import precision as lm_precision
from .config import Settings
from .params import MIN_CONTINUATION_SECONDS, AudioClip, GenerationParams, UnsupportedRequest
from .stream_decode import Plan
from .streaming import AudioStream, OnAudio, final_decode
from .weights import load_mbd, load_musicgen, resolve_device

log = logging.getLogger(__name__)

# audiocraft's NoiseSchedule.generate_subsampled walks 20 denoising steps per band by default.
DIFFUSION_STEPS_PER_BAND = 20
# Streamed audio (stream_audio): the first chunk once this much music exists, then one per this much.
STREAM_CHUNK_SECONDS = 1.0
# A clip not streamed is decoded this much at a time on a CPU, where a piece's activations stay in the caches
# (app/stream_decode.py's `decode`: a 30 s clip in 1.5-1.7 s instead of 2.6-2.9 s).
DECODE_PIECE_SECONDS = 4.0

Step = tp.Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Speedups:
    """How the model decodes. Every default is stock audiocraft; the service's own come from its settings."""

    precision: str = "fp32"  # the LM's (MUSICGEN_PRECISION, app/precision.py)
    cross_kv_cache: bool = False  # MUSICGEN_CROSS_KV_CACHE (app/fast_lm.py)
    static_kv_cache: bool = False  # MUSICGEN_STATIC_KV_CACHE, with the lean step (app/fast_lm.py, lean_step.py)
    packed_weights: bool = False  # MUSICGEN_PACKED_WEIGHTS (app/fast_lm.py)
    decoder_precision: str = "fp32"  # EnCodec's decoder (MUSICGEN_DECODER_PRECISION, app/codec.py)
    cuda_graph: bool = False  # MUSICGEN_CUDA_GRAPH (app/cuda_graph.py)
    parallel_attention: bool = False  # MUSICGEN_PARALLEL_ATTENTION (app/pair_attention.py)
    int8_kernel: bool = False  # MUSICGEN_INT8_KERNEL: int8-dynamic's products on app/int8_kernel.py, not fbgemm's
    half_kv_cache: bool = False  # MUSICGEN_HALF_KV_CACHE: the static cache in fp16 (app/half_attention.py)
    int8_kv_cache: bool = False  # MUSICGEN_INT8_KV_CACHE: ... in int8 instead (app/int8_kv_cache.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Speedups":
        # A second core for attention where a generation may run one torch thread (with more, torch's own threads
        # split the attention already: app/pair_attention.py steps aside) and this process may use another.
        parallel_attention = (settings.parallel_attention and settings.cpu_threads in (0, 1)
                              and threads.available_cores() >= 2)
        return cls(settings.precision, settings.cross_kv_cache, settings.static_kv_cache, settings.packed_weights,
                   settings.decoder_precision, settings.cuda_graph, parallel_attention, settings.int8_kernel,
                   settings.half_kv_cache, settings.int8_kv_cache)

    @property
    def on_cpu_only(self) -> bool:
        """Whether any speed-up that is checked on CPU only is asked for."""
        return (self.cross_kv_cache or self.static_kv_cache or self.packed_weights or self.parallel_attention
                or self.half_kv_cache or self.int8_kv_cache)


class MusicModel:
    """A loaded MusicGen (and, once needed, MBD), and the one way the service runs them."""

    def __init__(self, musicgen: MusicGen, mbd_source: str, trusted_types: tp.Sequence[str] = ()):
        self.musicgen = musicgen
        self.mbd_source = mbd_source
        self.trusted_types = tuple(trusted_types)  # for MBD, loaded later
        self.mbd: tp.Optional[MultiBandDiffusion] = None
        self.name: str = musicgen.name
        self.device: str = str(musicgen.device)
        self.sample_rate: int = musicgen.sample_rate
        self.channels: int = musicgen.audio_channels
        self.stream_plan: tp.Optional[Plan] = None  # how to decode as the tokens come (`plan_streaming`)
        self.stream_refusal: tp.Optional[str] = "not planned yet"  # or why this model's codec cannot stream

    @classmethod
    def load(cls, name: str, device: str, mbd_source: str, preload_mbd: bool = False,
             speedups: tp.Optional["Speedups"] = None, trusted_types: tp.Sequence[str] = ()) -> "MusicModel":
        """Load the models, with `speedups` (stock audiocraft by default); `trusted_types` widen the checkpoints'
        unpickling allow-list (MUSICGEN_TRUSTED_CHECKPOINT_TYPES)."""
        device = resolve_device(device)
        log.info("loading MusicGen %s on %s", name, device)
        model = cls(load_musicgen(name, device, trusted_types), mbd_source, trusted_types)
        model._speed_up(speedups or Speedups())
        log.info("streamed audio: %s", model.plan_streaming())  # on the decoder as it will run
        if preload_mbd:
            model.ensure_mbd()
        log.info("model ready: %s, %d Hz, %d channel(s)", model.name, model.sample_rate, model.channels)
        return model

    @classmethod
    def from_settings(cls, settings: Settings) -> "MusicModel":
        """The model as the service runs it (the server, and the benchmark's bare runs)."""
        return cls.load(settings.model, settings.device, settings.mbd_source, settings.mbd_preload,
                        Speedups.from_settings(settings), settings.trusted_types)

    def _speed_up(self, speedups: "Speedups") -> None:
        lm, device = self.musicgen.lm, self.device
        if not device.startswith("cpu") and speedups.on_cpu_only:
            # Verified (same greedy tokens as stock) on CPU only; on CUDA audiocraft's fp16 autocast and
            # xformers kernels run unchanged until a GPU run checks them (docs/gpu-decoding-plan.md).
            log.info("decoding speed-ups are CPU-only for now: off on %s", device)
            speedups = dataclasses.replace(speedups, cross_kv_cache=False, static_kv_cache=False,
                                           packed_weights=False, parallel_attention=False, half_kv_cache=False,
                                           int8_kv_cache=False)
        resolved = lm_precision.apply(lm, speedups.precision, device)
        log.info("LM precision %s, decoding speed-ups %s", resolved, fast_lm.install(
            lm, speedups.cross_kv_cache, speedups.static_kv_cache, speedups.packed_weights,
            int8_weights=resolved == "int8-dynamic", pair_attention=speedups.parallel_attention,
            own_int8_kernel=speedups.int8_kernel, half_kv_cache=speedups.half_kv_cache,
            int8_kv_cache=speedups.int8_kv_cache))
        log.info("EnCodec decoder precision %s",
                 decoder_codec.apply(self.musicgen.compression_model, speedups.decoder_precision, device))
        if speedups.cuda_graph and device.startswith("cuda"):
            mg = self.musicgen  # buffers for the longest window audiocraft generates at once
            capacity = lm.pattern_provider.get_pattern(int(mg.max_duration * mg.frame_rate)).num_sequence_steps
            log.info("CUDA graph decoding %s", graph_decoding.install(lm, capacity))
        elif speedups.cuda_graph:
            log.info("MUSICGEN_CUDA_GRAPH applies to CUDA only: off on %s", device)

    @property
    def stereo(self) -> bool:
        return isinstance(self.musicgen.compression_model, InterleaveStereoCompressionModel)

    @property
    def melody(self) -> bool:
        """Whether the model conditions on a melody's chromagram (musicgen-melody and its kin)."""
        conditioners = self.musicgen.lm.condition_provider.conditioners.values()
        return any(isinstance(conditioner, ChromaStemConditioner) for conditioner in conditioners)

    def plan_streaming(self) -> str:
        """Measure how to decode this model's codec incrementally (app/stream_decode.py: about half a second for
        the real EnCodec, so once, at load, on the decoder as it will run); returns what it found, for the log."""
        try:
            self.stream_plan, self.stream_refusal = Plan.of(self.musicgen.compression_model), None
        except NotImplementedError as e:
            self.stream_plan, self.stream_refusal = None, str(e)
            return f"unavailable ({e})"
        plan = self.stream_plan
        return f"{plan.lookahead} frame(s) of look-ahead, LSTM {'carried' if plan.lstm is not None else 'none'}"

    @property
    def streams(self) -> bool:
        """Whether the model can stream its audio while it is made (`stream_audio`)."""
        return self.stream_plan is not None

    def _check_streams(self) -> None:
        if not self.streams:
            raise UnsupportedRequest(
                f"stream_audio: the loaded model ({self.name}) cannot stream its audio: {self.stream_refusal}")

    def ensure_mbd(self) -> MultiBandDiffusion:
        if self.mbd is None:
            codec = self.musicgen.compression_model
            if isinstance(codec, InterleaveStereoCompressionModel):
                codec = codec.model  # MBD works on one EnCodec stream; stereo decodes left and right apart
            log.info("loading MultiBand Diffusion from %s", self.mbd_source)
            self.mbd = load_mbd(self.mbd_source, codec, self.device, self.trusted_types)
        return self.mbd

    def check(self, params: GenerationParams) -> None:
        """Raise `UnsupportedRequest` for what this model cannot do: a melody without a melody model, or an
        audio prompt that leaves the first window less than a second to continue it."""
        if params.melody is not None and not self.melody:
            raise UnsupportedRequest(
                f"melody: the loaded model ({self.name}) does not take a melody; melody models are "
                "facebook/musicgen-melody, -melody-large and -stereo-melody(-large) (GET /health: features.melody)")
        if params.stream_audio:
            self._check_streams()
        longest = self.musicgen.max_duration - MIN_CONTINUATION_SECONDS
        if params.audio_prompt is not None and params.audio_prompt.seconds > longest:
            raise UnsupportedRequest(
                f"audio_prompt: {params.audio_prompt.seconds:.2f} s long, at most {longest:g} s (the model's "
                f"{self.musicgen.max_duration:g} s window less {MIN_CONTINUATION_SECONDS:g} s to continue it)")

    def lm_steps(self, duration: float, prompt: tp.Optional[AudioClip] = None) -> int:
        """How many times the LM's progress callback will fire for `duration` seconds of audio.

        Mirrors audiocraft's windowing past `max_duration` (each window re-reads the last
        `max_duration - extend_stride` seconds as its prompt) and its codebook-pattern delays. An audio
        `prompt` is the first window's prompt, as many frames as EnCodec makes of it: those steps are skipped.
        """
        mg = self.musicgen
        total, stride = int(duration * mg.frame_rate), int(mg.extend_stride * mg.frame_rate)
        windows: tp.List[tp.Tuple[int, int]] = []  # (prompt length, generated length), in frames
        offset, prompt_frames = 0, self._frames(prompt)
        while offset + prompt_frames < total:
            length = int(min(duration - offset / mg.frame_rate, mg.max_duration) * mg.frame_rate)
            windows.append((prompt_frames, length))
            if duration <= mg.max_duration:
                break
            prompt_frames, offset = length - stride, offset + stride
        steps = 0
        for prompt, length in windows:
            pattern = mg.lm.pattern_provider.get_pattern(length)
            steps += len(pattern.layout) - pattern.get_first_step_with_timesteps(prompt)
        return steps

    def _frames(self, clip: tp.Optional[AudioClip]) -> int:
        """EnCodec frames of a clip: it pads the last one to a whole frame."""
        if clip is None:
            return 0
        samples = round(clip.seconds * self.sample_rate)
        return math.ceil(samples * self.musicgen.frame_rate / self.sample_rate)

    def diffusion_steps(self) -> int:
        bands = len(self.mbd.DPs) if self.mbd is not None else debug_models.MBD_BANDS
        return bands * DIFFUSION_STEPS_PER_BAND

    def generate(self, params: GenerationParams, seed: int, on_step: Step, on_audio: tp.Optional[OnAudio] = None,
                 level: str = "loudness") -> torch.Tensor:
        """Generate one clip and return it as a `[channels, samples]` float tensor on the CPU.

        `on_step(stage)` runs after every LM step ("lm"), after EnCodec decoding ("decode") and after
        every diffusion step ("diffusion"); raising from it aborts the generation there. On a CPU it also runs
        before each of the LM's transformer layers ("layer"), where a step's CPU threads may change
        (app/threads.py): a step on threads that another process preempts can take a second. With `on_audio`,
        the clip's new music also goes to `on_audio(chunk, first sample)` while the LM makes it, a second at a
        time, decoded with EnCodec (with `mbd` too) and levelled with `level` (app/streaming.py); EnCodec's
        clip is then assembled from those chunks instead of being decoded again. Without a stream, a CPU decodes
        the clip in pieces of DECODE_PIECE_SECONDS (the same audio, sooner), and `mbd` leaves out the EnCodec
        decode whose audio its own replaces.
        """
        mg = self.musicgen
        mg.set_generation_params(use_sampling=params.temperature > 0, top_k=params.top_k, top_p=params.top_p,
                                 temperature=params.temperature, duration=params.duration,
                                 cfg_coef=params.cfg_coef)
        mg.set_custom_progress_callback(lambda done, total: on_step("lm"))
        torch.manual_seed(seed)  # seeds CUDA too; MBD's noise is drawn from the same generators
        with torch.inference_mode():
            with contextlib.ExitStack() as scope:
                if self.device == "cpu":
                    scope.enter_context(_before_each_layer(mg.lm, lambda: on_step("layer")))
                if on_audio is not None:
                    self._check_streams()
                    scope.enter_context(AudioStream(mg, on_audio, STREAM_CHUNK_SECONDS, self.stream_plan, level))
                elif params.mbd:  # MBD makes the clip (decoding it with EnCodec too, as its reference)
                    scope.enter_context(final_decode(mg, lambda tokens: torch.empty(0)))
                elif self.device == "cpu" and self.stream_plan is not None:
                    pieces = round(DECODE_PIECE_SECONDS * mg.frame_rate)
                    scope.enter_context(final_decode(mg, functools.partial(stream_decode.decode, self.stream_plan,
                                                                            piece_frames=pieces)))
                wav, tokens = self._generate(params)
            on_step("decode")
            if params.mbd:
                wav = self._decode_mbd(tokens, on_step)
        return wav[0].float().cpu()

    def _generate(self, params: GenerationParams) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Text, text + melody, text + prompt to continue, or all three: (waveforms, tokens) of a batch of one.

        Each goes through audiocraft's own path, past the 30 s window too (it slices the melody per window
        and carries the prompt into the first). No public method takes a melody and a prompt together; the
        steps both of them take (`_prepare_tokens_and_attributes` accepts both, then `_generate_tokens`) do.
        """
        mg, text, rate = self.musicgen, [params.description], self.sample_rate
        melody, prompt = params.melody, params.audio_prompt
        if melody is None and prompt is None:
            return mg.generate(text, progress=True, return_tokens=True)
        if prompt is None:
            return mg.generate_with_chroma(text, melody.wav[None], melody.sample_rate, progress=True,
                                           return_tokens=True)
        if melody is None:
            return mg.generate_continuation(prompt.wav[None], prompt.sample_rate, text, progress=True,
                                            return_tokens=True)
        melody_wavs = [convert_audio(melody.wav, melody.sample_rate, rate, self.channels)]
        prompt_wav = convert_audio(prompt.wav[None], prompt.sample_rate, rate, self.channels)
        attributes, prompt_tokens = mg._prepare_tokens_and_attributes(text, prompt_wav, melody_wavs=melody_wavs)
        tokens = mg._generate_tokens(attributes, prompt_tokens, progress=True)
        return mg.generate_audio(tokens), tokens

    def _decode_mbd(self, tokens: torch.Tensor, on_step: Step) -> torch.Tensor:
        mbd = self.ensure_mbd()
        if self.stereo:
            left, right = self.musicgen.compression_model.get_left_right_codes(tokens)
            tokens = torch.cat([left, right])
        # The denoising loop has no callback: a hook on each band's U-Net sees every step.
        hooks = [process.model.register_forward_hook(lambda *_: on_step("diffusion")) for process in mbd.DPs]
        try:
            wav = mbd.tokens_to_wav(tokens)
        finally:
            for hook in hooks:
                hook.remove()
        if self.stereo:  # [left; right] x mono -> one clip with two channels
            wav = torch.cat([wav[:1], wav[1:]], dim=1)
        return wav


@contextlib.contextmanager
def _before_each_layer(lm: torch.nn.Module, call: tp.Callable[[], None]) -> tp.Iterator[None]:
    """`call()` before each transformer layer of `lm` runs, inside this block (the lean step keeps the layers' own
    hooks: app/lean_step.py)."""
    hooks = [layer.register_forward_pre_hook(lambda *_: call()) for layer in lm.transformer.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
