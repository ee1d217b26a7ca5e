"""Tiny random-weight MusicGen and MultiBand Diffusion, built with audiocraft's own builders.

`MUSICGEN_MODEL=debug` serves these, so the whole pipeline runs with no download. They are built
from the same kind of training config (`xp.cfg`) that the real checkpoints carry, and
`save_checkpoints` writes them in the real files' on-disk formats, so tests load them through the
very code path that loads facebook/musicgen-* and facebook/multiband-diffusion.

audiocraft's own `get_pretrained('debug')` tokenizes with spaCy's `en_core_web_sm`, which cannot be
installed offline; the LUT conditioner here uses the `noop` tokenizer (one hashed token per prompt).

The melody models (`debug-melody`, `debug-stereo-melody`) condition on a chromagram like facebook/musicgen-melody:
audiocraft's `ChromaStemConditioner` loads demucs' `htdemucs` through torch.hub when it is built, so these
models are built with a tiny HTDemucs, in demucs' own package format under the real file name, in a torch.hub
directory of their own (never the user's `$TORCH_HOME`).
"""

import contextlib
import os
import tempfile
import typing as tp

import omegaconf
import torch
from audiocraft.models import MusicGen, builders

LM_FILE = "state_dict.bin"
COMPRESSION_FILE = "compression_state_dict.bin"
MBD_FILE = "mbd_musicgen_32khz.th"

SAMPLE_RATE = 32000
SEGMENT_SECONDS = 30
CODEC_DIM = 32
MBD_BANDS = 4
# `debug-small`: random weights at musicgen-small's LM size (300M parameters, 24 layers, 4 codebooks of 2048,
# attention through torch's scaled_dot_product_attention as the real checkpoints' `memory_efficient` asks),
# on a cheap EnCodec with the real one's 50 Hz frame rate and codebook size. For benchmarks, not for tests.
SMALL_LM = {"dim": 1024, "num_heads": 16, "num_layers": 24, "card": 2048, "memory_efficient": True}
SMALL_CODEC = {"bins": 2048, "ratios": [8, 5, 4, 4]}
# The built-in tiny models, by MUSICGEN_MODEL name.
MODELS: tp.Dict[str, tp.Dict[str, bool]] = {
    "debug": {}, "debug-stereo": {"stereo": True}, "debug-small": {"small": True},
    "debug-melody": {"melody": True}, "debug-stereo-melody": {"stereo": True, "melody": True},
}
# torch.hub's file for demucs' `htdemucs` (demucs 4.0.1, demucs/remote/files.txt): what ChromaStemConditioner loads.
HTDEMUCS_FILE = "955717e8-8726e21a.th"
HTDEMUCS_SOURCES = ["drums", "bass", "other", "vocals"]
# audiocraft's chroma2music conditioner config (config/conditioner/chroma2music.yaml in its repository).
CHROMA_STEM = {"sample_rate": SAMPLE_RATE, "n_chroma": 12, "radix2_exp": 14, "argmax": True,
               "match_len_on_eval": False, "eval_wavs": None, "n_eval_wavs": 100, "cache_path": None}


def compression_config(device: str = "cpu", bins: int = 400, ratios: tp.Sequence[int] = (10, 8, 16),
                       kmeans_iters: int = 1) -> tp.Dict[str, tp.Any]:
    """audiocraft's debug EnCodec (25 Hz at 32 kHz, 4 codebooks of 400) as a training config; `debug-small`
    passes 2048 codes and the real model's 50 Hz ratios."""
    return {
        "device": device, "dtype": "float32", "sample_rate": SAMPLE_RATE, "channels": 1,
        "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": SAMPLE_RATE, "channels": 1,
                    "causal": False, "renormalize": False},
        "seanet": {"dimension": CODEC_DIM, "channels": 1, "n_filters": 4, "n_residual_layers": 1,
                   "ratios": list(ratios), "encoder": {}, "decoder": {}},
        "rvq": {"n_q": 4, "bins": bins, "decay": 0.99, "kmeans_init": True, "kmeans_iters": kmeans_iters,
                "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False, "q_dropout": False},
    }


def lm_config(stereo: bool = False, device: str = "cpu", dim: int = 16, num_heads: int = 4,
              num_layers: int = 2, card: int = 400, memory_efficient: bool = False,
              melody: bool = False) -> tp.Dict[str, tp.Any]:
    """audiocraft's debug LM as a training config; `stereo` interleaves two EnCodec streams (8 codebooks);
    `melody` adds the chromagram conditioner and, like musicgen-melody, prepends both conditions to the input."""
    n_q = 8 if stereo else 4
    conditioners: tp.Dict[str, tp.Any] = {
        "description": {"model": "lut", "lut": {"n_bins": 128, "dim": dim, "tokenizer": "noop"}}}
    fuser = {"sum": [], "prepend": [], "cross": ["description"], "input_interpolate": []}
    if melody:
        conditioners["self_wav"] = {"model": "chroma_stem", "chroma_stem": dict(CHROMA_STEM)}
        fuser.update(prepend=["self_wav", "description"], cross=[])
    return {
        "device": device, "dtype": "float32", "lm_model": "transformer_lm",
        "dataset": {"segment_duration": SEGMENT_SECONDS},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": list(range(n_q)), "flatten_first": 0,
                                                             "empty_initial": 0}},
        "transformer_lm": {"n_q": n_q, "card": card, "dim": dim, "num_heads": num_heads,
                           "num_layers": num_layers, "hidden_scale": 4, "custom": True, "causal": True,
                           "memory_efficient": memory_efficient,
                           "norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False},
        "conditioners": conditioners,
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, **fuser},
        "classifier_free_guidance": {"training_dropout": 0.0, "inference_coef": 3.0},
        "attribute_dropout": {},
        "interleave_stereo_codebooks": {"use": stereo, "per_timestep": False},
    }


def mbd_band_config(band: int, device: str = "cpu") -> tp.Dict[str, tp.Any]:
    """One band's config, shaped like the training config pickled in mbd_musicgen_32khz.th."""
    return {
        "device": device, "sample_rate": SAMPLE_RATE, "channels": 1, "n_q": 4,
        "schedule": {"repartition": "power", "variable_step_batch": True, "beta_t0": 1.0e-5,
                     "beta_t1": 2.9e-2, "beta_exp": 7.5, "num_steps": 1000, "variance": "beta", "clip": 5.0,
                     "rescale": 1.0, "n_bands": None, "noise_scale": 1.0},
        "diffusion_unet": {"hidden": 4, "depth": 1, "growth": 2.0, "max_channels": 16, "emb_all_layers": False,
                           "cross_attention": False, "bilstm": False, "transformer": False, "codec_dim": CODEC_DIM},
        "processor": {"name": "multi_band_processor", "use": True, "n_bands": 8, "num_samples": 10_000,
                      "power_std": 1.0},
        "filter": {"use": True, "n_bands": MBD_BANDS, "idx_band": band, "cutoffs": None},
        "optim": {"optimizer": "adam", "adam": {"betas": [0.9, 0.999], "weight_decay": 0.0}},
    }


def build_compression_model(device: str = "cpu", **codec: tp.Any) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        cfg = omegaconf.OmegaConf.create(compression_config(device, **codec))
        model = builders.get_compression_model(cfg)
        # Initialise the k-means codebooks (one sample vector per code at least).
        model.quantizer(torch.randn(8, CODEC_DIM, max(128, cfg.rvq.bins // 8), device=device), 1)
    return model.eval()


def build_lm(stereo: bool = False, device: str = "cpu", melody: bool = False, **sizes: tp.Any) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]), (tiny_htdemucs_hub() if melody else contextlib.nullcontext()):
        torch.manual_seed(2)
        cfg = omegaconf.OmegaConf.create(lm_config(stereo, device, melody=melody, **sizes))
        lm = builders.get_lm_model(cfg)
    lm.cfg = cfg  # what audiocraft's loader attaches: MusicGen reads max duration and stereo wrapping from it
    return lm.eval()


def build_musicgen(name: str = "debug", device: str = "cpu") -> MusicGen:
    """One of the built-in tiny models (`MODELS`): mono, stereo through audiocraft's interleaving wrapper,
    melody-conditioned, or the musicgen-small-sized `debug-small` (mono)."""
    kind = MODELS[name]
    if kind.get("small"):
        return MusicGen(name, build_compression_model(device, **SMALL_CODEC), build_lm(False, device, **SMALL_LM))
    return MusicGen(name, build_compression_model(device),
                    build_lm(kind.get("stereo", False), device, melody=kind.get("melody", False)))


def htdemucs_package() -> tp.Dict[str, tp.Any]:
    """A tiny HTDemucs (28 k parameters instead of 42 M) serialized as demucs serializes its released models."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import serialize_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        # depth 4 as the real model: shallower ones attend over sequences 16x longer and run minutes, not seconds.
        model = HTDemucs(HTDEMUCS_SOURCES, channels=2, depth=4, t_layers=1, t_heads=1, dconv_comp=2, segment=2)
    return serialize_model(model, omegaconf.OmegaConf.create({}), half=False)


def save_htdemucs(hub_dir: str) -> str:
    """Write the tiny HTDemucs where torch.hub looks for the real one (`<hub_dir>/checkpoints/<file>`)."""
    path = os.path.join(hub_dir, "checkpoints", HTDEMUCS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(htdemucs_package(), path)
    return path


@contextlib.contextmanager
def tiny_htdemucs_hub() -> tp.Iterator[str]:
    """torch.hub pointed, for the duration, at a temporary directory holding the tiny HTDemucs; torch.hub
    loads a file it finds there without checking its hash (it checks only what it downloads)."""
    previous = torch.hub._hub_dir  # None: follow $TORCH_HOME; restored exactly afterwards
    with tempfile.TemporaryDirectory(prefix="musicgen-htdemucs-") as hub:
        save_htdemucs(hub)
        torch.hub.set_dir(hub)
        try:
            yield hub
        finally:
            torch.hub._hub_dir = previous


def mbd_package(device: str = "cpu") -> tp.Dict[tp.Any, tp.Any]:
    """A tiny MBD checkpoint with the structure of the real `mbd_musicgen_32khz.th`:
    `sample_rate`, `n_bands`, and per band index a pickled omegaconf `cfg` plus model and processor states.
    """
    package: tp.Dict[tp.Any, tp.Any] = {"sample_rate": SAMPLE_RATE, "n_bands": MBD_BANDS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for band in range(MBD_BANDS):
            cfg = omegaconf.OmegaConf.create(mbd_band_config(band, device))
            model = builders.get_diffusion_model(cfg)
            processor = builders.get_processor(cfg.processor, sample_rate=SAMPLE_RATE)
            # An unfitted processor has zero statistics and turns every sample into NaN.
            processor.project_sample(torch.randn(4, 1, SAMPLE_RATE))
            package[band] = {"cfg": cfg, "model_state": model.state_dict(),
                             "processor_state": processor.state_dict()}
    return package


def save_checkpoints(directory: str, stereo: bool = False) -> None:
    """Write the tiny model in audiocraft's on-disk formats: an LM and an EnCodec checkpoint
    (`xp.cfg` as YAML text + `best_state`, as on the Hugging Face hub) and an MBD file."""
    os.makedirs(directory, exist_ok=True)
    lm_cfg = omegaconf.OmegaConf.create(lm_config(stereo))
    compression_cfg = omegaconf.OmegaConf.create(compression_config())
    torch.save({"xp.cfg": omegaconf.OmegaConf.to_yaml(lm_cfg), "best_state": build_lm(stereo).state_dict()},
               os.path.join(directory, LM_FILE))
    torch.save({"xp.cfg": omegaconf.OmegaConf.to_yaml(compression_cfg),
                "best_state": build_compression_model().state_dict()},
               os.path.join(directory, COMPRESSION_FILE))
    torch.save(mbd_package(), os.path.join(directory, MBD_FILE))
