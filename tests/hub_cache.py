"""A miniature Hugging Face hub cache: tiny random-weight stand-ins for every file a released MusicGen loads.

The real ids, the real files and formats, laid out as the hub's client leaves them under `HF_HOME/hub`
(`models--org--name/blobs/<hash>`, `snapshots/<commit>/<file>` linking to the blob, `refs/main`), so a
served `MUSICGEN_MODEL=facebook/musicgen-small` with `HF_HUB_OFFLINE=1` goes down the path a GPU box
with real weights takes: `hf_hub_download` -> the LM checkpoint (`xp.cfg` + `best_state`) -> T5 through
transformers -> the `pretrained` indirection to transformers' EnCodec -> MultiBand Diffusion.

Everything is built with audiocraft's and transformers' own classes: the LMs' `xp.cfg` is composed by
Hydra from audiocraft's own config files (tests/audiocraft_config, copied from the audiocraft 1.3.0
sdist because the wheel leaves them out) with audiocraft's `xsmall` scale, and the LM and compression
checkpoints are written by audiocraft's release tool (`audiocraft.utils.export`). Melody models also
need Demucs' `htdemucs` in `TORCH_HOME` (what torch.hub reads), written by `app.debug_models`.

The build runs in a child process whose `HF_HOME`/`TORCH_HOME` point at the cache being built, because
building an LM loads its T5 (and, for melody, htdemucs) from there. By hand:

    .venv/bin/python -m tests.hub_cache /tmp/minicache
    HF_HOME=/tmp/minicache/huggingface TORCH_HOME=/tmp/minicache/torch HF_HUB_OFFLINE=1 \\
        MUSICGEN_MODEL=facebook/musicgen-melody scripts/serve
"""

import ctypes
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import typing as tp
import warnings
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "audiocraft_config"
ENCODEC, T5, MBD = "facebook/encodec_32khz", "t5-base", "facebook/multiband-diffusion"
MBD_FILE, MBD_BANDS = "mbd_musicgen_32khz.th", 4
# Each released id: audiocraft's solver config for its family, and whether it is a stereo fine-tune.
MUSICGEN = {
    "facebook/musicgen-small": ("musicgen/musicgen_base_32khz", False),
    "facebook/musicgen-stereo-small": ("musicgen/musicgen_base_32khz", True),
    "facebook/musicgen-melody": ("musicgen/musicgen_melody_32khz", False),
    "facebook/musicgen-stereo-melody": ("musicgen/musicgen_melody_32khz", True),
}
# The stereo fine-tunes' overrides, as audiocraft/grids/musicgen/musicgen_stereo_finetune_32khz.py binds them.
STEREO = ["codebooks_pattern.delay.delays=[0,0,1,1,2,2,3,3]", "transformer_lm.n_q=8",
          "interleave_stereo_codebooks.use=true", "channels=2"]
# audiocraft's own debugging scale (dim 64, 2 heads, 2 layers) instead of `small` (dim 1024, 24 layers).
TINY_LM = ["model/lm/model_scale=xsmall"]
# EnCodec: the real one's latent size is 128 and its first convolution has 64 filters.
CODEC_HIDDEN, CODEC_FILTERS = 16, 2
# Prompts the tests send, and some more music words, to train the sentencepiece model on.
CORPUS = ["lo-fi beat with mellow piano", "epic orchestral trailer", "ambient pads", "strings", "jazz trio",
          "an upbeat electronic dance track with heavy bass and bright synths", "calm acoustic guitar melody",
          "a rock song with drums, electric guitar and a catchy chorus", "80s synthwave with retro drums"]


def build(root: Path, timeout: float = 600) -> tp.Dict[str, str]:
    """Build the cache under `root` and return the environment that serves from it (HF_HOME, TORCH_HOME, offline)."""
    env = environment(root)
    subprocess.run([sys.executable, "-m", "tests.hub_cache", str(root)], cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, **env}, check=True, timeout=timeout)
    return env


def environment(root: Path) -> tp.Dict[str, str]:
    return {"HF_HOME": str(root / "huggingface"), "TORCH_HOME": str(root / "torch"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def repo_folder(hf_home: Path, repo_id: str) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def publish(hf_home: Path, repo_id: str, staging: Path) -> None:
    """Move the files of `staging` into the cache as the hub client stores a download of `repo_id`'s main."""
    folder = repo_folder(hf_home, repo_id)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex revision; refs/main names it
    snapshot = folder / "snapshots" / commit
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = folder / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, blob)
        link = snapshot / path.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


class OpenedFiles:
    """Which files of the cache any process opens while this watches (Linux inotify).

    inotify sees every open(2), also those of C and Rust code (safetensors reads weights from Rust), which
    Python's audit hooks miss. It reports the file actually opened, so the cache's blobs (snapshots only
    link to them) and torch.hub's checkpoints are watched, and blobs are mapped back to the files they are.
    """

    IN_OPEN = 0x20
    HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

    def __init__(self, env: tp.Mapping[str, str]):
        hf_hub, self.checkpoints = Path(env["HF_HOME"]) / "hub", Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
        self.names: tp.Dict[Path, tp.Tuple[str, str]] = {}  # blob or checkpoint -> (repo id or "torch.hub", file)
        for snapshot in hf_hub.glob("models--*/snapshots/*"):
            repo = snapshot.parts[-3][len("models--"):].replace("--", "/")
            for link in snapshot.rglob("*"):
                if link.is_symlink():
                    self.names[link.resolve()] = (repo, link.relative_to(snapshot).as_posix())
        self.names.update({path: ("torch.hub", path.name) for path in self.checkpoints.glob("*")})
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watched: tp.Dict[int, Path] = {}
        for directory in {path.parent for path in self.names}:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
            self.watched[wd] = directory

    def read(self) -> tp.Set[tp.Tuple[str, str]]:
        """(repo id, file name) of every file opened since the watch began, ("torch.hub", name) for checkpoints."""
        opened: tp.Set[tp.Tuple[str, str]] = set()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return opened
            offset = 0
            while offset < len(data):
                wd, _, _, length = self.HEADER.unpack_from(data, offset)
                name = data[offset + self.HEADER.size:offset + self.HEADER.size + length].rstrip(b"\0")
                offset += self.HEADER.size + length
                path = self.watched[wd] / os.fsdecode(name)
                if name and path in self.names:
                    opened.add(self.names[path])

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "OpenedFiles":
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.close()


def compose(solver: str, overrides: tp.Sequence[str] = ()) -> tp.Any:
    """A training config as audiocraft's `dora run solver=...` composes it (its train.py: version_base 1.1)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with warnings.catch_warnings():  # Hydra 1.3 on omegaconf 2.4: deprecation notices about its own calls
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.1"):
            return hydra_compose("config", overrides=[f"solver={solver}", *overrides])


def save_encodec(directory: Path) -> None:
    import torch
    import transformers

    # facebook/encodec_32khz as transformers converted it (its convert_encodec_checkpoint_to_pytorch.py),
    # except the sizes: 4 codebooks of 2048 at 50 Hz, like the real one.
    config = transformers.EncodecConfig(
        upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=CODEC_FILTERS, sampling_rate=32_000,
        codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False,
        hidden_size=CODEC_HIDDEN, architectures=["EncodecModel"])
    torch.manual_seed(11)
    model = transformers.EncodecModel(config)
    with torch.no_grad():  # transformers initialises the codebooks to zeros, which decode every token to silence
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    model.save_pretrained(directory)
    transformers.EncodecFeatureExtractor(feature_size=1, sampling_rate=32_000).save_pretrained(directory)


def save_t5(directory: Path) -> None:
    import sentencepiece
    import torch
    import transformers

    # T5's own sentencepiece settings: pad 0, eos 1, unk 2, no bos.
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=96, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    tokenizer = transformers.T5Tokenizer(str(directory / "spiece.model"))  # + 100 <extra_id_*> as t5-base
    transformers.T5TokenizerFast(vocab_file=str(directory / "spiece.model")).backend_tokenizer.save(
        str(directory / "tokenizer.json"))
    # t5-base's config except the sizes; d_model stays 768: audiocraft hard-codes it for "t5-base".
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=768, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, architectures=["T5ForConditionalGeneration"])
    torch.manual_seed(12)
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)


def save_musicgen(directory: Path, solver: str, stereo: bool) -> None:
    import torch
    from audiocraft.models import builders
    from audiocraft.utils import export
    from omegaconf import OmegaConf

    from app.weights import OMEGACONF_GLOBALS

    cfg = compose(solver, TINY_LM + (STEREO if stereo else []))
    build_cfg = cfg.copy()
    build_cfg.device, build_cfg.dtype = "cpu", "float32"  # the file keeps the training device (cuda)
    torch.manual_seed(13)
    lm = builders.get_lm_model(build_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # a training checkpoint, as audiocraft's solver saves one
        checkpoint = Path(tmp) / "checkpoint.th"
        torch.save({"xp.cfg": cfg, "best_state": {"model": lm.state_dict()}, "fsdp_best_state": None}, checkpoint)
        with torch.serialization.safe_globals(OMEGACONF_GLOBALS):
            export.export_lm(checkpoint, directory / "state_dict.bin")
    export.export_pretrained_compression_model(ENCODEC, directory / "compression_state_dict.bin")
    assert OmegaConf.create(torch.load(directory / "state_dict.bin")["xp.cfg"]).transformer_lm.n_q == (
        8 if stereo else 4)


def save_mbd(directory: Path) -> None:
    import torch
    from audiocraft.models import builders

    # audiocraft's diffusion solver config with what MBD for MusicGen changes (32 kHz, EnCodec's 4 codebooks,
    # one frequency band per model), at a tiny U-Net size (the real hidden is 48, depth 4).
    package: tp.Dict[tp.Any, tp.Any] = {"sample_rate": 32_000, "n_bands": MBD_BANDS}
    torch.manual_seed(14)
    for band in range(MBD_BANDS):
        cfg = compose("diffusion/default", [
            "sample_rate=32000", "channels=1", "n_q=4", f"compression_model_checkpoint=//pretrained/{ENCODEC}",
            "processor.use=true", "filter.use=true", f"filter.n_bands={MBD_BANDS}", f"filter.idx_band={band}",
            "diffusion_unet.hidden=4", "diffusion_unet.depth=2", f"diffusion_unet.codec_dim={CODEC_HIDDEN}"])
        model = builders.get_diffusion_model(cfg)
        processor = builders.get_processor(cfg.processor, sample_rate=32_000)
        processor.project_sample(torch.randn(4, 1, 32_000))  # fits its statistics (unfitted: NaN)
        package[band] = {"cfg": cfg, "model_state": model.state_dict(), "processor_state": processor.state_dict()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(package, directory / MBD_FILE)


def main(root: Path) -> None:
    """Runs with HF_HOME and TORCH_HOME pointing into `root` (see `build`)."""
    from app import debug_models

    hf_home = Path(os.environ["HF_HOME"])
    # What the LMs load while they are built comes first: htdemucs where torch.hub finds it, EnCodec, T5.
    debug_models.save_htdemucs(os.path.join(os.environ["TORCH_HOME"], "hub"))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp)
        for repo, save in ((ENCODEC, save_encodec), (T5, save_t5), (MBD, save_mbd)):
            save(staging / repo)
            publish(hf_home, repo, staging / repo)
        for repo, (solver, stereo) in MUSICGEN.items():
            save_musicgen(staging / repo, solver, stereo)
            publish(hf_home, repo, staging / repo)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
