"""Loading checkpoints in audiocraft's on-disk formats, through the code that loads the real ones.

The tiny files mirror the real ones' structure: LM and EnCodec `state_dict.bin` files with `xp.cfg`
as YAML text + `best_state`, and an MBD file that pickles one omegaconf config per band, which
torch >= 2.6's default `weights_only=True` refuses unless the loader allows those types.
"""

import os
import pickle

import huggingface_hub
import pytest
import torch

from app import debug_models
from app.model import ModelLoadError, MusicModel, load_mbd
from app.params import GenerationParams


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("musicgen-tiny")
    debug_models.save_checkpoints(str(directory))
    return directory


def test_files_have_the_real_layout(checkpoints):
    assert sorted(os.listdir(checkpoints)) == sorted(
        [debug_models.LM_FILE, debug_models.COMPRESSION_FILE, debug_models.MBD_FILE])
    lm = torch.load(checkpoints / debug_models.LM_FILE)  # plain YAML + tensors: fine under weights_only
    assert isinstance(lm["xp.cfg"], str) and "best_state" in lm


def test_the_mbd_file_needs_the_allow_list_like_the_real_one(checkpoints):
    # Guard: if this stopped failing, the test file would no longer mirror the real hazard.
    with pytest.raises(pickle.UnpicklingError, match="omegaconf"):
        torch.load(checkpoints / debug_models.MBD_FILE)


def test_a_local_directory_loads_as_the_same_model(checkpoints):
    loaded = MusicModel.load(str(checkpoints), "cpu", str(checkpoints))
    built = MusicModel.load("debug", "cpu", "debug")
    params = GenerationParams(description="strings", duration=2)
    assert loaded.sample_rate == 32000 and loaded.channels == 1
    assert torch.equal(loaded.generate(params, 5, lambda stage: None), built.generate(params, 5, lambda stage: None))


def test_mbd_loads_from_a_directory_and_from_the_file(checkpoints):
    codec = debug_models.build_compression_model()
    for source in (str(checkpoints), str(checkpoints / debug_models.MBD_FILE)):
        mbd = load_mbd(source, codec, "cpu")
        assert len(mbd.DPs) == debug_models.MBD_BANDS


def test_mbd_through_a_loaded_model_decodes(checkpoints):
    model = MusicModel.load(str(checkpoints), "cpu", str(checkpoints), preload_mbd=True)
    wav = model.generate(GenerationParams(description="x", duration=1, mbd=True), 1, lambda stage: None)
    assert wav.shape == (1, 32000) and torch.isfinite(wav).all()


def test_stereo_checkpoints_load_as_a_stereo_model(tmp_path):
    debug_models.save_checkpoints(str(tmp_path), stereo=True)
    model = MusicModel.load(str(tmp_path), "cpu", str(tmp_path))
    assert model.stereo and model.channels == 2


def test_missing_weights_say_what_to_set(tmp_path, monkeypatch):
    # What an offline GPU box without the weights sees (huggingface_hub reads HF_HUB_OFFLINE at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("AUDIOCRAFT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="MUSICGEN_MODEL.*HF_HUB_OFFLINE"):
        MusicModel.load("facebook/musicgen-small", "cpu", "facebook/multiband-diffusion")
    with pytest.raises(ModelLoadError, match="MUSICGEN_MBD_MODEL"):
        load_mbd(str(tmp_path / "nowhere"), debug_models.build_compression_model(), "cpu")
