"""scripts/fetch_weights.py without the network: its plan, its argument checks, and how it reads checkpoints.

The download itself cannot run here (the Hugging Face hub is unreachable); what it would fetch is
checked through --dry-run, and the checkpoint reading on checkpoints in the hub's own format.
"""

import os
import subprocess
import sys

import omegaconf
import pytest
import torch

from app import debug_models
from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "fetch_weights.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_dry_run_lists_model_encodec_t5_and_mbd_and_fetches_nothing(tmp_path):
    result = run("--dry-run", "--hf-home", str(tmp_path / "w"), "--model", "facebook/musicgen-medium",
                 "--model", "facebook/musicgen-stereo-small")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"into {tmp_path / 'w' / 'hub'}" in out
    for line in ("facebook/musicgen-medium: state_dict.bin, compression_state_dict.bin",
                 "facebook/musicgen-stereo-small: state_dict.bin, compression_state_dict.bin",
                 "facebook/encodec_32khz: config.json, model.safetensors",
                 "t5-base: config.json, spiece.model, model.safetensors",
                 "facebook/multiband-diffusion: mbd_musicgen_32khz.th"):
        assert line in out
    assert not (tmp_path / "w").exists()


def test_melody_models_also_fetch_htdemucs_into_torch_home(tmp_path):
    result = run("--dry-run", "--hf-home", str(tmp_path / "hf"), "--torch-home", str(tmp_path / "torch"),
                 "--model", "facebook/musicgen-stereo-melody")
    assert result.returncode == 0, result.stderr
    assert f"into {tmp_path / 'torch' / 'hub' / 'checkpoints'}:\n  955717e8-8726e21a.th from https://" in result.stdout
    assert "955717e8" not in run("--dry-run", "--model", "facebook/musicgen-small").stdout


def test_torch_home_defaults_as_torch_hub_reads_it(tmp_path):
    env = {"TORCH_HOME": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert f"into {tmp_path / 'xdg' / 'torch' / 'hub' / 'checkpoints'}" in run(
        "--dry-run", "--model", "facebook/musicgen-melody", **env).stdout
    assert f"into {tmp_path / 't' / 'hub' / 'checkpoints'}" in run(
        "--dry-run", "--model", "facebook/musicgen-melody", TORCH_HOME=str(tmp_path / "t")).stdout


def test_the_htdemucs_url_is_the_one_demucs_loads(fetch_weights):
    # What demucs.pretrained.get_model("htdemucs") asks torch.hub for, read from demucs' own files.
    import yaml
    from demucs import pretrained

    (signature,) = yaml.safe_load((pretrained.REMOTE_ROOT / "htdemucs.yaml").read_text())["models"]
    assert pretrained._parse_remote_files(pretrained.REMOTE_ROOT / "files.txt")[signature] == \
        fetch_weights.HTDEMUCS_URL
    assert fetch_weights.HTDEMUCS.file == debug_models.HTDEMUCS_FILE


def test_no_mbd_and_default_model(tmp_path):
    result = run("--dry-run", "--no-mbd", "--hf-home", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "facebook/musicgen-small:" in result.stdout
    assert "multiband-diffusion" not in result.stdout


def test_hf_home_defaults_to_the_environment(tmp_path):
    result = run("--dry-run", HF_HOME=str(tmp_path / "cache"))
    assert f"into {tmp_path / 'cache' / 'hub'}" in result.stdout


@pytest.mark.parametrize("model", ["debug", "./app", "not a/valid id", "a/b/c"])
def test_rejects_what_is_not_a_hub_id(model):
    result = run("--dry-run", "--model", model)
    assert result.returncode == 2
    assert "is not a Hugging Face id" in result.stderr


def test_refuses_to_download_when_offline_is_set(tmp_path):
    result = run("--hf-home", str(tmp_path / "w"), HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert not (tmp_path / "w").exists()


def test_reads_the_dependencies_a_checkpoint_names(fetch_weights, tmp_path):
    debug_models.save_checkpoints(str(tmp_path))
    lm, compression = tmp_path / debug_models.LM_FILE, tmp_path / debug_models.COMPRESSION_FILE
    # The debug model has a lookup-table conditioner and its own EnCodec: nothing else to fetch.
    assert fetch_weights.named_dependencies(str(lm), str(compression)) == (None, None, False)

    # The official checkpoints configure a T5 conditioner and point at a pretrained EnCodec.
    package = torch.load(lm, weights_only=True)
    cfg = omegaconf.OmegaConf.create(package["xp.cfg"])
    cfg.conditioners.description = {"model": "t5", "t5": {"name": "google/flan-t5-base", "finetune": False}}
    package["xp.cfg"] = omegaconf.OmegaConf.to_yaml(cfg)
    torch.save(package, lm)
    torch.save({"pretrained": "facebook/encodec_24khz"}, compression)
    assert fetch_weights.named_dependencies(str(lm), str(compression)) == (
        "google/flan-t5-base", "facebook/encodec_24khz", False)
