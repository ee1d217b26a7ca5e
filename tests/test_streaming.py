"""Audio streamed while it is made (app/streaming.py, app/stream_decode.py, app/stream_level.py), on real audiocraft:
the tiny debug models, the service's own loading (speed-ups, bf16), and a tiny transformers EnCodec."""

import copy
import dataclasses
import functools
import math
import typing as tp

import pytest
import torch
import torchaudio
from audiocraft.models import MusicGen
from audiocraft.models.encodec import HFEncodecCompressionModel, InterleaveStereoCompressionModel
from transformers import EncodecConfig, EncodecModel

from app import cuda_graph, debug_models
from app.audio import DEMO_LOUDNESS, pcm16, to_wav
from app.model import MusicModel, Speedups
from app.stream_decode import IncrementalDecoder, Plan
from app.stream_level import FALL_DB_PER_S, RISE_DB_PER_S, Leveler
from app.streaming import AudioStream


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On 2 cores shared with other work, torch's 2 threads spin-wait on each other (a 10 s test took 170 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _built(name: str) -> MusicGen:
    if name == "hf-tiny":  # the real checkpoints' codec architecture (LSTM included), tiny; the LM's 512 codes
        return MusicGen("hf-tiny", tiny_hf_codec(), debug_models.build_lm(card=512))
    return debug_models.build_musicgen(name)


def musicgen(name: str = "debug") -> MusicGen:
    return copy.deepcopy(_built(name))


def tiny_hf_codec() -> HFEncodecCompressionModel:
    """transformers' EncodecModel as facebook/encodec_32khz is configured (50 Hz, 2-layer LSTM, non-causal,
    reflect padding), at tiny widths; 4 codebooks of 512 (1.8 kbps), filled so that codes are not silence."""
    config = EncodecConfig(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.8], num_filters=4, hidden_size=16,
                           codebook_size=512, sampling_rate=32000, use_causal_conv=False, normalize=False,
                           use_conv_shortcut=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = EncodecModel(config).eval()
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    return HFEncodecCompressionModel(model).eval()


@dataclasses.dataclass
class Run:
    mg: MusicGen
    stream: AudioStream
    wav: torch.Tensor  # what MusicGen returned: [1, channels, samples]
    tokens: torch.Tensor
    chunks: tp.List[tp.Tuple[torch.Tensor, int]]
    steps_at_first_chunk: int
    steps: int


def stream_generation(mg: MusicGen, duration: float, seed: int = 0, prompt: tp.Optional[torch.Tensor] = None,
                      max_duration: tp.Optional[float] = None) -> Run:
    """One generation (sampling, CFG 3) with an AudioStream installed; `max_duration` shortens audiocraft's
    window to take its windowed extension cheaply."""
    if max_duration is not None:
        mg.max_duration = max_duration
    mg.set_generation_params(duration=duration, cfg_coef=3.0, extend_stride=max_duration / 2 if max_duration else 18)
    chunks: tp.List[tp.Tuple[torch.Tensor, int]] = []
    steps = [0, -1]
    mg.set_custom_progress_callback(lambda *_: steps.__setitem__(0, steps[0] + 1))

    def on_audio(chunk: torch.Tensor, start: int) -> None:
        if not chunks:
            steps[1] = steps[0]
        chunks.append((chunk, start))

    torch.manual_seed(seed)
    with torch.inference_mode(), AudioStream(mg, on_audio) as stream:
        if prompt is None:
            wav, tokens = mg.generate(["lo-fi beat"], progress=True, return_tokens=True)
        else:
            wav, tokens = mg.generate_continuation(prompt, mg.sample_rate, ["lo-fi beat"], progress=True,
                                                      return_tokens=True)
    return Run(mg, stream, wav, tokens, chunks, steps[1], steps[0])


def snr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum() / (reference - test).pow(2).sum().clamp_min(1e-30))


def check_stream(run: Run, prompt_frames: int = 0) -> None:
    """What every stream must be: the LM's tokens; chunks of a second, contiguous to the sample, from the end of
    the prompt to the end of the clip; the clip MusicGen returns is the full decode's; levelled, no clipping and
    no seam larger than the music's own sample-to-sample changes."""
    mg, stream, hop = run.mg, run.stream, run.stream.plan.hop
    assert torch.equal(stream.tap.tokens, run.tokens)
    assert run.tokens.shape[-1] == int(mg.duration * mg.frame_rate)
    starts = [start for _, start in run.chunks]
    sizes = [chunk.shape[-1] for chunk, _ in run.chunks]
    assert starts[0] == prompt_frames * hop
    assert [start + size for start, size in zip(starts, sizes, strict=True)][:-1] == starts[1:]
    assert starts[-1] + sizes[-1] == run.wav.shape[-1]
    second = int(mg.frame_rate) * hop
    assert all(size == second for size in sizes[:-1]) and 0 < sizes[-1] <= second
    assert all(chunk.shape[0] == mg.audio_channels for chunk, _ in run.chunks)

    with torch.inference_mode():
        full = mg.compression_model.decode(run.tokens)
    assert run.wav.shape == full.shape
    assert (run.wav - full).abs().max() < 1e-5, "the clip from the streamed chunks is not the full decode's"
    assert snr_db(full, run.wav) > 90

    streamed = torch.cat([chunk for chunk, _ in run.chunks], dim=-1)
    assert streamed.abs().max() < 1.0, "clipped"
    step = streamed.diff(dim=-1).abs()
    for boundary in [start - starts[0] for start in starts[1:]]:  # step[b - 1] crosses the seam at b
        around = torch.cat([step[..., max(0, boundary - second // 2):boundary - 1],
                            step[..., boundary:boundary + second // 2]], dim=-1)
        assert (step[..., boundary - 1] <= around.amax(dim=-1)).all(), f"seam at sample {boundary}"
    # and the level's own seams: the gain (read back through tanh) continues across every boundary
    gain_db = 20 * torch.log10((torch.atanh(streamed.double()) / run.wav[0, :, starts[0]:].double()).abs())
    clear = (streamed.abs() < 0.999) & (run.wav[0, :, starts[0]:].abs() > 1e-3)
    for boundary in [start - starts[0] for start in starts[1:]]:
        before, after = slice(boundary - hop, boundary), slice(boundary, boundary + hop)
        jump = gain_db[..., after][clear[..., after]].median() - gain_db[..., before][clear[..., before]].median()
        assert abs(jump) < 0.1, f"the level jumps by {jump:.2f} dB at sample {boundary}"


def test_stream_is_the_generation_heard_early():
    run = stream_generation(musicgen("debug"), duration=5.0)
    check_stream(run)
    assert len(run.chunks) == 5
    # the first second of music is out once its frames, the delay pattern's 3 steps and the decoder's few
    # frames of look-ahead exist: long before the job is 60 % done
    frames = int(run.mg.frame_rate)
    assert run.steps_at_first_chunk <= frames + 3 + run.stream.plan.lookahead + 1 < 0.6 * run.steps
    # streaming draws nothing from the generation's random numbers: the same seed gives the same music
    mg = run.mg
    torch.manual_seed(0)
    with torch.inference_mode():
        assert torch.equal(mg.generate(["lo-fi beat"], return_tokens=True)[1], run.tokens)
    assert "generate" not in mg.lm.__dict__ and "generate_audio" not in mg.__dict__  # uninstalled


def test_stereo_past_30s_with_the_service_speedups():
    """The service's defaults on CPU (static KV cache, packed weights, bf16 where native), the interleaved
    stereo codec, and audiocraft's second window (30 s + 5 s): only new frames streamed, each once."""
    model = MusicModel.load("debug-stereo", "cpu", "debug", speedups=Speedups(
        precision="auto", cross_kv_cache=True, static_kv_cache=True, packed_weights=True))
    fast_generate = model.musicgen.lm.generate
    run = stream_generation(model.musicgen, duration=35.0)
    assert isinstance(model.musicgen.compression_model, InterleaveStereoCompressionModel)
    check_stream(run)
    assert len(run.chunks) == 35
    assert model.musicgen.lm.generate is fast_generate  # fast_lm's own wrapper is back in place


def test_the_bf16_decoder_and_the_graph_ready_step():
    """The EnCodec decoder in bf16 (the server's default where the CPU has it) runs layer by layer in bf16 and
    still gives the full decode's samples; app/cuda_graph.py's step (eager here; the service installs it on
    CUDA) replaces the LM's `_sample_next_token`, and the tap sees its tokens through it."""
    model = MusicModel.load("debug", "cpu", "debug", speedups=Speedups(decoder_precision="bf16"))
    lm = model.musicgen.lm
    assert cuda_graph.install(lm, 1000, graphs=False).startswith("on")
    graph_step = lm._sample_next_token
    run = stream_generation(model.musicgen, duration=5.0)
    assert run.stream.plan.dtype == torch.bfloat16
    check_stream(run)
    assert lm._sample_next_token is graph_step


@pytest.mark.parametrize("name", ["debug", "hf-tiny"])
def test_continuation_streams_only_after_the_prompt(name):
    mg = musicgen(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        prompt = 0.3 * torch.randn(1, 1, 2 * mg.sample_rate)
    run = stream_generation(mg, duration=4.0, prompt=prompt)
    check_stream(run, prompt_frames=2 * int(mg.frame_rate))
    assert len(run.chunks) == 2


def test_windows_after_a_prompt_on_the_lstm_codec():
    """transformers' EnCodec (the real checkpoints' codec, LSTM and all) through several windows after a prompt:
    the LSTM runs over the clip once, in order, across windows and chunks."""
    mg = musicgen("hf-tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        prompt = 0.3 * torch.randn(1, 1, mg.sample_rate // 2)
    run = stream_generation(mg, duration=4.0, prompt=prompt, max_duration=2.0)
    assert run.stream.plan.lstm is not None
    check_stream(run, prompt_frames=int(mg.frame_rate) // 2)


def test_raising_from_the_callback_stops_the_generation_and_uninstalls():
    mg = musicgen("debug")
    mg.set_generation_params(duration=5.0)
    steps: tp.List[int] = []
    mg.set_custom_progress_callback(lambda done, total: steps.append(done))

    def on_audio(chunk: torch.Tensor, start: int) -> None:
        raise KeyboardInterrupt("client gone")

    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), AudioStream(mg, on_audio):
        mg.generate(["x"])
    assert len(steps) < 0.6 * 5 * mg.frame_rate
    assert "generate" not in mg.lm.__dict__ and "_sample_next_token" not in mg.lm.__dict__
    assert "generate_audio" not in mg.__dict__


@pytest.mark.parametrize("codec", ["debug", "hf-tiny", "hf-tiny-stereo"])
def test_incremental_decoding_is_the_full_decode_at_bounded_cost(codec):
    """Frames pushed in uneven groups, the first ones a prompt: segments of exactly a second from the prompt's
    end, the clip equal to one full decode, and each segment's body (the costly part) run over the segment plus
    its few frames of context only."""
    model = (musicgen("debug") if codec == "debug" else musicgen("hf-tiny")).compression_model
    if codec.endswith("stereo"):
        model = InterleaveStereoCompressionModel(model)
    plan = Plan.of(model)
    frames = int(model.frame_rate)
    codes = torch.randint(0, model.cardinality, (1, model.num_codebooks, 7 * frames + 3))
    seen: tp.List[int] = []
    hook = plan.body[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    decoder = IncrementalDecoder(plan, frames)
    with torch.inference_mode():
        segments = decoder.push(codes[..., :frames + 5], emit=False)
        for start in range(frames + 5, codes.shape[-1], 7):
            segments += decoder.push(codes[..., start:start + 7])
        segments += decoder.finish()
        hook.remove()
        full = model.decode(codes)
    assert [start for _, start in segments] == [(frames + 5 + i * frames) * plan.hop for i in range(6)]
    assert torch.cat([audio for audio, _ in segments], dim=-1).shape[-1] == (6 * frames - 2) * plan.hop
    assert (decoder.clip() - full).abs().max() < 1e-5
    assert max(seen) <= frames + sum(plan.body_reach)
    assert sum(seen) <= codes.shape[-1] + len(seen) * sum(plan.body_reach)


def test_level_measures_as_the_final_normalization_and_moves_slowly():
    """A quiet opening, then a 30 dB louder entry: the gain rises no faster than RISE_DB_PER_S, comes down no
    faster than FALL_DB_PER_S (tanh holds the overshoot inside full scale), never jumps, and ends at the final
    normalization's own gain, measured as it measures it."""
    rate = 32000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        quiet, loud = 0.02 * torch.randn(2, 3 * rate), 0.6 * torch.randn(2, 4 * rate)
    clip = torch.cat([quiet, loud], dim=-1)
    leveler = Leveler(rate)
    out = torch.cat([leveler(clip[..., i:i + rate]) for i in range(0, clip.shape[-1], rate)], dim=-1)
    loudness = torchaudio.functional.loudness(clip, rate).item()
    assert abs(leveler.loudness() - loudness) < 0.05
    assert abs(leveler.gain_db - (-DEMO_LOUDNESS["loudness_headroom_db"] - loudness)) < 0.1
    assert out.abs().max() <= 1.0
    # the gain, read back where the signal is clear of tanh's bend, median per 50 ms
    gain_db = 20 * torch.log10((torch.atanh(out[0].double()) / clip[0].double()).abs())
    clear = (out[0].abs() < 0.5) & (clip[0].abs() > 0.01)
    window = rate // 20
    medians = torch.tensor([gain_db[i:i + window][clear[i:i + window]].median().item()
                            for i in range(0, clip.shape[-1], window) if clear[i:i + window].sum() > 100])
    moves = medians.diff()
    assert moves.max() <= RISE_DB_PER_S / 20 + 0.05 and moves.min() >= -FALL_DB_PER_S / 20 - 0.05


def test_level_leaves_silence_and_clip_mode_alone():
    assert torch.equal(Leveler(32000)(torch.zeros(1, 32000)), torch.zeros(1, 32000))
    assert Leveler(32000, strategy="clip")(torch.tensor([[0.5, 2.0, -3.0]])).tolist() == [[0.5, 1.0, -1.0]]


def test_pcm16_gives_the_samples_of_the_wav_file():
    """Audio events carry exactly the samples the completed WAV holds for the same waveform."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        wav = torch.cat([torch.rand(2, 50000) * 2 - 1, torch.tensor([[1.0, -1.0, 0.5, 1 / 65536]] * 2)], dim=-1)
    data = to_wav(wav, 32000, strategy="clip")
    assert data[-wav.numel() * 2:] == pcm16(wav)
