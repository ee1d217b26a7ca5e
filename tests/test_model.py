"""MusicModel on real audiocraft with the tiny debug models: steps, windows, seeds, stereo, MBD, abort."""

import pytest
import torch

from app import debug_models, stream_decode
from app.generation import Cancelled
from app.model import DECODE_PIECE_SECONDS, DIFFUSION_STEPS_PER_BAND, MusicModel
from app.params import AudioClip, GenerationParams, UnsupportedRequest
from tests.audio_samples import melody


@pytest.fixture(scope="module")
def mono():
    return MusicModel.load("debug", "cpu", "debug")


@pytest.fixture(scope="module")
def stereo():
    return MusicModel.load("debug-stereo", "cpu", "debug")


def run(model, on_step=None, **fields):
    counts = {}

    def count(stage):
        counts[stage] = counts.get(stage, 0) + 1
        if on_step:
            on_step(stage)

    params = GenerationParams(**{"description": "drums and bass", "duration": 2, **fields})
    return model.generate(params, fields.get("seed", 0), count), counts


@pytest.mark.parametrize("duration", [1, 30, 31, 47, 60])
def test_planned_lm_steps_match_the_callbacks_audiocraft_makes(mono, duration):
    # Past 30 s audiocraft generates in overlapping windows and restarts its own count each window.
    wav, counts = run(mono, duration=duration)
    assert counts["lm"] == mono.lm_steps(duration)
    assert counts["decode"] == 1
    assert wav.shape == (1, duration * 32000)


@pytest.fixture
def one_thread():
    """torch's default of 2 threads on this shared 2-core machine collapses under load: a 32 s melody clip
    took 328 s in a busy test run, 29 s with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clip(seconds, channels=1):
    return AudioClip(torch.randn(channels, round(seconds * 32000)) * 0.1, 32000)


@pytest.mark.parametrize("duration, prompt_seconds", [(2, 1.0), (5, 1.37), (31, 29.0), (35, 1.5)])
def test_planned_lm_steps_match_the_callbacks_with_an_audio_prompt(mono, duration, prompt_seconds, one_thread):
    # The prompt's frames are the first window's prompt: fewer steps, still counted exactly (also windowed).
    prompt = clip(prompt_seconds)
    wav, counts = run(mono, duration=duration, audio_prompt=prompt)
    assert counts["lm"] == mono.lm_steps(duration, prompt) < mono.lm_steps(duration)
    assert wav.shape == (1, duration * 32000)


def test_a_continuation_begins_with_its_prompt_as_the_codec_renders_it(mono):
    prompt = clip(3.0)
    codec = mono.musicgen.compression_model
    with torch.no_grad():
        rendered = codec.decode(codec.encode(prompt.wav[None])[0])[0]
    first, _ = run(mono, duration=5, seed=1, audio_prompt=prompt)
    second, _ = run(mono, duration=5, seed=2, audio_prompt=prompt)
    kept = 3 * 32000 - 6400  # the decoder's last frames before the seam also hear what follows
    assert torch.allclose(first[:, :kept], rendered[:, :kept], atol=1e-5)
    assert torch.equal(first[:, :kept], second[:, :kept])
    assert not torch.allclose(first[:, 3 * 32000:], second[:, 3 * 32000:], atol=1e-3)


@pytest.fixture(scope="module")
def melodic():
    return MusicModel.load("debug-melody", "cpu", "debug")


def tune(seconds=4.0):
    return AudioClip(torch.from_numpy(melody(seconds).T.copy()), 32000)


@pytest.mark.parametrize("prompt_seconds", [None, 1.5])
def test_a_melody_changes_the_clip_alone_or_while_continuing_a_prompt(melodic, prompt_seconds, one_thread):
    prompt = clip(prompt_seconds) if prompt_seconds else None
    followed, counts = run(melodic, duration=3, seed=5, melody=tune(), audio_prompt=prompt)
    plain, _ = run(melodic, duration=3, seed=5, audio_prompt=prompt)
    assert counts["lm"] == melodic.lm_steps(3, prompt)
    assert followed.shape == plain.shape == (1, 3 * 32000)
    assert (followed - plain).abs().mean() > 1e-4  # same seed, same text: the melody made the difference
    if prompt is not None:  # ... and the prompt is kept either way
        kept = round(1.5 * 32000) - 6400
        assert torch.allclose(followed[:, :kept], plain[:, :kept], atol=1e-5)


@pytest.mark.parametrize("prompt_seconds", [None, 2.0])
def test_a_melody_past_the_30_s_window_alone_or_with_a_prompt(melodic, prompt_seconds, one_thread):
    # audiocraft gives each window its own slice of the melody (looping a short one).
    prompt = clip(prompt_seconds) if prompt_seconds else None
    wav, counts = run(melodic, duration=32, seed=6, melody=tune(), audio_prompt=prompt)
    assert counts["lm"] == melodic.lm_steps(32, prompt)
    assert wav.shape == (1, 32 * 32000) and torch.isfinite(wav).all() and wav[:, 30 * 32000:].abs().max() > 0


def test_a_stereo_model_continues_a_mono_prompt_in_stereo(stereo):
    wav, counts = run(stereo, duration=3, audio_prompt=clip(1.5))
    assert wav.shape == (2, 3 * 32000) and counts["lm"] == stereo.lm_steps(3, clip(1.5))


def test_what_the_model_cannot_do_is_refused_naming_the_field(mono):
    assert not mono.melody
    with pytest.raises(UnsupportedRequest, match=r"^melody: the loaded model \(debug\) does not take a melody"):
        mono.check(GenerationParams("x", melody=clip(2.0)))
    with pytest.raises(UnsupportedRequest, match=r"^audio_prompt: 29.50 s long, at most 29 s"):
        mono.check(GenerationParams("x", duration=40, audio_prompt=clip(29.5)))
    mono.check(GenerationParams("x", duration=40, audio_prompt=clip(29.0)))
    with pytest.raises(UnsupportedRequest, match=r"^audio_prompt: 3.00 s long, so duration \(3 s"):
        GenerationParams("x", duration=3, audio_prompt=clip(3.0))  # as long as the whole clip


def test_same_seed_same_audio_other_seed_other_audio(mono):
    first, _ = run(mono, seed=123)
    again, _ = run(mono, seed=123)
    other, _ = run(mono, seed=124)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_greedy_decoding_with_temperature_zero_ignores_the_seed(mono):
    a, _ = run(mono, temperature=0.0, seed=1)
    b, _ = run(mono, temperature=0.0, seed=2)
    assert torch.equal(a, b)


def test_mbd_decodes_with_one_callback_per_diffusion_step(mono):
    wav, counts = run(mono, mbd=True)
    assert counts["diffusion"] == mono.diffusion_steps() == 4 * DIFFUSION_STEPS_PER_BAND
    assert wav.shape == (1, 2 * 32000) and torch.isfinite(wav).all() and wav.abs().max() > 0


@pytest.mark.parametrize("model", ["mono", "stereo"])
def test_a_clip_not_streamed_is_decoded_in_pieces_into_the_whole_decodes_audio(model, request, monkeypatch):
    """On a CPU the final decode runs DECODE_PIECE_SECONDS at a time (each piece's body over the piece and its
    context only), and gives the clip that decoding the tokens whole gives."""
    model = request.getfixturevalue(model)
    calls, widths = [], []
    decode = stream_decode.decode
    monkeypatch.setattr(stream_decode, "decode", lambda plan, codes, piece_frames: calls.append(
        (codes, piece_frames)) or decode(plan, codes, piece_frames))
    hook = model.stream_plan.body[0].register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[-1]))
    try:
        wav, _ = run(model, duration=9)
    finally:
        hook.remove()
    (codes, piece_frames), = calls
    assert piece_frames == DECODE_PIECE_SECONDS * model.musicgen.frame_rate < codes.shape[-1] / 2
    assert len(widths) == 3 and max(widths) <= piece_frames + sum(model.stream_plan.body_reach)
    with torch.inference_mode():
        whole = model.musicgen.compression_model.decode(codes)
    assert wav.shape == (model.channels, 9 * 32000) and whole.shape == (1, *wav.shape)
    assert (wav - whole[0]).abs().max() < 1e-5 and wav.abs().max() > 0


def test_mbd_leaves_out_the_encodec_decode_whose_audio_it_replaces(mono):
    """MBD decodes the tokens with EnCodec once itself (the reference it re-equalizes its bands to): MusicGen's
    own final decode, whose audio MBD's replaces, does not run as well."""
    runs = []
    hook = mono.musicgen.compression_model.decoder.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        wav, _ = run(mono, mbd=True)
    finally:
        hook.remove()
    assert runs == [1] and wav.abs().max() > 0


@pytest.mark.parametrize("mbd", [False, True])
def test_stereo_model_gives_two_channels(stereo, mbd):
    assert stereo.stereo and stereo.channels == 2
    wav, _ = run(stereo, mbd=mbd)
    assert wav.shape == (2, 2 * 32000) and torch.isfinite(wav).all()
    assert not torch.equal(wav[0], wav[1])  # left and right are decoded from their own token streams


@pytest.mark.parametrize("stage", ["layer", "lm", "diffusion"])
def test_raising_from_a_step_aborts_and_the_next_generation_works(mono, stage):
    steps = []

    def cancel_on_third(seen):
        if seen == stage:
            steps.append(seen)
            if len(steps) == 3:
                raise Cancelled("test")

    with pytest.raises(Cancelled):
        run(mono, on_step=cancel_on_third, mbd=True)
    assert len(steps) == 3  # nothing ran past the step that raised
    wav, counts = run(mono, mbd=True)
    assert counts["lm"] == mono.lm_steps(2) and counts["diffusion"] == mono.diffusion_steps()


def test_the_tiny_htdemucs_loads_through_demucs_own_loader_from_torch_home(tmp_path, monkeypatch):
    # What a melody model does at load on a box whose $TORCH_HOME holds htdemucs: torch.hub finds the file
    # under its real name and loads it without a hash check or a download.
    from demucs import pretrained

    path = debug_models.save_htdemucs(str(tmp_path / "hub"))
    assert path.endswith("hub/checkpoints/955717e8-8726e21a.th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    bag = pretrained.get_model("htdemucs")
    assert bag.sources == debug_models.HTDEMUCS_SOURCES
    assert sum(p.numel() for p in bag.parameters()) < 100_000  # ours, not the 42 M-parameter download


@pytest.mark.parametrize("name", ["debug-melody", "debug-stereo-melody"])
def test_melody_models_generate_from_text_alone_and_leave_torch_hub_as_it_was(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = MusicModel.load(name, "cpu", "debug")
    assert model.melody and not MusicModel.load("debug", "cpu", "debug").melody
    assert torch.hub.get_dir() == str(tmp_path / "hub") and not (tmp_path / "hub").exists()  # untouched
    wav, counts = run(model, seed=3)
    assert wav.shape == (model.channels, 2 * 32000) and torch.isfinite(wav).all()
    assert counts["lm"] == model.lm_steps(2)
