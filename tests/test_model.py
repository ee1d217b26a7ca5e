"""MusicModel on real audiocraft with the tiny debug models: steps, windows, seeds, stereo, MBD, abort."""

import pytest
import torch

from app import debug_models
from app.generation import Cancelled
from app.model import DIFFUSION_STEPS_PER_BAND, MusicModel
from app.params import GenerationParams


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


@pytest.mark.parametrize("mbd", [False, True])
def test_stereo_model_gives_two_channels(stereo, mbd):
    assert stereo.stereo and stereo.channels == 2
    wav, _ = run(stereo, mbd=mbd)
    assert wav.shape == (2, 2 * 32000) and torch.isfinite(wav).all()
    assert not torch.equal(wav[0], wav[1])  # left and right are decoded from their own token streams


@pytest.mark.parametrize("stage", ["lm", "diffusion"])
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


def test_features_say_what_the_loaded_model_can_do(mono, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert mono.features == {"melody": False}
    assert MusicModel.load("debug-melody", "cpu", "debug").features == {"melody": True}
