"""Loading checkpoints in audiocraft's on-disk formats, through the code that loads the real ones.

The tiny files mirror the real ones' structure: LM and EnCodec `state_dict.bin` files with `xp.cfg`
as YAML text + `best_state`, and an MBD file that pickles one omegaconf config per band, which
torch >= 2.6's default `weights_only=True` refuses unless the loader allows those types.
"""

import os
import pathlib
import pickle
import sys

import huggingface_hub
import omegaconf
import pytest
import torch

from app import debug_models
from app.model import MusicModel
from app.params import GenerationParams
from app.weights import ModelLoadError, load_mbd
from tests.helpers import Server, events, generate


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


def test_a_missing_package_is_named_not_taken_for_missing_weights(tmp_path, monkeypatch):
    # A melody checkpoint on a box whose environment lacks demucs (the lock once left it out).
    debug_models.save_checkpoints(str(tmp_path))
    lm = debug_models.build_lm(melody=True)
    torch.save({"xp.cfg": omegaconf.OmegaConf.to_yaml(lm.cfg), "best_state": lm.state_dict()},
               tmp_path / debug_models.LM_FILE)
    monkeypatch.setitem(sys.modules, "demucs", None)  # `import demucs` now fails as if it were not installed
    with pytest.raises(ModelLoadError) as failure:
        MusicModel.load(str(tmp_path), "cpu", "debug")
    message = str(failure.value)
    assert "the Python package 'demucs' is missing" in message and "requirements.txt" in message
    assert "fetch the weights" not in message


def save_mbd_with_a_path(directory):
    """An MBD file whose config holds a path, as an omegaconf PathNode: it pickles pathlib.PosixPath."""
    package = debug_models.mbd_package()
    for band in range(package["n_bands"]):
        package[band]["cfg"].checkpoint_dir = pathlib.Path("/checkpoints/mbd")
    torch.save(package, directory / debug_models.MBD_FILE)


def test_a_type_weights_only_refuses_is_named_with_the_setting_that_allows_it(tmp_path):
    save_mbd_with_a_path(tmp_path)
    codec = debug_models.build_compression_model()
    with pytest.raises(ModelLoadError) as failure:
        load_mbd(str(tmp_path), codec, "cpu")
    assert "pickles pathlib.PosixPath" in str(failure.value)
    assert "MUSICGEN_TRUSTED_CHECKPOINT_TYPES=pathlib.PosixPath" in str(failure.value)
    mbd = load_mbd(str(tmp_path), codec, "cpu", trusted_types=["pathlib.PosixPath"])
    assert len(mbd.DPs) == debug_models.MBD_BANDS
    with pytest.raises(ModelLoadError, match="MUSICGEN_TRUSTED_CHECKPOINT_TYPES names 'pathlib.NoSuchPath'"):
        load_mbd(str(tmp_path), codec, "cpu", trusted_types=["pathlib.NoSuchPath"])


def test_the_server_takes_the_trusted_types_from_its_setting(tmp_path):
    save_mbd_with_a_path(tmp_path)
    env = {"MUSICGEN_MBD_MODEL": str(tmp_path), "MUSICGEN_TRUSTED_CHECKPOINT_TYPES": "pathlib.PosixPath"}
    with Server(env) as server:
        server.wait()
        *_, completed = events(generate(server.url, {"description": "strings", "duration": 1, "mbd": True}))
    assert completed["event"] == "completed", completed
