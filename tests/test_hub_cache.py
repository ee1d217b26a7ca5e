"""Every released MusicGen family served offline from a filled Hugging Face cache, as on a GPU box without internet.

tests/hub_cache.py builds the cache: tiny random-weight stand-ins under the real ids, in the real files' formats.
Each test here runs `scripts/serve` on one id with `HF_HUB_OFFLINE=1` and generates with and without MBD, and
checks `scripts/fetch_weights.py`'s plan against the files that very load opened, so the plan cannot drift from
what the service reads.
"""

import base64
import pickle
from pathlib import Path

import huggingface_hub
import omegaconf
import pytest
import torch

from app import debug_models
from app.weights import OMEGACONF_GLOBALS
from tests.helpers import Server, events, generate, wav_info
from tests.hub_cache import ENCODEC, MBD, MBD_FILE, MUSICGEN, T5, OpenedFiles, repo_folder

STEREO = {"facebook/musicgen-stereo-small", "facebook/musicgen-stereo-melody"}
# audiocraft as it runs on CUDA, where the CPU speed-ups stay off.
STOCK = {"MUSICGEN_PRECISION": "fp32", "MUSICGEN_CROSS_KV_CACHE": "0", "MUSICGEN_STATIC_KV_CACHE": "0",
         "MUSICGEN_PACKED_WEIGHTS": "0", "MUSICGEN_DECODER_PRECISION": "fp32"}


def cached(env, repo: str, name: str) -> Path:
    path = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=Path(env["HF_HOME"]) / "hub")
    assert isinstance(path, str), f"{repo}/{name} is not in the cache"
    return Path(path)


def planned(fetch_weights, model: str, env):
    """fetch_weights' plan for `model` with MBD, as (repo, file) pairs: those it must fetch, and those it fetches
    where the repository has them. torch.hub's checkpoints are ("torch.hub", file)."""
    required, optional = set(), set()
    for item in fetch_weights.plan([model], mbd=True):
        if isinstance(item, fetch_weights.HubCheckpoint):
            required.add(("torch.hub", item.file))
            continue
        for name in item.files:
            if name == "weights":  # what fetch() picks from the repository's listing
                has_safetensors = isinstance(huggingface_hub.try_to_load_from_cache(
                    item.repo, "model.safetensors", cache_dir=Path(env["HF_HOME"]) / "hub"), str)
                name = "model.safetensors" if has_safetensors else "pytorch_model.bin"
            required.add((item.repo, name))
        optional |= {(item.repo, name) for name in item.optional}
    return required, optional


def test_the_cache_is_laid_out_as_the_hub_client_leaves_it(hub_cache):
    info = huggingface_hub.scan_cache_dir(Path(hub_cache["HF_HOME"]) / "hub")
    assert info.warnings == []
    assert {repo.repo_id for repo in info.repos} == {*MUSICGEN, ENCODEC, T5, MBD}
    for repo in info.repos:
        (revision,) = repo.revisions
        assert revision.refs == {"main"}
        assert (repo_folder(Path(hub_cache["HF_HOME"]), repo.repo_id) / "refs" / "main").read_text() == \
            revision.commit_hash
        assert all(file.file_path.is_symlink() and file.blob_path.is_file() for file in revision.files)
    assert (Path(hub_cache["TORCH_HOME"]) / "hub" / "checkpoints" / debug_models.HTDEMUCS_FILE).is_file()


@pytest.mark.parametrize("model", list(MUSICGEN))
def test_the_checkpoints_have_the_released_formats(hub_cache, fetch_weights, model):
    # Under torch's default weights_only=True, as audiocraft's loaders read them.
    lm = torch.load(cached(hub_cache, model, "state_dict.bin"))
    assert set(lm) == {"xp.cfg", "best_state", "version", "exported"} and isinstance(lm["xp.cfg"], str)
    cfg = omegaconf.OmegaConf.create(lm["xp.cfg"])
    assert (cfg.solver, cfg.sample_rate, cfg.dataset.segment_duration) == ("musicgen", 32000, 30)
    assert cfg.conditioners.description.t5.name == "t5-base"
    assert cfg.interleave_stereo_codebooks.use == (model in STEREO)
    assert cfg.transformer_lm.n_q == (8 if model in STEREO else 4) and cfg.transformer_lm.card == 2048
    assert ("self_wav" in cfg.conditioners) == ("melody" in model)
    compression = torch.load(cached(hub_cache, model, "compression_state_dict.bin"))
    assert compression["pretrained"] == ENCODEC
    # What fetch_weights reads from a downloaded checkpoint to decide what else to fetch.
    assert fetch_weights.named_dependencies(str(cached(hub_cache, model, "state_dict.bin")),
                                            str(cached(hub_cache, model, "compression_state_dict.bin"))) == (
        T5, ENCODEC, "melody" in model)


def test_the_mbd_file_pickles_omegaconf_configs_like_the_real_one(hub_cache):
    path = cached(hub_cache, MBD, MBD_FILE)
    with pytest.raises(pickle.UnpicklingError, match="omegaconf"):
        torch.load(path)
    with torch.serialization.safe_globals(OMEGACONF_GLOBALS):
        package = torch.load(path)
    assert package["sample_rate"] == 32000 and package["n_bands"] == 4
    assert isinstance(package[0]["cfg"], omegaconf.DictConfig) and package[0]["cfg"].solver == "diffusion"


def serve_and_generate(env, model: str, mbd_runs=(False, True)):
    """Serve `model` from the cache, generate 1 s per entry of `mbd_runs`; the health and the files opened."""
    channels = 2 if model in STEREO else 1
    with OpenedFiles(env) as opened, Server({**env, "MUSICGEN_MODEL": model}) as server:
        health = server.wait(timeout=300)
        assert (health["model"], health["channels"], health["model_loaded"]) == (model, channels, True)
        for mbd in mbd_runs:
            body = {"description": "lo-fi beat with mellow piano", "duration": 1, "mbd": mbd, "seed": 7}
            *_, last = events(generate(server.url, body))
            assert last["event"] == "completed", (last, server.output()[-3000:])
            assert wav_info(base64.b64decode(last["audio"])) == (32000, 2, channels, 1.0)
        return health, opened.read()


@pytest.mark.parametrize("model", list(MUSICGEN))
def test_a_released_id_serves_offline_and_reads_what_fetch_weights_fetches(hub_cache, fetch_weights, model):
    # Melody models generate from the description alone too (audiocraft conditions on an empty melody).
    health, opened = serve_and_generate(hub_cache, model)
    assert health["features"]["melody"] is ("melody" in model)
    required, optional = planned(fetch_weights, model, hub_cache)
    assert required - opened == set(), "fetch_weights fetches what the service never reads"
    assert opened - required - optional == set(), "the service reads what fetch_weights does not fetch"


@pytest.mark.parametrize("model", ["facebook/musicgen-small", "facebook/musicgen-melody"])
def test_stock_audiocraft_decoding_serves_too(hub_cache, model):
    health, _ = serve_and_generate({**hub_cache, **STOCK}, model, mbd_runs=(False,))
    assert health["status"] == "ready"
