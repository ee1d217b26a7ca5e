"""Tiny random-weight MusicGen and MultiBand Diffusion, built with audiocraft's own builders.

`MUSICGEN_MODEL=debug` serves these, so the whole pipeline runs with no download. They are built
from the same kind of training config (`xp.cfg`) that the real checkpoints carry, and
`save_checkpoints` writes them in the real files' on-disk formats, so tests load them through the
very code path that loads facebook/musicgen-* and facebook/multiband-diffusion.

audiocraft's own `get_pretrained('debug')` tokenizes with spaCy's `en_core_web_sm`, which cannot be
installed offline; the LUT conditioner here uses the `noop` tokenizer (one hashed token per prompt).
"""

import os
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


def compression_config(device: str = "cpu") -> tp.Dict[str, tp.Any]:
    """audiocraft's debug EnCodec (25 Hz at 32 kHz, 4 codebooks of 400) as a training config."""
    return {
        "device": device, "dtype": "float32", "sample_rate": SAMPLE_RATE, "channels": 1,
        "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": SAMPLE_RATE, "channels": 1,
                    "causal": False, "renormalize": False},
        "seanet": {"dimension": CODEC_DIM, "channels": 1, "n_filters": 4, "n_residual_layers": 1,
                   "ratios": [10, 8, 16], "encoder": {}, "decoder": {}},
        "rvq": {"n_q": 4, "bins": 400, "decay": 0.99, "kmeans_init": True, "kmeans_iters": 1,
                "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False, "q_dropout": False},
    }


def lm_config(stereo: bool = False, device: str = "cpu", dim: int = 16, num_heads: int = 4,
              num_layers: int = 2, card: int = 400) -> tp.Dict[str, tp.Any]:
    """audiocraft's debug LM as a training config; `stereo` interleaves two EnCodec streams (8 codebooks)."""
    n_q = 8 if stereo else 4
    return {
        "device": device, "dtype": "float32", "lm_model": "transformer_lm",
        "dataset": {"segment_duration": SEGMENT_SECONDS},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": list(range(n_q)), "flatten_first": 0,
                                                             "empty_initial": 0}},
        "transformer_lm": {"n_q": n_q, "card": card, "dim": dim, "num_heads": num_heads,
                           "num_layers": num_layers, "hidden_scale": 4, "custom": True, "causal": True,
                           "norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False},
        "conditioners": {"description": {"model": "lut", "lut": {"n_bins": 128, "dim": dim,
                                                                 "tokenizer": "noop"}}},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
                  "sum": [], "prepend": [], "cross": ["description"], "input_interpolate": []},
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


def build_compression_model(device: str = "cpu") -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        cfg = omegaconf.OmegaConf.create(compression_config(device))
        model = builders.get_compression_model(cfg)
        model.quantizer(torch.randn(8, CODEC_DIM, 128, device=device), 1)  # initialise the k-means codebooks
    return model.eval()


def build_lm(stereo: bool = False, device: str = "cpu", **sizes: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        cfg = omegaconf.OmegaConf.create(lm_config(stereo, device, **sizes))
        lm = builders.get_lm_model(cfg)
    lm.cfg = cfg  # what audiocraft's loader attaches: MusicGen reads max duration and stereo wrapping from it
    return lm.eval()


def build_musicgen(stereo: bool = False, device: str = "cpu") -> MusicGen:
    """The tiny text-to-music model (mono, or stereo through audiocraft's interleaving wrapper)."""
    name = "debug-stereo" if stereo else "debug"
    return MusicGen(name, build_compression_model(device), build_lm(stereo, device))


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
